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

import numpy as np
import onnx

from bench.run import MODEL
from service.inference.modelmeta import ModelMetadata
from training.presets import PRESETS

OUT = Path("models/nuclei-int8")
MAX_IOU_DROP = 0.005  # the bar for keeping a quantized model
CALIBRATION_STRIDE = 3  # every third training tile: ~400 tiles over all sources


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
    from service.registry import load_model
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
    print(json.dumps({"model": str(target), "bytes": target.stat().st_size, "tiles": len(tiles)}))


if __name__ == "__main__":
    shutil.rmtree(OUT / "1", ignore_errors=True)
    main()
