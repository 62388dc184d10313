"""Evaluating a trained run and releasing it: ONNX export, parity, metrics, model card.

Library code behind ``segtrain evaluate | export | release`` (and ``bench.compare``); the CLI
only parses arguments and prints.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import keras
import onnx

from service.inference.modelmeta import ModelMetadata
from training.card import write_card
from training.config import TrainConfig
from training.dataset import grid_tiles, load_frames
from training.evaluate import (
    evaluate_images,
    keras_predictor,
    onnx_predictor,
    plot_history,
    write_report,
)
from training.export import (
    Parity,
    check_parity,
    git_commit,
    model_metadata,
    ort_predictor,
    served_mask_mode,
    served_model,
    set_metadata,
    to_onnx,
    write_model_repository,
)
from training.presets import TARGETS
from training.train import load_trained
from training.tuning import tune_instances

log = logging.getLogger("segtrain")


def evaluate_models(
    run_dir: Path,
    config: TrainConfig,
    meta: ModelMetadata,
    model: keras.Model,
    session: Any | None = None,
) -> dict[str, Any]:
    """Held-out scores of the Keras ``model`` and, when given, of its ONNX Runtime ``session``:
    on the test split of the training sources and, under ``"held_out"``, on every image of the
    sources kept out of training.

    The pictures in ``run_dir/eval`` show the ONNX model when there is one (what is served),
    else the Keras model (with several sources, two images of each); the training curves are
    drawn beside them.
    """
    eval_dir = run_dir / "eval"
    predictors = {"keras": keras_predictor(model)}
    if session is not None:
        predictors = {"onnx": onnx_predictor(session), **predictors}
    several = len(config.source_dirs) + len(config.held_out) > 1
    held_out = config.held_out_pairs()
    mask_mode = served_mask_mode(config)
    report: dict[str, Any] = {}
    for kind, predictor in predictors.items():
        pictures = eval_dir if not report else None
        options: dict[str, Any] = {
            "boundary_width": config.boundary_width,
            "contact_width": config.contact_width,
            "keep_cores": config.keep_cores,
            "pictures_dir": pictures,
            "pictures_per_source": 2 if several else None,
        }
        report[kind] = evaluate_images(
            config.splits()["test"], meta, predictor, mask_mode, **options
        )
        if held_out:
            report[kind]["held_out"] = evaluate_images(
                held_out, meta, predictor, mask_mode, **options
            )
    plot_history(run_dir / "history.csv", eval_dir / "training_curves.png")
    return report


KERAS_NOTE = """
## Keras weights

