"""INT8 static quantization of the default model, calibrated on training tiles.

    python -m bench.quantize      # writes models/nuclei-int8/1/model.onnx, config.pbtxt, README.md

ONNX Runtime's ``quantize_static`` (QDQ format, uint8 activations, int8 weights, MinMax
calibration) on the very tiles the service would cut from the training images of every source
of the ``nuclei`` preset (normalised the service's way; every ``CALIBRATION_STRIDE``-th tile).
The test images (and the held-out source) are never seen by the calibration; they measure the
result through the service's own registry and pipeline, and those figures (not the fp32
model's) go into the INT8 model's metadata. A mean-IoU drop over ``MAX_IOU_DROP`` fails
the run. The fp32 model stays the default; the INT8 one is served as its own model,
``?model=nuclei-int8``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bench.run import MODEL
from service.inference.modelmeta import ModelMetadata
from training.presets import PRESETS

OUT = Path("models/nuclei-int8")
MAX_IOU_DROP = 0.005  # the bar for keeping a quantized model
CALIBRATION_STRIDE = 3  # every third training tile: 260 tiles over all sources


def calibration_tiles(meta: ModelMetadata) -> list[np.ndarray]:
    """Batches of one normalised tile, as the service cuts them from the training images."""
    from bench.cases import service_batches
    from training.data import read_image

    tiles: list[np.ndarray] = []
    for pair in PRESETS["nuclei"].splits()["train"]:
        pixels = read_image(pair.image)
        tiles += [t[None] for b in service_batches(pixels, meta, 0.25, 8) for t in b]
    return tiles[::CALIBRATION_STRIDE]


def held_out_metrics(meta: ModelMetadata, path: Path) -> dict[str, object]:
    """IoU and Dice of the model at ``path`` on the fp32 model's test images (and per source,
    held-out source included), served as the service serves it (registry session, tiling,
    stitching), as the fp32 model's card measured them."""
    from service.segmentation.registry import load_model
    from training.evaluate import evaluate_images
    from training.release import source_metrics

    config = PRESETS["nuclei"]
    model = load_model(meta.name, path, ["CPUExecutionProvider"], 0, 1)
    pairs = {p.key: p for p in config.splits()["test"]}
    report = evaluate_images(
        [pairs[s] for s in meta.metrics["test_images"]], model.meta, model.predict, "binary"
    )
    if config.held_out:
        report["held_out"] = evaluate_images(
            config.held_out_pairs(), model.meta, model.predict, "binary"
        )
    agg = report["aggregate"]
    keys = ("iou", "dice", "mean_iou", "mean_dice", "seconds_per_image")
    return {**{k: agg[k] for k in keys}, **source_metrics(report)}


def main() -> None:
    """Quantize, stamp the metadata, write the Triton config and the model card."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32 = onnx.load(str(MODEL))
    props = {p.key: p.value for p in fp32.metadata_props}
    meta = ModelMetadata.from_props(props)
    input_name = fp32.graph.input[0].name
    tiles = calibration_tiles(meta)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(tiles)

        def get_next(self) -> dict[str, np.ndarray] | None:
            tile = next(self.it, None)
            return None if tile is None else {input_name: tile}

    (OUT / "1").mkdir(parents=True, exist_ok=True)
    target = OUT / "1" / "model.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(MODEL), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(target),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=False,
            calibrate_method=CalibrationMethod.MinMax,
        )
    q = onnx.load(str(target))
    stamped = meta.model_copy(
        update={
            "name": "nuclei-int8",
            "description": meta.description
            + " INT8 (QDQ, static, calibrated on training tiles) variant of nuclei v"
            + meta.version
            + ".",
        }
    )
    del q.metadata_props[:]
    for key, value in stamped.to_props().items():
        q.metadata_props.add(key=key, value=value)
    onnx.save(q, str(target))
    metrics = held_out_metrics(stamped, target)
    drop = meta.metrics["mean_iou"] - metrics["mean_iou"]
    if drop > MAX_IOU_DROP:
        target.unlink()
        raise SystemExit(f"INT8 mean IoU drops by {drop:.4f} > {MAX_IOU_DROP}: not kept")
    metrics["quantized_from"] = f"{meta.name} v{meta.version}"
    stamped = stamped.model_copy(update={"metrics": {**meta.metrics, **metrics}})
    del q.metadata_props[:]
    for key, value in stamped.to_props().items():
        q.metadata_props.add(key=key, value=value)
    onnx.save(q, str(target))
    config = (MODEL.parents[1] / "config.pbtxt").read_text()
    (OUT / "config.pbtxt").write_text(config.replace('name: "nuclei"', 'name: "nuclei-int8"', 1))
    write_card(meta, stamped, len(tiles), target.stat().st_size)
    print(json.dumps({"model": str(target), "bytes": target.stat().st_size, "tiles": len(tiles)}))


def _row(source: str, fp32: dict[str, Any], int8: dict[str, Any]) -> str:
    a, b = fp32["iou"]["nucleus"], int8["iou"]["nucleus"]
    return f"| {source} | {a:.4f} | {b:.4f} | {b - a:+.4f} |"


def write_card(fp32: ModelMetadata, int8: ModelMetadata, tiles: int, size: int) -> None:
    """The INT8 model's card, from the figures just measured and the fp32 model's metadata."""
    f, q = fp32.metrics, int8.metrics
    rows = [_row(s, f["per_source"][s], q["per_source"][s]) for s in f.get("per_source", {})]
    rows += [
        _row(f"{s} (held out)", f["held_out"][s], q["held_out"][s]) for s in f.get("held_out", {})
    ]
    text = f"""# `nuclei-int8` (version {int8.version})

