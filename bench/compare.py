"""Train every architecture on the same split and budget; write ``docs/architectures.md``.

``python -m bench.compare --epochs 6 --steps-per-epoch 12`` trains each network of
:data:`VARIANTS` on the ``nuclei`` preset (binary), exports it to ONNX under ``runs/compare/``
through the same path as a release (parity check included), evaluates it on the held-out frames
through the service's ``predict_mask`` with ONNX Runtime, measures its cost, then trains the best
two on ``nuclei-3class``. Results go to ``runs/compare/results.json`` (``--report-only`` rewrites
the document from it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bench.flops import conv_flops
from bench.markdown import replace_generated

log = logging.getLogger("segtrain.compare")

# Per-architecture options on top of the preset (params kept modest for a 2-core CPU).
VARIANTS: dict[str, dict[str, Any]] = {
    "unet": {},
    "encoder-decoder": {"arch": "encoder-decoder"},
    # The Keras example's widths (32 -> 256).
    "residual-unet": {"arch": "residual-unet", "base_filters": 32, "max_filters": 256},
    "residual-unet-neighbour": {
        "arch": "residual-unet",
        "base_filters": 32,
        "max_filters": 256,
        "neighbour_residuals": True,
    },
    # VGG-16 at a quarter width (16-32-64-128-128, fc 256).
    "fcn8s": {"arch": "fcn8s"},
    # Smaller than u2netp (5 poolings, 16 mid, 64 out channels): 4 poolings, 16 and 16.
    "u2net": {"arch": "u2net", "depth": 4, "base_filters": 16, "max_filters": 16},
}
TILE = 256
BENCH_BATCH = 8
PICTURE = ("frame_018", 250, 400)  # test frame, top, left of the 256x256 crop


def tiles_per_second(path: Path, channels: int = 1, repeats: int = 7) -> float:
    """ONNX Runtime (CPU, default threads) throughput on batches of 256x256 tiles: median."""
    from training.export import INPUT_NAME, ort_predictor

    session = ort_predictor(path)
    batch = np.random.default_rng(0).random((BENCH_BATCH, TILE, TILE, channels), np.float32)
    session.run(None, {INPUT_NAME: batch})  # warm-up: first run allocates
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {INPUT_NAME: batch})
        times.append(time.perf_counter() - start)
    return BENCH_BATCH / statistics.median(times)


def crop_prediction(onnx_path: Path, config: Any) -> np.ndarray:
    """The service's prediction of the picture frame (whole frame, then cropped)."""
    from service.inference.modelmeta import ModelMetadata
    from service.inference.pipeline import predict_mask
    from training.data import read_image
    from training.evaluate import EVAL_SETTINGS, onnx_predictor
    from training.export import ort_predictor

    stem, top, left = PICTURE
    proto = onnx.load(str(onnx_path))
    meta = ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props})
    image = read_image(Path(config.data_dir) / "images" / f"{stem}.tif")
    pred = predict_mask(image, meta, onnx_predictor(ort_predictor(onnx_path)), **EVAL_SETTINGS)
    return pred[top : top + TILE, left : left + TILE]


def run_variant(key: str, preset: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Train, export (parity), evaluate and measure one variant on one preset."""
    from training.export import model_metadata
    from training.presets import PRESETS
    from training.release import export_run
    from training.train import train

    variant = dict(VARIANTS[key])
    arch = variant.pop("arch", "unet")  # the rest are network options
    base = PRESETS[preset]
    overrides = {
        "arch": arch,
        "options": dataclasses.replace(base.options, **variant),
        "name": f"{preset}-{key}",
        "epochs": args.epochs,
        "steps_per_epoch": args.steps_per_epoch,
        "batch_size": args.batch_size,
        "max_minutes": args.max_minutes,
        # Early stopping off: the same number of steps for every network.
        "patience": args.epochs,
    }
    config = dataclasses.replace(base, **overrides)
    run_dir = root / config.name
    summary = train(config, run_dir)
    result = export_run(run_dir, root / "models", "1")
    onnx_path = Path(result["onnx"])
    crop = crop_prediction(onnx_path, config)
    np.save(run_dir / "picture_crop.npy", crop)
    meta = model_metadata(config, summary["channels"])
    return {
        "variant": key,
        "preset": preset,
        "arch": config.arch,
        "architecture": meta.architecture,
        "tile_multiple": meta.tile_multiple,
        "params": summary["params"],
        "onnx_mb": round(onnx_path.stat().st_size / 1e6, 2),
        "gflop_per_tile": round(conv_flops(onnx_path, TILE, summary["channels"])["gflop"], 2),
        "tiles_per_s": round(tiles_per_second(onnx_path, summary["channels"]), 2),
        "train_wall_s": summary["wall_time_s"],
        "epochs_run": summary["epochs_run"],
        "best_epoch": summary["best_epoch"],
        "stopped_by_time_budget": summary["stopped_by_time_budget"],
        "parity": result["parity"],
        "parity_keras_float32": result["parity_detail"]["keras_vs_exact"],
        "iou": result["test"]["iou"],
        "dice": result["test"]["dice"],
        "mean_iou": result["test"]["mean_iou"],
        "seconds_per_image": result["test"]["seconds_per_image"],
        "onnx": str(onnx_path),
        "crop": str(run_dir / "picture_crop.npy"),
    }


def picture(results: list[dict[str, Any]], path: Path, data_dir: str) -> None:
    """The same test crop: input, truth and each binary variant's prediction, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from service.inference.modelmeta import Normalization
    from service.inference.normalize import normalize_image
    from training.data import mask_to_classes, read_image, read_mask

    stem, top, left = PICTURE
    image = read_image(Path(data_dir) / "images" / f"{stem}.tif")
    shown = np.clip(normalize_image(image, Normalization()), 0, 1)[..., 0]
    truth = mask_to_classes(read_mask(Path(data_dir) / "masks" / f"{stem}.tif"), "binary")
    sl = (slice(top, top + TILE), slice(left, left + TILE))
    panels = [("input", shown[sl]), ("ground truth", truth[sl])]
    panels += [
        (f"{r['variant']}\nIoU {r['iou']['nucleus']:.3f}", np.load(r["crop"]))
        for r in results
        if r["preset"] == "nuclei"
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.6))
    for ax, (title, arr) in zip(axes, panels, strict=True):
        ax.imshow(arr, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=60)
    plt.close(fig)


