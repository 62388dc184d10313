"""Touching objects as separate instances: a seeded watershed over the model's foreground, run in
strips of rows so that memory stays bounded on any image, with labels unique across the seams.

A model that gives instances (:class:`~service.inference.modelmeta.Instances`) marks each
pixel as background, foreground or core (an object's interior, away from the edges it shares
with its neighbours). The per-pixel codes (:data:`BACKGROUND`, :data:`FOREGROUND`, :data:`CORE`)
become labels in four passes over strips of rows:

1. cores: connected components per strip, joined across strip seams (union-find), one id each;
2. growth: each strip, with a halo of rows above and below, gives every foreground pixel the id
   of its nearest core in the same foreground component (a Euclidean feature transform, as
   scikit-image's ``expand_labels``, where a component holds several cores), so touching nuclei
   part half-way between their cores; only the strip's own rows are written;
3. foreground components without a core (objects the model found no core in) become objects
   too, joined across seams the same way;
4. specks (objects under ``min_area`` pixels) are dropped and the ids made consecutive 1..N.

The halo is a few object diameters: a pixel's core lies within its own object, so the strips
give the labels the whole image would (tested on objects across seams).
Only NumPy and SciPy; no framework.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

BACKGROUND, FOREGROUND, CORE = 0, 1, 2

# Rows x width of one strip's working window: its feature transform (2 int32 indices per
# pixel) and component labels stay within some tens of MB whatever the image.
WINDOW_PIXELS = 2_000_000
_CROSS = ndimage.generate_binary_structure(2, 1)  # 4-connected: diagonal touches part objects


class _UnionFind:
    """Equivalences between provisional ids (those that meet across a strip seam)."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, a: int) -> int:
        root = a
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while self.parent.get(a, a) != root:  # path compression
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def lut(self, size: int) -> np.ndarray:
        """Provisional id -> consecutive final id (0 stays 0), ``size`` provisional ids."""
        roots = np.arange(size, dtype=np.int64)
        for a in list(self.parent):
            roots[a] = self.find(a)
        _, final = np.unique(roots, return_inverse=True)
        return final.astype(np.uint32)  # id 0 is its own root and the smallest: stays 0


