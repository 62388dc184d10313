"""Object-level scores: predicted objects matched one-to-one to true ones by IoU.

As StarDist's ``matching`` module: a true and a predicted object match when their IoU is at
least the threshold, each object at most once. For thresholds of 0.5 and more, matching
greedily by descending IoU is the optimal one-to-one matching: an object can overlap at most
one other object by more than half of their union. Lower thresholds are refused rather than
answered by a matching that is not optimal.

Counts (TP, FP, FN and the summed IoU of the matches) are computed once per image and
threshold (:func:`match_counts`); every score is derived from counts with an explicit
reduction, so a data set's scores are those of its summed counts (as StarDist's
``matching_dataset``), not a mean of per-image ratios.

- precision TP / (TP + FP), recall TP / (TP + FN), F1 2TP / (2TP + FP + FN);
- AP at a threshold as in the 2018 Data Science Bowl and the StarDist paper: TP / (TP + FP + FN);
  the DSB's score is its mean over IoU 0.5, 0.55, ..., 0.95;
- mean matched IoU: the IoU of the matches, averaged (at 0.5).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

DSB_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
_ROWS = 1 << 22  # pixels per chunk while counting overlaps
# A predicted object cut by the border is left out of the labelled-only scores when under
# this fraction of it lies on true objects (:func:`unlabelled_at_border`).
LABELLED = 0.2


@dataclass(frozen=True)
class Overlaps:
    """Every pair of overlapping objects of one image: true id, predicted id, shared pixels,
    with both images' object areas; computed once, matched at any threshold."""

    true_ids: np.ndarray
    pred_ids: np.ndarray
    intersection: np.ndarray
    true_areas: np.ndarray  # indexed by id (0 unused)
    pred_areas: np.ndarray

    @property
    def n_true(self) -> int:
        """True objects (ids with at least one pixel)."""
        return int(np.count_nonzero(self.true_areas[1:]))

    @property
    def n_pred(self) -> int:
        """Predicted objects."""
        return int(np.count_nonzero(self.pred_areas[1:]))

    @property
    def iou(self) -> np.ndarray:
        """IoU of each overlapping pair."""
        union = self.true_areas[self.true_ids] + self.pred_areas[self.pred_ids] - self.intersection
        return self.intersection / union

    def without_predicted(self, ids: np.ndarray) -> Overlaps:
        """These overlaps as if the predicted objects ``ids`` had not been predicted."""
        keep = ~np.isin(self.pred_ids, ids)
        areas = self.pred_areas.copy()
        areas[ids] = 0
        return replace(
            self,
            true_ids=self.true_ids[keep],
            pred_ids=self.pred_ids[keep],
            intersection=self.intersection[keep],
            pred_areas=areas,
        )


def overlaps(true: np.ndarray, pred: np.ndarray) -> Overlaps:
    """The overlapping pairs of two label images of the same shape (0 is background)."""
    if true.shape != pred.shape:
        raise ValueError(f"label images differ in shape: true {true.shape}, predicted {pred.shape}")
    t_flat, p_flat = true.reshape(-1), pred.reshape(-1)
    t_max = int(t_flat.max(initial=0))
    p_max = int(p_flat.max(initial=0))
    t_areas = np.zeros(t_max + 1, np.int64)
    p_areas = np.zeros(p_max + 1, np.int64)
    pairs: dict[int, int] = {}
    for start in range(0, t_flat.size, _ROWS):
        t = t_flat[start : start + _ROWS].astype(np.int64)
        p = p_flat[start : start + _ROWS].astype(np.int64)
        t_areas += np.bincount(t, minlength=t_max + 1)
        p_areas += np.bincount(p, minlength=p_max + 1)
        both = (t > 0) & (p > 0)
        keys, counts = np.unique(t[both] * (p_max + 1) + p[both], return_counts=True)
        for key, count in zip(keys.tolist(), counts.tolist(), strict=True):
            pairs[key] = pairs.get(key, 0) + count
    keys_arr = np.fromiter(pairs.keys(), np.int64, len(pairs))
    return Overlaps(
        true_ids=keys_arr // (p_max + 1),
        pred_ids=keys_arr % (p_max + 1),
        intersection=np.fromiter(pairs.values(), np.int64, len(pairs)),
        true_areas=t_areas,
        pred_areas=p_areas,
    )


def unlabelled_at_border(
    true: np.ndarray, pred: np.ndarray, labelled: float = LABELLED
) -> np.ndarray:
    """Ids of the predicted objects that the image border cuts and of which under ``labelled``
    of the area carries a true label: objects a reference that leaves out cut nuclei (the Cell
    Tracking Challenge's, cells3d's) cannot score, whatever they are.

    Removing them from ``pred`` scores a model against such a reference only where it labels,
    as the Challenge's own SEG measure does by ignoring unmatched predictions altogether.
    """
    if true.shape != pred.shape or pred.ndim != 2:
        raise ValueError(
            f"expected two (H, W) label images of one shape, got true {true.shape}, "
            f"predicted {pred.shape}"
        )
    return _unlabelled_cut(overlaps(true, pred), pred, labelled)