`keras/model.keras` (Keras 3, saved without optimizer state; in this version's folder) is the
checkpoint this ONNX file was exported from, with the same output head (ONNX Runtime and Keras
float32 differ by {parity:.1e} on real test tiles). The service never loads it (it serves
`model.onnx` alone, and `.dockerignore` keeps it out of the image); it is here so that the
benchmark's tutorial-way baseline (`make bench`, `docs/benchmarks.md`) can run the very same
weights in Keras on a fresh clone, where `runs/` (git-ignored) does not exist.
"""


def source_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """Per-source IoU, Dice and edge placement of a test report, for the model's metadata:
    ``per_source`` for the training sources' test images, ``held_out`` for the sources never
    trained on."""
    out: dict[str, Any] = {}
    keep = ("images", "iou", "dice", "boundary", "objects", "labelled_only")
    if "per_source" in report:
        out["per_source"] = {
            src: {k: v[k] for k in keep if k in v} for src, v in report["per_source"].items()
        }
    held = report.get("held_out")
    if held is not None:
        sources = held.get("per_source") or {
            "": held["aggregate"] | {"images": len(held["images"])}
        }
        out["held_out"] = {src: {k: v[k] for k in keep if k in v} for src, v in sources.items()}
    return out


def _run(run_dir: Path) -> tuple[TrainConfig, dict[str, Any]]:
    """A run folder's config and training summary."""
    config = TrainConfig.load(run_dir / "config.json")
    return config, json.loads((run_dir / "train_summary.json").read_text())


def evaluate_run(run_dir: Path, onnx_path: Path | None = None) -> dict[str, Any]:
    """Evaluate a run's checkpoint (and an ONNX file if given) on its held-out test split."""
    config, summary = _run(run_dir)
    meta = model_metadata(
        config, summary["channels"], object_diameter=summary.get("object_diameter")
    )
    session = ort_predictor(onnx_path) if onnx_path is not None else None
    model = served_model(load_trained(run_dir), config)
    report = evaluate_models(run_dir, config, meta, model, session)
    write_report(report, run_dir / "eval" / "report.json")
    return report


def versions(model_dir: Path) -> list[int]:
    """The numeric version folders of a model, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(v.name) for v in model_dir.iterdir() if v.is_dir() and v.name.isdigit())


def next_version(model_dir: Path) -> str:
    """1 + the highest version folder of a model (1 for a new model)."""
    return str(max(versions(model_dir), default=0) + 1)


def _ships_keras(model_dir: Path) -> bool:
    """Whether a model ships its Keras weights: a ``keras/`` folder at its root (before
    versioned cards) or in any version folder."""
    return (model_dir / "keras").is_dir() or any(
        (model_dir / str(v) / "keras").is_dir() for v in versions(model_dir)
    )


def export_run(run_dir: Path, models_dir: Path, version: str | None = None) -> dict[str, Any]:
    """Export, check parity, evaluate the ONNX model, embed the metrics and write the card.

    The release goes to ``models_dir/<name>/<version>/``: by default the next version (1 + the
    highest that exists). Versions are immutable: a ``version`` that exists is refused, and
    nothing in an earlier version's folder is rewritten.

    The ONNX model is evaluated before it is written: its test metrics are part of its own
    metadata. Changing metadata does not touch the weights, so parity holds for the final file.
    """
    config, summary = _run(run_dir)
    model_dir = models_dir / config.name
    if version is None:
        version = next_version(model_dir)
    if not version.isdigit() or int(version) < 1:
        raise ValueError(f"a version is a positive integer, got {version!r}")
    if (model_dir / version).exists():
        raise FileExistsError(
            f"{model_dir / version} exists: versions are immutable; release as version "
            f"{next_version(model_dir)} (the default) instead"
        )
    meta = model_metadata(
        config,
        summary["channels"],
        version=version,
        commit=git_commit(),
        # The training scale the service's diameter= rescales to (runs before it had none).
        object_diameter=summary.get("object_diameter"),
    )
    model = served_model(load_trained(run_dir), config)
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
        contact_width=config.contact_width,
        keep_cores=config.keep_cores,
    )
    tiles, _ = grid_tiles(frames, config.tile_size)
    parity = check_parity(model, session, tiles[:16])
    log.info(
        "parity: ONNX Runtime vs Keras float64 %.3g (Keras float32 vs float64 %.3g)",
        parity.onnx_vs_exact,
        parity.keras_vs_exact,
    )

    tuned: dict[str, Any] = {}
    if meta.instances is not None and meta.object_diameter is not None:
        # The instance step's seed threshold and speck rule, chosen on the validation split.
        val = config.splits()["val"]
        instances, table = tune_instances(meta, onnx_predictor(session), val)
        meta = meta.model_copy(update={"instances": instances})
        (run_dir / "eval").mkdir(parents=True, exist_ok=True)
        (run_dir / "eval" / "instances_tuning.json").write_text(json.dumps(table, indent=2))
        tuned = {
            "instances_tuned_on": f"validation split, {len(val)} images",
            "instances_validation_mean_f1": max(row["mean_f1"] for row in table),
            "instances_validation_mean_f1_at_defaults": table[0]["mean_f1"],
        }

    reports = evaluate_models(run_dir, config, meta, model, session)
    onnx_report, keras_report = reports["onnx"], reports["keras"]
    agg = onnx_report["aggregate"]
    how = "predict_instances" if meta.instances is not None else "predict_mask"
    metrics = {
        "test_images": onnx_report["images"],
        "iou": agg["iou"],
        "dice": agg["dice"],
        "mean_iou": agg["mean_iou"],
        "mean_dice": agg["mean_dice"],
        "evaluated_with": f"onnxruntime + service.inference.pipeline.{how} "
        "(overlap 0.25, gaussian)",
        # ONNX Runtime vs the Keras network in float64 (training.export.Parity).
        "parity_max_abs_diff": parity.onnx_vs_exact,
        "parity_keras_float32_max_abs_diff": parity.keras_vs_exact,
        "training_wall_time_s": summary["wall_time_s"],
        "cpu_seconds_per_image": agg["seconds_per_image"],
        **{k: agg[k] for k in ("objects", "labelled_only") if k in agg},
        **tuned,
        **source_metrics(onnx_report),
    }
    meta = meta.model_copy(update={"metrics": metrics})
    set_metadata(proto, meta)
    # Everything is written to a staging folder first and moved into models/ at the end: a
    # failure on the way leaves models/ as it was, never a half-written model the service
    # would try to load (the registry skips folders whose names start with a dot).
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{meta.name}-", dir=models_dir))
    try:
        result = _write_release(
            staging, run_dir, config, summary, meta, proto, parity, onnx_report, keras_report
        )
        staged_version = staging / meta.name / meta.version
        if _ships_keras(model_dir):
            # A model that ships its Keras weights (the default: the benchmark's tutorial-way
            # baseline runs them on a fresh clone, where runs/ does not exist) ships them with
            # each version, in its folder.
            (staged_version / "keras").mkdir()
            # A fresh functional model over the same layers: weights only, no optimizer state
            # (the checkpoint's Adam moments would triple the file).
            bare = keras.Model(model.inputs, model.outputs, name=model.name)
            bare.save(staged_version / "keras" / "model.keras")
            with (staged_version / "README.md").open("a") as card:
                card.write(KERAS_NOTE.format(parity=parity.onnx_vs_keras))
        _publish(staging / meta.name, model_dir, meta.version)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result["onnx"] = str(model_dir / meta.version / "model.onnx")
    result["version"] = meta.version
    log.info("exported %s", json.dumps(result, default=float))
    return result


def _archive_root_card(target: Path) -> None:
    """Before versioned cards, a model's card, pictures and Keras weights lay in its root
    folder: move them into the folder of the version they describe (the highest), unless that
    version has its own card already. Its ``model.onnx`` is never touched."""
    existing = versions(target)
    if not existing or not (target / "README.md").is_file():
        return
    old = target / str(existing[-1])
    if (old / "README.md").exists():
        return
    os.replace(target / "README.md", old / "README.md")
    for picture in target.glob("*.png"):
        os.replace(picture, old / picture.name)
    if (target / "keras").is_dir() and not (old / "keras").exists():
        (target / "keras").rename(old / "keras")


def recipe(config: TrainConfig) -> str:
    """What a card says of a run beyond its epochs and time: the 3-class targets, and where the
    weights started when the run fine-tuned another network."""
    lines = []
    if config.mask_mode == "3class":
        band = f"{config.boundary_width} px"
        if config.contact_width > config.boundary_width:
            band += f", {config.contact_width} px where another nucleus is within reach"
        seeds = (
            "; a nucleus the bands would leave without interior keeps its innermost pixels as "
            "interior, a seed for the watershed"
            if config.keep_cores
            else ""
        )
        lines.append(f"Targets: background / interior / boundary, the boundary {band}{seeds}.")
    if config.init_weights:
        lines.append(
            f"Fine-tuned: the weights started from `{config.init_weights}` (learning rate "
            f"{config.learning_rate:g}); the wall time above is this run's alone."
        )
    return "\n" + "\n\n".join(lines) + "\n" if lines else ""


def root_card(card: str, version: str, earlier: list[int]) -> str:
    """A version's card as the model folder's README: its relative links and the Keras path
    pointing into the version folder, and a line on where the earlier versions' cards are."""
    card = re.sub(r"\]\((?!https?:|/|#|\.\./)([^)]+)\)", rf"]({version}/\1)", card)
    card = card.replace("](../", "](")  # a sibling version's folder, seen from the model's
    card = card.replace("`keras/model.keras`", f"`{version}/keras/model.keras`")
    cards = ", ".join(f"[{v}]({v}/README.md)" for v in earlier)
    note = (
        f"The newest version, {version}, served by default (`model=NAME@N` pins a version); "
        f"this card is also [{version}/README.md]({version}/README.md)."
    )
    if cards:
        note += f" Earlier versions and their cards: {cards}."
    title, _, rest = card.partition("\n")
    return f"{title}\n\n{note}\n{rest}"


def _publish(staged: Path, target: Path, version: str) -> None:
    """Move a staged model folder into the repository: its version folder (model, card,
    pictures, Keras weights) is added beside the others, never over one; the model folder's
    ``config.pbtxt`` and ``README.md`` (the newest version's card, links into its folder)
    are replaced."""
    target.mkdir(parents=True, exist_ok=True)
    destination = target / version
    if destination.exists():
        raise FileExistsError(f"{destination} exists: versions are immutable")
    _archive_root_card(target)
    if (target / "keras").is_dir() and not any((target / "keras").iterdir()):
        (target / "keras").rmdir()  # an empty marker: this model ships its Keras weights
    (staged / version).rename(destination)
    os.replace(staged / "config.pbtxt", target / "config.pbtxt")
    write_root_card(target, version)


def write_root_card(target: Path, version: str) -> None:
    """The model folder's README: the card of ``version`` (its newest), as :func:`root_card`
    makes it. A release and ``bench.variants`` both leave the folder so."""
    card = (target / version / "README.md").read_text()
    earlier = [v for v in versions(target) if str(v) != version]
    (target / "README.md").write_text(root_card(card, version, earlier))


def _write_release(
    models_dir: Path,
    run_dir: Path,
    config: TrainConfig,
    summary: dict[str, Any],
    meta: ModelMetadata,
    proto: onnx.ModelProto,
    parity: Parity,
    onnx_report: dict[str, Any],
    keras_report: dict[str, Any],
) -> dict[str, Any]:
    """The model folder (ONNX file, Triton config, card, pictures) under ``models_dir``."""
    eval_dir = run_dir / "eval"
    agg = onnx_report["aggregate"]
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

    # The card and its pictures go in the version's folder, so each version keeps its own.
    version_dir = models_dir / meta.name / meta.version
    pictures = []
    for png in sorted(eval_dir.glob("*.png")):
        shutil.copy(png, version_dir / png.name)
        pictures.append(png.name)
    # An optional note measured outside this run (e.g. the GPU speed-up, bench.training_speed).
    note = run_dir / "card_note.md"
    extra = recipe(config) + ("\n" + note.read_text() if note.exists() else "")
    write_card(
        version_dir / "README.md",
        meta,
        preset=config.name,
        summary=summary,
        onnx_scores=agg,
        keras_scores=keras_report["aggregate"],
        parity=parity,
        onnx_bytes=onnx_path.stat().st_size,
        pictures=pictures,
        extra=extra,
        sources=[Path(d).name for d in config.source_dirs + config.held_out]
        if len(config.source_dirs) + len(config.held_out) > 1
        else None,
        targets=TARGETS.get(config.name),
    )
    return {
        "onnx": str(onnx_path),
        "bytes": onnx_path.stat().st_size,
        "parity": parity.onnx_vs_exact,
        "parity_detail": parity.as_dict(),
        "test": agg,
        "keras_test_mean_iou": keras_report["aggregate"]["mean_iou"],
    }