The default [`nuclei`](../nuclei/{fp32.version}/README.md) model (version {fp32.version}),
statically quantized to INT8 with ONNX Runtime's tools. Opt-in:
`POST /segment?model=nuclei-int8`. The fp32 `nuclei` stays the default model; nothing is
replaced silently.

- Same task, classes, tile ({fp32.tile_size}), normalisation (percentiles
  {fp32.normalization.low} / {fp32.normalization.high}), threshold ({fp32.threshold}), training
  scale ({fp32.object_diameter} px, so `diameter=` works alike), input/output names and shapes
  as `nuclei`: the metadata is copied, except `name`, `description` and `metrics`, which are
  this model's own, measured on the fp32 model's test images through the service's registry and
  pipeline by `bench.quantize` (which refuses to keep a model whose mean IoU drops by more than
  {MAX_IOU_DROP}; CI re-measures it in `tests/test_bundled_quality.py`).
- Quantization: `onnxruntime.quantization.quantize_static`, QDQ format, uint8 activations, int8
  weights, per-tensor, MinMax calibration on {tiles} tiles (every {CALIBRATION_STRIDE}rd of those
  the service cuts, tile 256, overlap 0.25) from the **training** images of every source,
  normalised the service's way. Validation, test and held-out images are never seen.
  {size / 1e6:.1f} MB.
- Reproduce: `.venv/bin/segtrain fetch-data && .venv/bin/python -m bench.quantize`.
- Why: x86 CPUs with AVX512-VNNI (and AVX-VNNI) run the u8 x s8 convolutions faster than fp32;
  the speed-up measured side by side with fp32 (same network, 1.3 M parameters) is in
  [docs/benchmarks.md](../../docs/benchmarks.md) ("Levers", INT8). CPUs without VNNI gain less.
- On GPUs use the fp32 model (or an FP16 variant, `python -m bench.fp16`); TensorRT can consume
  the QDQ graph, but this variant was only measured on the CPU.

## Measured

Through the service pipeline (overlap 0.25), on the test images of the training sources: mean
IoU (background and nucleus) {q["mean_iou"]:.4f} vs {f["mean_iou"]:.4f} for fp32 (drop
{f["mean_iou"] - q["mean_iou"]:.4f}). Nucleus IoU per source, and on every image of the
held-out one:

| source | fp32 nucleus IoU | INT8 nucleus IoU | difference |
|---|---|---|---|
{chr(10).join(rows)}

Data, licence and attribution: as for [`nuclei`](../nuclei/{fp32.version}/README.md).
"""
    (OUT / "README.md").write_text(text)


if __name__ == "__main__":
    shutil.rmtree(OUT / "1", ignore_errors=True)
    main()