def _unlabelled_cut(pairs: Overlaps, pred: np.ndarray, labelled: float = LABELLED) -> np.ndarray:
    """:func:`unlabelled_at_border` from the image's overlaps (each predicted object's pixels
    on true objects are its overlaps summed) and ``pred``'s border pixels."""
    edge = np.concatenate([pred[0], pred[-1], pred[:, 0], pred[:, -1]])
    cut = np.unique(edge[edge > 0])
    if not cut.size:
        return cut
    on_truth = np.bincount(pairs.pred_ids, pairs.intersection, pairs.pred_areas.size)
    return cut[on_truth[cut] < labelled * pairs.pred_areas[cut]]


@dataclass(frozen=True)
class MatchCounts:
    """One image's (or, summed, a data set's) matches at one IoU threshold."""

    tp: int
    fp: int
    fn: int
    matched_iou: float  # the IoUs of the matches, summed

    def __add__(self, other: MatchCounts) -> MatchCounts:
        return MatchCounts(
            self.tp + other.tp,
            self.fp + other.fp,
            self.fn + other.fn,
            self.matched_iou + other.matched_iou,
        )


def match_counts(pairs: Overlaps, threshold: float = 0.5) -> MatchCounts:
    """Match one-to-one at IoU ``threshold`` (>= 0.5) and count."""
    if not 0.5 <= threshold < 1.0:
        raise ValueError(f"IoU threshold must be in [0.5, 1), got {threshold}")
    iou = pairs.iou
    order = np.argsort(-iou, kind="stable")
    used_t: set[int] = set()
    used_p: set[int] = set()
    total = 0.0
    for i in order[iou[order] >= threshold].tolist():
        t, p = int(pairs.true_ids[i]), int(pairs.pred_ids[i])
        if t in used_t or p in used_p:
            continue
        used_t.add(t)
        used_p.add(p)
        total += float(iou[i])
    tp = len(used_t)
    return MatchCounts(tp, pairs.n_pred - tp, pairs.n_true - tp, total)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


@dataclass(frozen=True)
class ObjectScores:
    """Object-level scores from summed counts: at IoU 0.5, and AP at each DSB threshold. A
    ratio whose denominator is 0 (no objects on either side) is None."""

    n_true: int
    n_pred: int
    tp: int
    fp: int
    fn: int
    precision: float | None
    recall: float | None
    f1: float | None
    mean_matched_iou: float | None
    ap: dict[float, float | None]  # threshold -> TP / (TP + FP + FN)

    @property
    def ap50(self) -> float | None:
        """AP at IoU 0.5."""
        return self.ap[0.5]

    @property
    def mean_ap(self) -> float | None:
        """The 2018 Data Science Bowl score: AP averaged over IoU 0.5:0.95."""
        values = [v for v in self.ap.values() if v is not None]
        return sum(values) / len(values) if values else None

    def as_dict(self) -> dict[str, object]:
        """For JSON: counts, scores at 0.5, and the AP curve."""
        return {
            "true_objects": self.n_true,
            "predicted_objects": self.n_pred,
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "mean_matched_iou": self.mean_matched_iou,
            "ap50": self.ap50,
            "mean_ap": self.mean_ap,
            "ap": {f"{t:.2f}": v for t, v in self.ap.items()},
        }


def image_counts(
    true: np.ndarray, pred: np.ndarray, thresholds: Sequence[float] = DSB_THRESHOLDS
) -> dict[float, MatchCounts]:
    """One image's counts at each threshold (the overlaps computed once)."""
    pairs = overlaps(true, pred)
    return {t: match_counts(pairs, t) for t in thresholds}


def image_counts_both(
    true: np.ndarray, pred: np.ndarray, thresholds: Sequence[float] = DSB_THRESHOLDS
) -> tuple[dict[float, MatchCounts], dict[float, MatchCounts], np.ndarray]:
    """:func:`image_counts`, the same without the predicted objects of
    :func:`unlabelled_at_border` (where the reference labels), and those objects' ids, from
    one pass over the pixels (no image-sized copy)."""
    pairs = overlaps(true, pred)
    cut = _unlabelled_cut(pairs, pred)
    kept = pairs.without_predicted(cut)
    return (
        {t: match_counts(pairs, t) for t in thresholds},
        {t: match_counts(kept, t) for t in thresholds},
        cut,
    )


def object_scores(counts: Iterable[dict[float, MatchCounts]]) -> ObjectScores:
    """Scores of images' counts summed per threshold (micro reduction). 0.5 must be one of
    the thresholds."""
    summed: dict[float, MatchCounts] = {}
    for per_image in counts:
        for t, c in per_image.items():
            summed[t] = summed[t] + c if t in summed else c
    at = summed[0.5]
    n_true, n_pred = at.tp + at.fn, at.tp + at.fp
    return ObjectScores(
        n_true=n_true,
        n_pred=n_pred,
        tp=at.tp,
        fp=at.fp,
        fn=at.fn,
        precision=_ratio(at.tp, at.tp + at.fp),
        recall=_ratio(at.tp, at.tp + at.fn),
        f1=_ratio(2 * at.tp, 2 * at.tp + at.fp + at.fn),
        mean_matched_iou=_ratio(at.matched_iou, at.tp),
        ap={t: _ratio(c.tp, c.tp + c.fp + c.fn) for t, c in sorted(summed.items())},
    )
