"""Object size: rescale an image to the model's training scale, and its result back.

A U-Net learns objects at the size its training data showed them (``object_diameter`` in the
model's metadata, the median equivalent-circle diameter in pixels). Given the diameter of the
objects in a sent image, the image is resampled by ``factor = object_diameter / diameter``
before it is tiled, and the blended probabilities are resampled back to the exact original
``(H, W)`` before they are thresholded or arg-maxed, so the mask always has the image's shape.

Resampling is separable linear interpolation on pixel centres (as Pillow's ``BILINEAR``): plain
linear interpolation when enlarging; when shrinking, the linear kernel is widened to the scale
(a triangle ``1/factor`` pixels wide) so that every input pixel contributes and small
structures are not aliased away. Memory stays bounded: the image is resampled in row chunks,
and the probabilities are resampled back strip by strip as the tiler finishes them
(:class:`StripResampler`), so no full-size probability map is ever held.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from service.inference.modelmeta import ModelMetadata

MIN_FACTOR = 0.1  # shrink at most 10x ...
MAX_FACTOR = 10.0  # ... and enlarge at most 10x (100x the pixels)
SKIP_TOLERANCE = 0.05  # factors within 1 +- this are not worth a resampling: the image is kept
RESAMPLE_CHUNK_BYTES = 1 << 25  # float32 temporaries of one chunk of rows (32 MiB)


class ScaleError(ValueError):
    """A diameter that the model cannot rescale to; ``message`` says why and what would do."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def diameter_range(meta: ModelMetadata) -> tuple[float, float] | None:
    """The diameters (pixels) a request may give for this model; None when it has no training
    scale."""
    if meta.object_diameter is None:
        return None
    return meta.object_diameter / MAX_FACTOR, meta.object_diameter / MIN_FACTOR


def scale_factor(meta: ModelMetadata, diameter: float, name: str | None = None) -> float:
    """``object_diameter / diameter``, or a :class:`ScaleError` naming the model (``name``, the
    name it is served under; default its metadata's) and the diameters it takes."""
    name = meta.name if name is None else name
    if meta.object_diameter is None:
        raise ScaleError(
            f"model {name!r} has no training scale (no object_diameter in its metadata), so it "
            f"cannot rescale images to diameter={diameter:g}; segment without diameter, or "
            "use a model exported with its training data's object diameter"
        )
    if not (math.isfinite(diameter) and diameter > 0):
        raise ScaleError(f"diameter must be a positive number of pixels, got {diameter!r}")
    factor = meta.object_diameter / diameter
    if not MIN_FACTOR <= factor <= MAX_FACTOR:
        lo, hi = meta.object_diameter / MAX_FACTOR, meta.object_diameter / MIN_FACTOR
        raise ScaleError(
            f"diameter={diameter:g} px would rescale the image by {factor:.4g}: model {name!r} "
            f"was trained on objects of {meta.object_diameter:g} px and rescales by "
            f"{MIN_FACTOR:g} to {MAX_FACTOR:g}, so diameter must lie between {lo:g} and "
            f"{hi:g} px"
        )
    return factor


@dataclass(frozen=True)
class ScalePlan:
    """How one ``height x width`` image is rescaled for a requested ``diameter``."""

    diameter: float
    model_diameter: float
    factor: float  # model_diameter / diameter, as asked
    height: int
    width: int
    scaled_height: int  # what the model runs on (the image's own size when not resampled)
    scaled_width: int

    @property
    def resampled(self) -> bool:
        """Whether the image is resampled at all (not when the factor is within
        :data:`SKIP_TOLERANCE` of 1, or too small to change the size in pixels)."""
        return (self.scaled_height, self.scaled_width) != (self.height, self.width)

    @property
    def applied(self) -> float:
        """The factor really applied: ``factor``, or 1 when the image was not resampled."""
        return self.factor if self.resampled else 1.0

    @property
    def scaled_pixels(self) -> int:
        """Pixels of the image the model runs on."""
        return self.scaled_height * self.scaled_width


