"""Per-class IoU and Dice from one confusion matrix.

As in ``segmentation_models.pytorch``'s ``metrics/functional.py``: the counts ``tp, fp, fn, tn``
are computed once per image (:func:`get_stats`) and the scores derived from them with explicit
reductions. Counts add up (``stats_a + stats_b``), so a data set is scored over all its pixels
by summing per-image counts, without holding every pixel in memory.
A class absent from both prediction and truth has no defined score: it is ``None`` (JSON
``null``), never 0 or 1, and the mean runs over the classes that are present.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

_ROWS_PER_CHUNK = 1024  # bounded int64 temporaries on gigapixel masks


@dataclass(frozen=True)
class Stats:
    """Per-class pixel counts, each of shape ``(K,)``, int64."""

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    tn: np.ndarray

    def __add__(self, other: Stats) -> Stats:
        """The counts of both sets of pixels together (same classes)."""
        return Stats(
            tp=self.tp + other.tp,
            fp=self.fp + other.fp,
            fn=self.fn + other.fn,
            tn=self.tn + other.tn,
        )


def total_stats(stats: Iterable[Stats]) -> Stats:
    """The sum of per-image counts: the micro reduction over a data set."""
    return functools.reduce(operator.add, stats)


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """``(K, K)`` counts, rows the true class and columns the predicted class.

    Both inputs are integer class-index maps of the same shape with values in ``[0, K)``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in shape")
    k = num_classes
    cm = np.zeros(k * k, np.int64)
    pred2 = pred.reshape(pred.shape[0], -1) if pred.ndim > 1 else pred.reshape(1, -1)
    target2 = target.reshape(pred2.shape)
    for r in range(0, pred2.shape[0], _ROWS_PER_CHUNK):
        t = target2[r : r + _ROWS_PER_CHUNK].astype(np.int64)
        p = pred2[r : r + _ROWS_PER_CHUNK]
        if t.size and (t.min() < 0 or t.max() >= k or p.min() < 0 or p.max() >= k):
            raise ValueError(f"class indices must lie in [0, {k})")
        cm += np.bincount((t * k + p).ravel(), minlength=k * k)
    return cm.reshape(k, k)


def get_stats(pred: np.ndarray, target: np.ndarray, num_classes: int) -> Stats:
    """True/false positives and negatives per class, from one confusion matrix."""
    cm = confusion_matrix(pred, target, num_classes)
    tp = np.diag(cm).copy()
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    tn = cm.sum() - tp - fp - fn
    return Stats(tp=tp, fp=fp, fn=fn, tn=tn)


def _ratio(num: np.ndarray, den: np.ndarray) -> list[float | None]:
    return [None if d == 0 else float(n) / float(d) for n, d in zip(num, den, strict=True)]


def iou_score(stats: Stats) -> list[float | None]:
    """Per-class intersection over union, ``tp / (tp + fp + fn)``; ``None`` for absent classes."""
    return _ratio(stats.tp, stats.tp + stats.fp + stats.fn)


def dice_score(stats: Stats) -> list[float | None]:
    """Per-class Dice (F1), ``2 tp / (2 tp + fp + fn)``; ``None`` for absent classes."""
    return _ratio(2 * stats.tp, 2 * stats.tp + stats.fp + stats.fn)


def mean_present(scores: list[float | None]) -> float | None:
    """Mean over the classes that have a score (present in prediction or truth)."""
    present = [s for s in scores if s is not None]
    return float(np.mean(present)) if present else None


@dataclass(frozen=True)
class SegmentationScores:
    """Per-class scores keyed by class name, and their means over present classes."""

    iou: dict[str, float | None]
    dice: dict[str, float | None]
    mean_iou: float | None
    mean_dice: float | None
    pixels: dict[str, dict[str, int]]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dataclasses.asdict(self)


def score_segmentation(
    pred: np.ndarray, target: np.ndarray, class_names: list[str]
) -> SegmentationScores:
    """IoU and Dice per named class for class-index maps ``pred`` and ``target``."""
    return scores_from_stats(get_stats(pred, target, len(class_names)), class_names)


def scores_from_stats(stats: Stats, class_names: list[str]) -> SegmentationScores:
    """IoU and Dice per named class from counts (one image's, or a sum of them)."""
    iou, dice = iou_score(stats), dice_score(stats)
    return SegmentationScores(
        iou=dict(zip(class_names, iou, strict=True)),
        dice=dict(zip(class_names, dice, strict=True)),
        mean_iou=mean_present(iou),
        mean_dice=mean_present(dice),
        pixels={
            name: {"tp": int(stats.tp[i]), "fp": int(stats.fp[i]), "fn": int(stats.fn[i])}
            for i, name in enumerate(class_names)
        },
    )