def strip_rows(width: int, halo: int = 0) -> int:
    """Rows per strip so that a strip and its halos hold about :data:`WINDOW_PIXELS`."""
    return max(64, WINDOW_PIXELS // max(width, 1) - 2 * halo)


def _strips(height: int, rows: int) -> Iterator[tuple[int, int]]:
    for top in range(0, height, rows):
        yield top, min(top + rows, height)


def _components(select: np.ndarray, labels: np.ndarray, first_id: int, rows: int) -> int:
    """Label the connected components of ``select`` into ``labels`` (where it is set), ids
    from ``first_id`` on, strip by strip and joined across seams. Returns the next free id."""
    height = select.shape[0]
    union = _UnionFind()
    next_id = first_id
    for top, bottom in _strips(height, rows):
        part, found = ndimage.label(select[top:bottom], structure=_CROSS)
        if found:
            part = part.astype(np.uint32)
            part[part > 0] += np.uint32(next_id - 1)
            np.copyto(labels[top:bottom], part, where=part > 0)
            next_id += found
        if top:  # join with the row above the seam
            above, below = labels[top - 1], labels[top]
            both = select[top - 1] & select[top]
            for a, b in set(zip(above[both].tolist(), below[both].tolist(), strict=True)):
                union.union(a, b)
    if union.parent:
        # ids below first_id (an earlier pass's) are roots of their own and keep their value
        lut = union.lut(next_id)
        for top, bottom in _strips(height, rows):
            part = labels[top:bottom]
            new = part >= first_id
            part[new] = lut[part[new]]
        next_id = int(lut.max()) + 1
    return next_id


def _grow(codes: np.ndarray, labels: np.ndarray, halo: int, rows: int) -> None:
    """Give each foreground pixel of ``codes`` the id (in ``labels``) of its nearest core within
    the same foreground component, strip by strip.

    Most components hold one core (a nucleus apart from the others): all their pixels take its
    id, with no distances to compute. A feature transform runs only over the box of each
    component that holds several (touching nuclei), from that component's own cores."""
    height = codes.shape[0]
    for top, bottom in _strips(height, rows):
        lo, hi = max(0, top - halo), min(height, bottom + halo)
        window = codes[lo:hi]
        core = window == CORE
        if not core.any():
            continue
        parts, count = ndimage.label(window != BACKGROUND, structure=_CROSS)
        ids = labels[lo:hi]
        # The lowest and highest core id in each component: equal where it holds one core.
        first = np.full(count + 1, np.iinfo(np.uint32).max, np.uint32)
        last = np.zeros(count + 1, np.uint32)
        in_part, core_ids = parts[core], ids[core]
        np.minimum.at(first, in_part, core_ids)
        np.maximum.at(last, in_part, core_ids)
        own = slice(top - lo, bottom - lo)
        single = np.where(first == last, last, np.uint32(0))
        grown = single[parts[own]]
        np.copyto(labels[top:bottom], grown, where=grown > 0)
        boxes = ndimage.find_objects(parts)
        for part in np.flatnonzero(first < last):
            box = boxes[part - 1]
            start, stop = max(box[0].start, own.start), min(box[0].stop, own.stop)
            if start >= stop:  # only in the halo: another strip's
                continue
            member = parts[box] == part
            iy, ix = ndimage.distance_transform_edt(
                ~(member & core[box]), return_distances=False, return_indices=True
            )
            mine = slice(start - box[0].start, stop - box[0].start)
            nearest = ids[box][iy[mine], ix[mine]]
            np.copyto(labels[lo + start : lo + stop, box[1]], nearest, where=member[mine])


def _drop_specks(labels: np.ndarray, count: int, min_area: float, rows: int) -> int:
    """Remove objects under ``min_area`` pixels and renumber the rest 1..N; returns N."""
    areas = np.zeros(count, np.int64)
    for top, bottom in _strips(labels.shape[0], rows):
        areas += np.bincount(labels[top:bottom].ravel(), minlength=count)[:count]
    keep = areas >= min_area
    keep[0] = False
    lut = np.zeros(count, np.uint32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    for top, bottom in _strips(labels.shape[0], rows):
        labels[top:bottom] = lut[labels[top:bottom]]
    return int(keep.sum())


def speck_area(object_diameter: float | None, fraction: float) -> float:
    """The speck rule in pixels: ``fraction`` of a disc of ``object_diameter`` (the objects'
    typical diameter in the image; no rule without one)."""
    if object_diameter is None:
        return 0.0
    return fraction * math.pi / 4.0 * object_diameter**2


def label_instances(
    codes: np.ndarray, *, min_area: float = 0.0, halo: int = 64, rows: int | None = None
) -> tuple[np.ndarray, int]:
    """Instance labels ``(H, W)`` uint32 (0 background, 1..N objects) from per-pixel codes
    ``(H, W)`` uint8 (:data:`BACKGROUND`, :data:`FOREGROUND`, :data:`CORE`), and N.

    ``min_area``: objects smaller than this (pixels) are specks and dropped. ``halo``: rows of
    context around each strip while growing (about two object diameters). ``rows``: rows per
    strip (default: :func:`strip_rows`). Raises :class:`ValueError` on codes outside 0..2.
    """
    if codes.ndim != 2:
        raise ValueError(f"codes must be one (H, W) plane, got shape {codes.shape}")
    if codes.size and codes.max() > CORE:
        raise ValueError(
            f"codes must be 0 (background), 1 (foreground) or 2 (core), got {codes.max()}"
        )
    rows = rows or strip_rows(codes.shape[1], halo)
    labels = np.zeros(codes.shape, np.uint32)
    next_id = _components(codes == CORE, labels, 1, rows)
    _grow(codes, labels, halo, rows)
    unreached = (codes != BACKGROUND) & (labels == 0)
    next_id = _components(unreached, labels, next_id, rows)
    del unreached
    count = _drop_specks(labels, next_id, min_area, rows)
    return labels, count


def codes_from_classes(classes: np.ndarray, seed_class: int) -> np.ndarray:
    """A multiclass model's class map as codes: class 0 background, ``seed_class`` core, the
    other classes foreground."""
    codes = (classes != 0).astype(np.uint8)
    codes[classes == seed_class] = CORE
    return codes


@dataclass(frozen=True)
class ObjectTable:
    """Per object (id 1..N): pixel area, centroid (row, column), bounding box (top, left,
    bottom, right; exclusive ends), equivalent diameter (of the disc of the same area) and
    mean intensity of the segmented image."""

    ids: np.ndarray
    area: np.ndarray
    centroid: np.ndarray  # (N, 2) row, column
    bbox: np.ndarray  # (N, 4) top, left, bottom, right
    mean_intensity: np.ndarray

    @property
    def count(self) -> int:
        """Objects in the table."""
        return int(self.ids.size)

    @property
    def equivalent_diameter(self) -> np.ndarray:
        """The diameter of a disc of each object's area."""
        return np.sqrt(4.0 * self.area / math.pi)

    def rows(self) -> list[dict[str, float | int]]:
        """One plain dict per object, for JSON and CSV."""
        d = self.equivalent_diameter
        return [
            {
                "id": int(self.ids[i]),
                "area": int(self.area[i]),
                "centroid_y": round(float(self.centroid[i, 0]), 2),
                "centroid_x": round(float(self.centroid[i, 1]), 2),
                "bbox_top": int(self.bbox[i, 0]),
                "bbox_left": int(self.bbox[i, 1]),
                "bbox_bottom": int(self.bbox[i, 2]),
                "bbox_right": int(self.bbox[i, 3]),
                "equivalent_diameter": round(float(d[i]), 2),
                "mean_intensity": round(float(self.mean_intensity[i]), 4),
            }
            for i in range(self.count)
        ]


def object_table(labels: np.ndarray, count: int, intensity: np.ndarray) -> ObjectTable:
    """The :class:`ObjectTable` of ``labels`` (``(H, W)``, ids 1..``count``) over the
    ``(H, W)`` ``intensity`` plane, strip by strip."""
    n = count + 1
    height, width = labels.shape
    area = np.zeros(n, np.float64)
    sum_y = np.zeros(n)
    sum_x = np.zeros(n)
    total = np.zeros(n)
    top = np.full(n, height, np.int64)
    left = np.full(n, width, np.int64)
    bottom = np.zeros(n, np.int64)
    right = np.zeros(n, np.int64)
    # A third of the labelling's strip: up to ~40 bytes per object pixel below, within the
    # 16 bytes per window pixel that request_memory counts. Only the objects' pixels are
    # read, and only the boxes of the objects in the strip (a 16384² image holds tens of
    # thousands of objects, each in a few strips).
    rows = max(1, strip_rows(width) // 3)
    for y0, y1 in _strips(height, rows):
        part = labels[y0:y1]
        at = np.flatnonzero(part)
        if not at.size:
            continue
        ids = part.ravel()[at]
        ys, xs = np.divmod(at, width)
        counts = np.bincount(ids, minlength=n)[:n]
        area += counts
        sum_y += np.bincount(ids, ys + y0, minlength=n)[:n]
        sum_x += np.bincount(ids, xs, minlength=n)[:n]
        total += np.bincount(ids, intensity[y0:y1].ravel()[at].astype(np.float64), minlength=n)[:n]
        here = np.flatnonzero(counts)
        boxes = ndimage.find_objects(part, max_label=int(here[-1]))
        edges = np.array(
            [(b[0].start, b[0].stop, b[1].start, b[1].stop) for b in (boxes[i - 1] for i in here)],
            np.int64,
        )
        top[here] = np.minimum(top[here], edges[:, 0] + y0)
        bottom[here] = np.maximum(bottom[here], edges[:, 1] + y0)
        left[here] = np.minimum(left[here], edges[:, 2])
        right[here] = np.maximum(right[here], edges[:, 3])
    present = np.flatnonzero(area[1:]) + 1
    a = area[present]
    return ObjectTable(
        ids=present.astype(np.int64),
        area=a.astype(np.int64),
        centroid=np.stack([sum_y[present] / a, sum_x[present] / a], axis=1)
        if present.size
        else np.zeros((0, 2)),
        bbox=np.stack([top[present], left[present], bottom[present], right[present]], axis=1)
        if present.size
        else np.zeros((0, 4), np.int64),
        mean_intensity=total[present] / a if present.size else np.zeros(0),
    )