def plan_scale(
    meta: ModelMetadata, diameter: float, height: int, width: int, name: str | None = None
) -> ScalePlan:
    """The rescaling of a ``height x width`` image whose objects are ``diameter`` pixels across:
    each side times the factor, rounded half up (at least 1 pixel); no resampling for factors within
    ``1 +- SKIP_TOLERANCE``. Raises :class:`ScaleError` as :func:`scale_factor`."""
    factor = scale_factor(meta, diameter, name)
    assert meta.object_diameter is not None  # scale_factor refused it otherwise
    if abs(factor - 1.0) <= SKIP_TOLERANCE:
        scaled = (height, width)
    else:
        scaled = (
            max(1, math.floor(height * factor + 0.5)),
            max(1, math.floor(width * factor + 0.5)),
        )
    return ScalePlan(diameter, meta.object_diameter, factor, height, width, *scaled)


# --- resampling --------------------------------------------------------------------------------


def linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights, each ``(n_out, T)``, of a linear resampling of an axis of
    ``n_in`` pixels to ``n_out``: pixel centres aligned (output pixel ``i`` is centred at
    ``(i + 0.5) * n_in / n_out`` in input pixels), a triangle kernel of radius
    ``max(n_in / n_out, 1)`` input pixels, weights renormalised at the borders. The identity
    when ``n_in == n_out``."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"axes must have at least one pixel, got {n_in} -> {n_out}")
    scale = n_in / n_out
    support = max(scale, 1.0)
    centre = (np.arange(n_out, dtype=np.float64) + 0.5) * scale
    first = np.floor(centre - support - 0.5).astype(np.int64)
    idx = first[:, None] + np.arange(math.ceil(2 * support) + 2)
    weights = 1.0 - np.abs((idx + 0.5 - centre[:, None]) / support)
    np.clip(weights, 0.0, None, out=weights)
    weights[(idx < 0) | (idx >= n_in)] = 0.0
    weights /= weights.sum(axis=1, keepdims=True)
    used = weights.any(axis=0)
    return np.clip(idx[:, used], 0, n_in - 1), weights[:, used].astype(np.float32)


