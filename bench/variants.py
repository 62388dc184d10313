"""Precision variants of the default model, released as a new version of it.

    python -m bench.variants      # models/nuclei/<next>/: model.onnx, model.int8.onnx,
                                  # model.fp16.onnx and the card (~15 min on 2 cores)

The newest ``nuclei`` version's network, unchanged, becomes the next version's ``model.onnx``
(versions are immutable, so the variants do not go into the released folder), with two
variants of the same network beside it (:mod:`service.inference.precision`):

- **int8**: the graph's upsampling rewritten for ONNX Runtime's int8 CPU kernels
  (:mod:`bench.pixel_shuffle`; version 5's int8 file was made without it), then ONNX Runtime's
  ``quantize_static`` (QDQ, uint8 activations, int8 weights, MinMax calibration) on the tiles
  the service cuts from the **training** images of every source of the ``nuclei`` preset
  (every ``CALIBRATION_STRIDE``-th), normalised the service's way;
- **fp16**: onnxconverter-common's float16 conversion with float32 input and output
  (``keep_io_types``), for CUDA. Its ``Resize`` handling is known to be wrong: the network has
  no ``Resize`` and the run refuses one.

Each of the three is then measured the same way, into its own metadata: IoU, Dice and object
scores per source on the model's test images and held-out sources, through the service's
registry and pipeline (:func:`training.evaluate.evaluate_images`), and its time on a 2048²
mosaic of held-out HeLa frames beside fp32 (interleaved, medians). ``precision=auto`` chooses
from these figures (a variant that loses more than ``MAX_IOU_LOSS`` IoU on any source is never
chosen). fp32's figures must equal those of the version it copies: the same file and pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from service.inference.modelmeta import ModelMetadata
from service.inference.pipeline import predict_mask
from service.inference.precision import MAX_IOU_LOSS, CpuFeatures, Precision, iou_loss
from service.segmentation.registry import LoadedModel, find_model_versions, load_model
from training.presets import PRESETS

REPO_MODELS = Path("models")
NAME = "nuclei"
CALIBRATION_STRIDE = 3
CPU = ["CPUExecutionProvider"]
SPEED_SIDE = 2048
SPEED_ROUNDS = 3


# The sentence main() adds to the description, removed from the copied version's.
VARIANTS_NOTE = (
    r" Version \d+: the network and weights of version \d+, unchanged, with its int8 and fp16 "
    r"variants\.$"
)


def network_version(meta: ModelMetadata, version: int) -> int:
    """The version that trained ``meta``'s network: ``version`` itself, or the one a variants
    version copied it from (its ``network_version``; version 5 says it in ``variant_of``)."""
    metrics = meta.metrics or {}
    if "network_version" in metrics:
        return int(metrics["network_version"])
    found = re.search(r"fp32: version (\d+)'s network", str(metrics.get("variant_of", "")))
    return int(found.group(1)) if found else version


def calibration_tiles(meta: ModelMetadata) -> list[np.ndarray]:
    """Batches of one normalised tile, as the service cuts them from the training images."""
    from bench.cases import service_batches
    from training.data import read_image

    tiles: list[np.ndarray] = []
    for pair in PRESETS[NAME].splits()["train"]:
        pixels = read_image(pair.image)
        tiles += [t[None] for b in service_batches(pixels, meta, 0.25, 8) for t in b]
    return tiles[::CALIBRATION_STRIDE]


def stamp(proto: onnx.ModelProto, meta: ModelMetadata) -> None:
    """Replace the file's metadata with ``meta``."""
    del proto.metadata_props[:]
    for key, value in meta.to_props().items():
        proto.metadata_props.add(key=key, value=value)


