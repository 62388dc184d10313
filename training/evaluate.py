"""Held-out evaluation on whole images through the service's own tiling, and its pictures."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on training machines
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

from service.inference.matching import (
    MatchCounts,
    image_counts_both,
    object_scores,
)
from service.inference.modelmeta import ModelMetadata
from service.inference.normalize import normalize_image
from service.inference.pipeline import predict_instances, predict_mask
from service.inference.scores import get_stats, scores_from_stats, total_stats
from training.boundary import BoundaryBias, boundary_bias, edge_level
from training.data import MaskMode, Pair, mask_to_classes, read_image, read_mask

Predictor = Callable[[np.ndarray], np.ndarray]
_COLOURS = ["#000000", "#1f9e89", "#fde725", "#e4572e", "#4f6bd6", "#c04fd6"]
EVAL_SETTINGS: dict[str, Any] = {"batch_size": 8, "overlap": 0.25, "mode": "gaussian"}


def keras_predictor(model: Any) -> Predictor:
    """Keras model as a tile predictor (direct call: faster than ``predict`` for small batches)."""
    return lambda tiles: np.asarray(model(tiles, training=False))


def onnx_predictor(session: Any) -> Predictor:
    """ONNX Runtime session as a tile predictor: what the service runs."""
    name = session.get_inputs()[0].name
    return lambda tiles: session.run(None, {name: tiles.astype(np.float32)})[0]


def evaluate_images(
    pairs: list[Pair],
    meta: ModelMetadata,
    predictor: Predictor,
    mask_mode: str,
    *,
    boundary_width: int = 2,
    contact_width: int = 0,
    keep_cores: bool = False,
    pictures_dir: Path | None = None,
    pictures_per_source: int | None = None,
    overlap: float = EVAL_SETTINGS["overlap"],
) -> dict[str, Any]:
    """Segment each whole image with :func:`predict_mask` and score it against its mask.

    Returns per-image scores and the aggregate over all pixels of all images (the per-image
    counts summed, so large images weigh by their size), and the same aggregate per source when
    the pairs come from several. A model that gives instances (``meta.instances``) is run as
    the service runs it for ``output=labels`` (:func:`predict_instances`: the seeded watershed
    and its speck rule) and its objects are matched one-to-one to the mask's instance labels
    (:mod:`service.inference.matching`): precision, recall and F1 at IoU 0.5, AP
    (TP / (TP + FP + FN)) at IoU 0.5:0.95 and its mean, mean matched IoU, per image, per source
    and over all (summed counts); and the same scores, with nucleus IoU, under
    ``labelled_only``, with the predicted objects left out that the image border cuts and the
    reference leaves unlabelled (:func:`unlabelled_at_border`: the Cell Tracking Challenge's
    references and cells3d's omit such nuclei, which the plain scores count as false). Binary
    models also get their edge placement
    (:mod:`training.boundary`): per source, the matched objects' area ratio and signed edge
    distance, and where the labels put the edge in the intensity step. Writes one
    input/truth/prediction PNG per image to ``pictures_dir`` when given (the first
    ``pictures_per_source`` images of each source, when given). ``overlap``: the tiling's
    (cards are measured at :data:`EVAL_SETTINGS`'s).
    """
    settings = EVAL_SETTINGS | {"overlap": overlap}
    per_image: dict[str, Any] = {}
    stats = []
    by_source: dict[str, list[Any]] = {}
    edges: dict[str, BoundaryBias] = {}
    levels: dict[str, list[float]] = {}
    total_seconds = 0.0
    objects: dict[str, list[dict[float, MatchCounts]]] = {}
    # The same, with predicted objects cut by the border that the reference leaves unlabelled
    # left out (pixels and objects): what an incomplete reference can score.
    labelled_only: dict[str, list[Any]] = {}
    left_out: dict[str, int] = {}
    for pair in pairs:
        image = read_image(pair.image)
        labels = read_mask(pair.mask)
        target = mask_to_classes(
            labels,
            mask_mode,
            label_values=meta.label_values,
            boundary_width=boundary_width,
            contact_width=contact_width,
            keep_cores=keep_cores,
        )
        start = time.perf_counter()
        if meta.instances is not None:
            found = predict_instances(image, meta, predictor, **settings)
            pred = found.mask
        else:
            pred = predict_mask(image, meta, predictor, **settings)
        seconds = time.perf_counter() - start
        stats.append(get_stats(pred, target, meta.num_classes))
        by_source.setdefault(pair.source, []).append(stats[-1])
        per_image[pair.key] = scores_from_stats(stats[-1], meta.classes).as_dict()
        per_image[pair.key]["seconds"] = round(seconds, 3)
        if meta.instances is not None:
            counts, kept_counts, cut = image_counts_both(labels, found.labels)
            objects.setdefault(pair.source, []).append(counts)
            unlabelled = np.isin(found.labels, cut)
            # Pixels: only the unlabelled part of those objects goes (the rest is a hit).
            trimmed = np.where(unlabelled & (labels == 0), 0, pred)
            labelled_only.setdefault(pair.source, []).append(
                (get_stats(trimmed, target, meta.num_classes), kept_counts)
            )
            left_out[pair.source] = left_out.get(pair.source, 0) + cut.size
            per_image[pair.key]["objects"] = _object_summary(object_scores([counts]).as_dict())
        if MaskMode(mask_mode) is MaskMode.BINARY:
            bias = boundary_bias(pred, labels)
            per_image[pair.key]["boundary"] = bias.as_dict()
            edges[pair.source] = edges.get(pair.source, BoundaryBias()) + bias
            level = edge_level(image, labels) if image.shape[2] == 1 else None
            if level is not None:
                levels.setdefault(pair.source, []).append(level)
        total_seconds += seconds
        drawn = len(by_source[pair.source]) <= (pictures_per_source or len(pairs))
        if pictures_dir is not None and drawn:
            pictures_dir.mkdir(parents=True, exist_ok=True)
            name = f"test_{pair.source}_{pair.stem}" if pair.source else f"test_{pair.stem}"
            save_triptych(
                image, target, pred, meta, pictures_dir / f"{name}.png", per_image[pair.key]
            )
    total = scores_from_stats(total_stats(stats), meta.classes)
    aggregate = {**total.as_dict(), "seconds_per_image": round(total_seconds / len(pairs), 3)}
    sources: dict[str, Any] = {}
    for source, source_stats in by_source.items():
        entry = scores_from_stats(total_stats(source_stats), meta.classes).as_dict()
        entry["images"] = len(source_stats)
        if source in edges:
            entry["boundary"] = edges[source].as_dict()
            entry["boundary"]["label_edge_level"] = (
                round(float(np.mean(levels[source])), 3) if levels.get(source) else None
            )
        sources[source] = entry
        if source in objects:
            entry["objects"] = object_scores(objects[source]).as_dict()
            pixel, matched = zip(*labelled_only[source], strict=True)
            entry["labelled_only"] = {
                "objects_left_out": left_out[source],
                "iou": scores_from_stats(total_stats(list(pixel)), meta.classes).as_dict()["iou"],
                "objects": _object_summary(object_scores(matched).as_dict()),
            }
    if "" in edges:
        aggregate["boundary"] = sources[""]["boundary"]
    if objects:
        aggregate["objects"] = object_scores(c for cs in objects.values() for c in cs).as_dict()
        both = [pc for pcs in labelled_only.values() for pc in pcs]
        aggregate["labelled_only"] = {
            "objects_left_out": sum(left_out.values()),
            "iou": scores_from_stats(total_stats([p for p, _ in both]), meta.classes).as_dict()[
                "iou"
            ],
            "objects": _object_summary(object_scores(c for _, c in both).as_dict()),
        }
    report = {"images": [p.key for p in pairs], "aggregate": aggregate, "per_image": per_image}
    if set(sources) != {""}:
        report["per_source"] = sources
    return report


def _object_summary(scores: dict[str, Any]) -> dict[str, Any]:
    """An image's object scores without the AP curve (kept per source and overall)."""
    return {k: v for k, v in scores.items() if k != "ap"}


def _display(image: np.ndarray, meta: ModelMetadata) -> np.ndarray:
    """Whole-image normalised and clipped to [0, 1] for viewing."""
    shown = np.clip(normalize_image(image, meta.normalization), 0.0, 1.0)
    return shown[..., 0] if shown.shape[2] == 1 else shown[..., :3]


def save_triptych(
    image: np.ndarray,
    target: np.ndarray,
    pred: np.ndarray,
    meta: ModelMetadata,
    path: Path,
    scores: dict[str, Any] | None = None,
    dpi: int = 60,
) -> None:
    """Input, ground truth and prediction side by side, as a small PNG."""
    cmap = ListedColormap(_COLOURS[: meta.num_classes])
    fig, axes = plt.subplots(1, 3, figsize=(15, 15 * image.shape[0] / image.shape[1] / 3 + 0.6))
    axes[0].imshow(_display(image, meta), cmap="gray")
    axes[0].set_title("input")
    axes[1].imshow(target, cmap=cmap, vmin=0, vmax=meta.num_classes - 1, interpolation="nearest")
    axes[1].set_title("ground truth")
    axes[2].imshow(pred, cmap=cmap, vmin=0, vmax=meta.num_classes - 1, interpolation="nearest")
    title = "prediction"
    if scores is not None:
        ious = ", ".join(
            f"{k} {v:.3f}" for k, v in scores["iou"].items() if v is not None and k != "background"
        )
        title += f" (IoU {ious})"
    axes[2].set_title(title)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def read_history(path: Path) -> dict[str, list[float]]:
    """Columns of a Keras ``CSVLogger`` file."""
    with path.open() as f:
        rows = list(csv.DictReader(f))
    return {key: [float(r[key]) for r in rows] for key in rows[0]} if rows else {}


def plot_history(history_csv: Path, path: Path, dpi: int = 70) -> None:
    """Loss and IoU per epoch, training and validation, as a PNG."""
    # Deep-supervised models log their fused output's metrics as "probabilities_<metric>".
    hist = {
        k.replace("probabilities_", ""): v
        for k, v in read_history(history_csv).items()
        if "side" not in k
    }
    epochs = [int(e) + 1 for e in hist["epoch"]]
    iou_keys = [k for k in hist if k.endswith("iou") and not k.startswith("val_")]
    fig, (ax_loss, ax_iou) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot(epochs, hist["loss"], label="train")
    ax_loss.plot(epochs, hist["val_loss"], label="validation")
    ax_loss.set_yscale("log")
    ax_loss.set_title("loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.legend()
    for key in iou_keys + [k for k in hist if k.startswith("iou_")]:
        if key in iou_keys and key != "iou":
            continue
        ax_iou.plot(epochs, hist[key], "--", label=f"train {key}")
        ax_iou.plot(epochs, hist[f"val_{key}"], label=f"val {key}")
    ax_iou.set_title("IoU")
    ax_iou.set_xlabel("epoch")
    ax_iou.set_ylim(0, 1)
    ax_iou.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def write_report(report: dict[str, Any], path: Path) -> None:
    """The evaluation report as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
