"""The instance step's two knobs, chosen on the validation split at release, never on the test.

A model that gives instances (``binary_instances``) ships a seed threshold (how sure the network
must be that a pixel is an object's core) and a speck rule (the smallest object kept, as a
fraction of a disc of the training diameter) in its metadata. Both trade merges against splits
and specks against small nuclei, and the best values depend on the trained network. At release,
each validation image is run once through the service's tiling (both output channels blended),
and every pair of candidate values is scored object by object (F1 at IoU 0.5, counts summed per
source). The pair with the best mean F1 over the sources wins (each source counts the same,
however many images it has), ties going to the less aggressive values, which come first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from service.inference.instances import CORE, FOREGROUND, label_instances, speck_area
from service.inference.matching import MatchCounts, match_counts, overlaps
from service.inference.modelmeta import Instances, ModelMetadata
from service.inference.normalize import compute_intensity_stats
from service.inference.pipeline import as_hwc
from service.inference.tiling import sliding_window_inference
from training.data import Pair, read_image, read_mask

log = logging.getLogger(__name__)

SEED_THRESHOLDS = (0.5, 0.4, 0.6, 0.7, 0.8)
SPECK_FRACTIONS = (0.1, 0.05, 0.2, 0.3)


def blended_outputs(
    image: np.ndarray, meta: ModelMetadata, predictor: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """The model's blended ``(H, W, K)`` outputs over ``image``, tiled as the service tiles."""
    image = as_hwc(image)
    stats = compute_intensity_stats(image, meta.normalization)
    return sliding_window_inference(
        image, meta.tile_size, 8, predictor, overlap=0.25, prepare=stats.apply
    )


def _codes(outputs: np.ndarray, threshold: float, seed: float) -> np.ndarray:
    fg = outputs[..., 0] >= threshold
    codes = fg.astype(np.uint8) * FOREGROUND
    codes[fg & (outputs[..., 1] >= seed)] = CORE
    return codes


def tune_instances(
    meta: ModelMetadata,
    predictor: Callable[[np.ndarray], np.ndarray],
    pairs: Sequence[Pair],
    seeds: Sequence[float] = SEED_THRESHOLDS,
    fractions: Sequence[float] = SPECK_FRACTIONS,
) -> tuple[Instances, list[dict[str, Any]]]:
    """The seed threshold and speck fraction with the best mean per-source F1@0.5 on
    ``pairs`` (validation images with instance labels), and the table of every candidate."""
    if meta.instances is None or meta.object_diameter is None:
        raise ValueError("tuning needs a model with instances and a training scale")
    counts: dict[tuple[float, float], dict[str, MatchCounts]] = {}
    for pair in pairs:
        outputs = blended_outputs(read_image(pair.image), meta, predictor)
        truth = read_mask(pair.mask)
        for seed in seeds:
            codes = _codes(outputs, meta.threshold, seed)
            for fraction in fractions:
                area = speck_area(meta.object_diameter, fraction)
                labels, _ = label_instances(codes, min_area=area)
                found = match_counts(overlaps(truth, labels), 0.5)
                per_source = counts.setdefault((seed, fraction), {})
                source = pair.source or "all"
                per_source[source] = per_source[source] + found if source in per_source else found
    table: list[dict[str, Any]] = []
    for (seed, fraction), per_source in counts.items():
        f1 = {
            s: (2 * c.tp / (2 * c.tp + c.fp + c.fn) if c.tp + c.fp + c.fn else 1.0)
            for s, c in per_source.items()
        }
        table.append(
            {
                "seed_threshold": seed,
                "min_area_fraction": fraction,
                "mean_f1": float(np.mean(list(f1.values()))),
                "f1": f1,
            }
        )
    best = max(table, key=lambda row: row["mean_f1"])  # first of equals: the defaults first
    chosen = meta.instances.model_copy(
        update={
            "seed_threshold": best["seed_threshold"],
            "min_area_fraction": best["min_area_fraction"],
        }
    )
    log.info(
        "instances tuned on %d validation images: seed threshold %s, speck fraction %s "
        "(mean F1@0.5 %.4f; defaults %.4f)",
        len(pairs),
        chosen.seed_threshold,
        chosen.min_area_fraction,
        best["mean_f1"],
        table[0]["mean_f1"],
    )
    return chosen, table