def quantize_int8(source: Path, target: Path, meta: ModelMetadata) -> int:
    """The INT8 file of ``source`` (its upsampling rewritten first:
    :mod:`bench.pixel_shuffle`); the number of calibration tiles."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    tiles = calibration_tiles(meta)
    input_name = onnx.load(str(source), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(tiles)

        def get_next(self) -> dict[str, np.ndarray] | None:
            tile = next(self.it, None)
            return None if tile is None else {input_name: tile}

    from bench.pixel_shuffle import rewrite_upsampling

    with tempfile.TemporaryDirectory() as tmp:
        pre, shuffled = Path(tmp) / "pre.onnx", Path(tmp) / "shuffled.onnx"
        onnx.save(rewrite_upsampling(onnx.load(str(source)), meta.tile_size), str(shuffled))
        quant_pre_process(str(shuffled), str(pre), skip_symbolic_shape=True)
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
    return len(tiles)


def convert_fp16(fp32: onnx.ModelProto) -> onnx.ModelProto:
    """float16 weights and activations, float32 input and output."""
    from onnxconverter_common import float16

    resize = [n.name for n in fp32.graph.node if n.op_type == "Resize"]
    if resize:
        raise SystemExit(
            f"the network has Resize nodes {resize}: the fp16 converter mishandles them"
        )
    half: onnx.ModelProto = float16.convert_float_to_float16(fp32, keep_io_types=True)
    return half


def measured(model: LoadedModel, overlap: float = 0.25) -> dict[str, Any]:
    """IoU, Dice and objects overall and per source, as the fp32 card measured them (at
    ``overlap``: the cards' is 0.25)."""
    from training.evaluate import evaluate_images
    from training.release import source_metrics

    config = PRESETS[NAME]
    pairs = {p.key: p for p in config.splits()["test"]}
    images = [pairs[key] for key in model.meta.metrics["test_images"]]
    report = evaluate_images(images, model.meta, model.predict, "binary", overlap=overlap)
    if config.held_out:
        report["held_out"] = evaluate_images(
            config.held_out_pairs(), model.meta, model.predict, "binary", overlap=overlap
        )
    agg = report["aggregate"]
    keys = ("iou", "dice", "mean_iou", "mean_dice", "seconds_per_image", "objects", "labelled_only")
    return {**{k: agg[k] for k in keys if k in agg}, **source_metrics(report)}


def timings(models: dict[Precision, LoadedModel]) -> dict[Precision, float]:
    """Median seconds of each model's mask on a 2048² mosaic of held-out HeLa frames, the
    models taking turns (so all see the same machine)."""
    from bench.images import load_images

    frames, _ = load_images(quick=False)
    from bench.images import mosaic

    image = mosaic([f.pixels for f in frames], SPEED_SIDE)
    runs: dict[Precision, list[float]] = {p: [] for p in models}
    for model in models.values():  # warm-up at this image's batch shapes
        predict_mask(image, model.meta, model.predict, batch_size=8)
    for _ in range(SPEED_ROUNDS):
        for precision, model in models.items():
            start = time.perf_counter()
            predict_mask(image, model.meta, model.predict, batch_size=8)
            runs[precision].append(time.perf_counter() - start)
    return {p: statistics.median(r) for p, r in runs.items()}


def machine() -> str:
    """Where the speeds were measured."""
    cpu = CpuFeatures.read()
    dot = "/".join(cpu.int8_dot) or "no VNNI/AMX"
    return f"{cpu.model} ({platform.machine()}, {os.cpu_count()} cores, {dot}), CPU provider"


def main(argv: list[str] | None = None) -> int:
    """Build the variants, measure all three, write the next version."""
    parser = argparse.ArgumentParser(prog="python -m bench.variants", description=__doc__)
    parser.add_argument("--models", type=Path, default=REPO_MODELS)
    args = parser.parse_args(argv)
    versions = find_model_versions(args.models)[NAME]
    source_version = max(versions)
    source = versions[source_version]
    version = str(source_version + 1)
    target_dir = args.models / NAME / version
    if target_dir.exists():
        raise SystemExit(f"{target_dir} exists: versions are immutable")
    fp32_proto = onnx.load(str(source))
    original = ModelMetadata.from_props({p.key: p.value for p in fp32_proto.metadata_props})
    network = network_version(original, source_version)
    note = (
        f" Version {version}: the network and weights of version {network}, unchanged, "
        "with its int8 and fp16 variants."
    )
    described = re.sub(VARIANTS_NOTE, "", original.description)  # the copied version's note
    base = original.model_copy(update={"version": version, "description": described + note})
    work = Path(tempfile.mkdtemp(prefix=f".staging-{NAME}-", dir=args.models))
    files = {p: work / p.file_name for p in Precision}
    stamp(fp32_proto, base)
    onnx.save(fp32_proto, str(files[Precision.FP32]))
    calibration = quantize_int8(files[Precision.FP32], files[Precision.INT8], base)
    half = convert_fp16(fp32_proto)
    onnx.save(half, str(files[Precision.FP16]))

    variants = {
        Precision.FP32: base,
        Precision.INT8: base.model_copy(update={"precision": Precision.INT8}),
        Precision.FP16: base.model_copy(update={"precision": Precision.FP16}),
    }
    how = {
        Precision.FP32: f"version {source_version}'s model.onnx (version {network}'s network), "
        "unchanged",
        Precision.INT8: "bench.pixel_shuffle (each 2x2 stride-2 ConvTranspose as a 1x1 Conv "
        "and a channels-last pixel shuffle, the same float numbers), then "
        "onnxruntime.quantization.quantize_static: QDQ, uint8 activations, "
        f"int8 weights, per-tensor, MinMax on {calibration} training tiles",
        Precision.FP16: "onnxconverter_common.float16.convert_float_to_float16, "
        "keep_io_types (float32 input and output)",
    }
    for precision, path in files.items():
        proto = onnx.load(str(path))
        stamp(proto, variants[precision])
        onnx.save(proto, str(path))
    models = {p: load_model(NAME, path, CPU, 0, 8) for p, path in files.items()}
    reference = original.metrics
    quality = {}
    for precision, model in models.items():
        start = time.perf_counter()
        quality[precision] = measured(model)
        print(precision, f"measured in {time.perf_counter() - start:.0f} s", flush=True)
        for key in ("iou", "mean_iou"):
            if precision is Precision.FP32 and quality[precision][key] != reference[key]:
                raise SystemExit(
                    f"fp32 {key} {quality[precision][key]} differs from version "
                    f"{source_version}'s card {reference[key]}: not the same pipeline"
                )
    seconds = timings(models)
    when, where = time.strftime("%Y-%m-%d", time.gmtime()), machine()
    summary: dict[Precision, dict[str, Any]] = {}
    for precision, path in files.items():
        speed = {
            "image": f"{SPEED_SIDE}x{SPEED_SIDE} mosaic of held-out HeLa frames, "
            "overlap 0.25, batch 8, output=mask",
            "seconds": round(seconds[precision], 3),
            "fp32_seconds": round(seconds[Precision.FP32], 3),
            "vs_fp32": round(seconds[Precision.FP32] / seconds[precision], 3),
            "measured_on": where,
            "date": when,
            "command": "python -m bench.variants",
        }
        metrics = {
            **reference,
            **quality[precision],
            "variant_of": f"{NAME} version {version} (fp32: version {network}'s network)",
            "network_version": network,
            "variant_made_with": how[precision],
            "speed": speed,
        }
        meta = variants[precision].model_copy(update={"metrics": metrics})
        proto = onnx.load(str(path))
        stamp(proto, meta)
        onnx.save(proto, str(path))
        losses = iou_loss(metrics, reference)
        summary[precision] = {
            "bytes": path.stat().st_size,
            "mean_iou": metrics["mean_iou"],
            "worst_iou_loss": max(losses.values()),
            "within_bound": max(losses.values()) <= MAX_IOU_LOSS,
            "f1": metrics.get("objects", {}).get("f1"),
            "speed_vs_fp32": speed["vs_fp32"],
        }
    write_card(work / "README.md", base, (source_version, network), files, summary, how)
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)  # mkdtemp's 0700 would keep the service's user out (containers)
    work.rename(target_dir)
    from training.release import write_root_card

    write_root_card(target_dir.parent, version)
    print(json.dumps({"version": str(target_dir), "variants": summary}, indent=2, default=str))
    return 0