def _keras32(result: dict[str, Any]) -> str:
    value = result.get("parity_keras_float32")
    return "" if value is None else f"{value:.1e}"


def write_doc(data: dict[str, Any], path: Path) -> None:
    """The comparison tables (and the picture link) as Markdown."""
    results = data["results"]
    binary = [r for r in results if r["preset"] == "nuclei"]
    lines = [
        "## Binary nuclei (held-out frames 17-19)",
        "",
        "| variant | params | ONNX MB | GFLOP / 256² tile | ORT tiles/s | train min "
        "| nucleus IoU | nucleus Dice | s / test frame | parity | Keras f32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in binary:
        lines.append(
            f"| `{r['variant']}` | {r['params']:,} | {r['onnx_mb']} | {r['gflop_per_tile']} "
            f"| {r['tiles_per_s']} | {r['train_wall_s'] / 60:.1f} | {r['iou']['nucleus']:.3f} "
            f"| {r['dice']['nucleus']:.3f} | {r['seconds_per_image']} | {r['parity']:.1e} "
            f"| {_keras32(r)} |"
        )
    lines += ["", "Architecture strings (as in each model's metadata):", ""]
    lines += [
        f"- `{r['variant']}`: `{r['architecture']}`, tile multiple {r['tile_multiple']}"
        for r in binary
    ]
    three = [r for r in results if r["preset"] == "nuclei-3class"]
    if three:
        lines += [
            "",
            "## 3-class (background / interior / boundary), the two best binary variants",
            "",
            "| variant | background IoU | interior IoU | boundary IoU | mean IoU | train min "
            "| parity | Keras f32 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in three:
            iou = r["iou"]
            lines.append(
                f"| `{r['variant']}` | {iou['background']:.3f} | {iou['interior']:.3f} "
                f"| {iou['boundary']:.3f} | {r['mean_iou']:.3f} | {r['train_wall_s'] / 60:.1f} "
                f"| {r['parity']:.1e} | {_keras32(r)} |"
            )
    if data.get("failures"):
        lines += ["", "Failed in this run (no row above):", ""]
        lines += [f"- {failure}" for failure in data["failures"]]
    lines += [
        "",
        f"![same crop of {PICTURE[0]}](architectures_crop.png)",
        "",
        f"Crop: {PICTURE[0]} rows {PICTURE[1]}-{PICTURE[1] + TILE}, columns "
        f"{PICTURE[2]}-{PICTURE[2] + TILE}, each segmented as the service does (whole frame, "
        "tiles of 256 with overlap 0.25 and Gaussian blending, ONNX Runtime).",
        "",
        f"Run: `{data['command']}`, {data['machine']}, started {data['started']}, "
        f"{data['total_min']:.0f} min in all.",
    ]
    # Only the part between the markers is generated: the hand-written analysis around it stays.
    replace_generated(path, "bench.compare", lines, "Architectures")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.compare``."""
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--steps-per-epoch", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-minutes", type=float, default=25.0, help="guard per run")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--three-class", type=int, default=2, help="best N also on 3-class")
    parser.add_argument("--root", default="runs/compare")
    parser.add_argument("--doc", default="docs/architectures.md")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    results_path = root / "results.json"
    if not args.report_only:
        data: dict[str, Any] = {
            "command": "python -m bench.compare " + " ".join(argv or sys.argv[1:]),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, no GPU",
            "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "results": [],
        }
        start = time.perf_counter()
        jobs = [(key, "nuclei") for key in args.variants]
        while jobs:
            key, preset = jobs.pop(0)
            try:
                data["results"].append(run_variant(key, preset, args, root))
            except Exception as exc:  # one failing network must not lose the others' results
                log.exception("%s on %s failed", key, preset)
                data.setdefault("failures", []).append(f"{key} on {preset}: {exc}")
            data["total_min"] = (time.perf_counter() - start) / 60
            results_path.write_text(json.dumps(data, indent=2))
            if not jobs and preset == "nuclei":
                done = [r for r in data["results"] if r["preset"] == "nuclei"]
                best = sorted(done, key=lambda r: -r["iou"]["nucleus"])[: args.three_class]
                jobs = [(r["variant"], "nuclei-3class") for r in best]
    data = json.loads(results_path.read_text())
    from training.presets import PRESETS

    picture(
        data["results"],
        Path(args.doc).parent / "architectures_crop.png",
        PRESETS["nuclei"].data_dir,
    )
    write_doc(data, Path(args.doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