def _resample_axis(src: np.ndarray, idx: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    """``src`` resampled along ``axis`` (0 or 1) with taps from :func:`linear_taps`, float32.

    Holds three arrays of the output's size at once: one gathered tap (in ``src``'s dtype),
    its weighted float32 copy and the sum.
    """
    shape = list(src.shape)
    shape[axis] = idx.shape[0]
    out = np.zeros(shape, np.float32)
    weighted = np.empty(shape, np.float32)
    w_shape = [1] * src.ndim
    w_shape[axis] = idx.shape[0]
    for t in range(idx.shape[1]):
        np.multiply(np.take(src, idx[:, t], axis=axis), weights[:, t].reshape(w_shape), weighted)
        out += weighted
    return out


def _rows_per_chunk(row_bytes: int) -> int:
    return max(1, RESAMPLE_CHUNK_BYTES // max(1, row_bytes))


def resize_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """An ``(H, W, C)`` image linearly resampled to ``shape`` ``(h, w)``, in row chunks.

    Integer images keep their dtype (values rounded; linear weights never leave the input's
    range), anything else becomes float32: an enlarged 8-bit image costs 1 byte a pixel, not 4.
    """
    if image.ndim != 3:
        raise ValueError(f"expected an (H, W, C) image, got shape {image.shape}")
    height, width, channels = image.shape
    out_h, out_w = shape
    integer = image.dtype.kind in "ui"
    out = np.empty((out_h, out_w, channels), image.dtype if integer else np.float32)
    row_idx, row_w = linear_taps(height, out_h)
    col_idx, col_w = linear_taps(width, out_w)
    rows = _rows_per_chunk(4 * channels * 3 * (width + out_w))
    for r0 in range(0, out_h, rows):
        r1 = min(out_h, r0 + rows)
        part = _resample_axis(image, row_idx[r0:r1], row_w[r0:r1], axis=0)
        part = _resample_axis(part, col_idx, col_w, axis=1)
        if integer:
            np.rint(part, out=part)
        out[r0:r1] = part
    return out


class StripResampler:
    """Resamples a ``(h, w, K)`` probability map that arrives as consecutive strips of rows (the
    tiler's finished strips, in order) to ``(H, W, K)``, and hands each chunk of resampled rows
    to ``finish`` (threshold, argmax): a tiler ``reduce`` that changes the number of rows.

    Each call returns the finished output rows that the rows received so far determine
    (possibly none); the call that completes the ``h`` rows returns all the rest. Only the
    strip, the few source rows the next output rows still need and one chunk of output rows
    are held, never a whole probability map.
    """

    def __init__(
        self,
        src_shape: tuple[int, int],
        dst_shape: tuple[int, int],
        finish: Callable[[np.ndarray], np.ndarray],
    ) -> None:
        (self.src_h, self.src_w), (self.dst_h, self.dst_w) = src_shape, dst_shape
        self.finish = finish
        self.row_idx, self.row_w = linear_taps(self.src_h, self.dst_h)
        self.col_idx, self.col_w = linear_taps(self.src_w, self.dst_w)
        self.last_needed = self.row_idx.max(axis=1)  # non-decreasing
        self.first_needed = self.row_idx.min(axis=1)
        self.received = 0  # source rows seen
        self.done = 0  # output rows returned
        self.buffer: np.ndarray | None = None  # column-resampled source rows from buffer_top on
        self.buffer_top = 0

    def __call__(self, strip: np.ndarray) -> np.ndarray:
        n, k = strip.shape[0], strip.shape[2]
        keep = 0 if self.buffer is None else self.buffer.shape[0]
        buffer = np.empty((keep + n, self.dst_w, k), np.float32)
        if self.buffer is not None:
            buffer[:keep] = self.buffer
        rows = _rows_per_chunk(4 * k * 3 * self.dst_w)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            buffer[keep + r0 : keep + r1] = _resample_axis(
                strip[r0:r1], self.col_idx, self.col_w, axis=1
            )
        self.received += n
        ready = (
            self.dst_h
            if self.received >= self.src_h
            else int(np.searchsorted(self.last_needed, self.received, side="left"))
        )
        empty = self.finish(np.zeros((0, self.dst_w, k), np.float32))
        out = np.empty((ready - self.done, *empty.shape[1:]), empty.dtype)
        rows = _rows_per_chunk(4 * k * 3 * self.dst_w + 9 * self.dst_w)  # + argmax, bools
        for y0 in range(self.done, ready, rows):
            y1 = min(ready, y0 + rows)
            part = _resample_axis(
                buffer, self.row_idx[y0:y1] - self.buffer_top, self.row_w[y0:y1], axis=0
            )
            out[y0 - self.done : y1 - self.done] = self.finish(part)
        self.done = ready
        start = int(self.first_needed[ready]) if ready < self.dst_h else self.received
        self.buffer = buffer[start - self.buffer_top :].copy()
        self.buffer_top = start
        return out


def taps_rows(n_in: int, n_out: int) -> int:
    """Source rows one output row of a :func:`linear_taps` resampling reads, at most."""
    return math.ceil(2 * max(n_in / n_out, 1.0)) + 2


def rescale_bytes(
    plan: ScalePlan, channels: int, sample_bytes: int, classes: int, tile: int
) -> int:
    """An upper bound of the memory a rescaled request holds beyond an unscaled one, term by
    term: the resampled image (``sample_bytes`` per channel sample, 4 at most), one chunk of
    resampling temporaries, the back-resampler's column-resampled strip and the rows kept from
    the previous one (twice: the new buffer beside the old), and the finished uint8 rows one
    strip gives back (many when the image was shrunk). 0 when the image is not resampled.

    The tiler's strips are ``tile`` rows of the *resampled* width: the caller counts those with
    the resampled width in place of the image's.
    """
    if not plan.resampled:
        return 0
    h, w, sh, sw = plan.height, plan.width, plan.scaled_height, plan.scaled_width
    c, k = channels, classes
    image = sh * sw * c * min(max(sample_bytes, 1), 4)
    chunk = max(
        RESAMPLE_CHUNK_BYTES,
        4 * c * 3 * (w + sw),  # one row of resize_image
        4 * k * 3 * w + 9 * w,  # one row of StripResampler
    )
    strip_rows = min(tile, sh) + taps_rows(sh, h)
    back = 2 * 4 * k * w * strip_rows
    out_rows = math.ceil(strip_rows * h / sh) + 1
    return image + chunk + back + out_rows * w