def _loss_rows(files: dict[Precision, Path]) -> list[str]:
    metas = {
        p: ModelMetadata.from_props(
            {q.key: q.value for q in onnx.load(str(f), load_external_data=False).metadata_props}
        )
        for p, f in files.items()
    }
    from service.inference.precision import source_ious

    ref = source_ious(metas[Precision.FP32].metrics)
    rows = []
    for source, classes in ref.items():
        cells = []
        for precision in (Precision.FP32, Precision.INT8, Precision.FP16):
            got = source_ious(metas[precision].metrics).get(source, {})
            cells.append(" / ".join(f"{got[c]:.4f}" for c in classes))
        rows.append(f"| {source} | " + " | ".join(cells) + " |")
    return rows


def write_card(
    path: Path,
    meta: ModelMetadata,
    versions: tuple[int, int],
    files: dict[Precision, Path],
    summary: dict[Precision, dict[str, Any]],
    how: dict[Precision, str],
) -> None:
    """The version's card: what it is, how each file was made, and each variant's figures.
    ``versions``: the version copied and the one that trained its network."""
    source_version, network = versions
    lines = [
        f"# `{NAME}` (version {meta.version})",
        "",
        f"The network and weights of [version {network}](../{network}/README.md) unchanged "
        "(`model.onnx`: its card, pictures, training and Keras weights are there), released "
        "again with two precision variants beside it. Nothing about earlier versions changes: "
        f"a client that pins `model={NAME}@{source_version}`, or asks for `precision=fp32`, "
        "gets exactly its masks.",
        "",
        *(f"- `{files[p].name}`: {how[p]}." for p in Precision),
        "",
        "| file | precision | bytes | mean IoU | worst IoU loss vs fp32 (any source) | object F1 "
        "| speed vs fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for precision, row in summary.items():
        lines.append(
            f"| `{files[precision].name}` | {precision} | {row['bytes']:,} | "
            f"{row['mean_iou']:.4f} | {row['worst_iou_loss']:+.4f} | "
            f"{row['f1'] if row['f1'] is None else format(row['f1'], '.4f')} | "
            f"{row['speed_vs_fp32']:.2f}x |"
        )
    speed = ModelMetadata.from_props(
        {
            q.key: q.value
            for q in onnx.load(str(files[Precision.FP32]), load_external_data=False).metadata_props
        }
    ).metrics["speed"]
    lines += [
        "",
        f"Speed: {speed['image']}, medians of {SPEED_ROUNDS} interleaved runs, on "
        f"{speed['measured_on']} ({speed['date']}). fp16 is meant for CUDA (Tensor Cores): its "
        "time here is this CPU's and says nothing of a GPU's.",
        "",
        "Foreground IoU per source (test images of the training sources, every image of the "
        "held-out ones), through the service's registry and pipeline (overlap 0.25, gaussian):",
        "",
        "| source | fp32 | int8 | fp16 |",
        "|---|---|---|---|",
        *_loss_rows(files),
        "",
        "`precision=auto` (the default) runs int8 on CPUs with AVX512-VNNI, AVX-VNNI or AMX, "
        f"fp16 on CUDA, and fp32 elsewhere, and a variant only where it loses at most "
        f"{MAX_IOU_LOSS} IoU on every source above; `GET /models` says what it chose on the "
        "host and why.",
        "",
        "Reproduce: `.venv/bin/segtrain fetch-data && .venv/bin/python -m bench.variants`.",
        "",
    ]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
