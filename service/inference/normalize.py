"""Whole-image intensity normalisation, computed once and applied tile by tile.

Statistics come from the whole image (per-tile normalisation makes seams), yet a large image is
never copied to float: integer images use an exact histogram (65 536 bins at most), float images a
strided sample of at most ``_MAX_SAMPLES`` pixels. Tiles are converted to float32 only when they
are about to enter the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.inference.modelmeta import Normalization

_MAX_SAMPLES = 1 << 22  # 4 Mpixel sample for float images: percentiles within ~0.05 %
_EPS = 1e-6
HIST_CHUNK_PIXELS = 1 << 22  # pixels per np.bincount call: a 32 MiB int64 transient at most


@dataclass(frozen=True)
class IntensityStats:
    """Per-channel offset and scale: ``normalised = (x - offset) / scale``."""

    offset: np.ndarray  # (C,) float32
    scale: np.ndarray  # (C,) float32

    def apply(self, tiles: np.ndarray) -> np.ndarray:
        """Normalise a tile batch ``(..., C)`` of any dtype to float32."""
        out = tiles.astype(np.float32, copy=True)
        out -= self.offset
        out /= self.scale
        return out


def histogram(values: np.ndarray, bins: int) -> np.ndarray:
    """``np.bincount`` of a non-negative integer array, first ``bins`` counts (int64), summed
    over row chunks: bincount converts its input to int64 first (8 bytes per pixel, 2 GiB for
    a 16384^2 image), so at most ~HIST_CHUNK_PIXELS pixels are converted at a time."""
    counts = np.zeros(bins, np.int64)
    if values.size == 0:
        return counts
    row_pixels = max(1, values.size // max(1, values.shape[0]))
    rows = max(1, HIST_CHUNK_PIXELS // row_pixels)
    for start in range(0, values.shape[0], rows):
        counts += np.bincount(values[start : start + rows].ravel(), minlength=bins)[:bins]
    return counts


def _percentiles_of_channel(channel: np.ndarray, qs: tuple[float, float]) -> tuple[float, float]:
    """Percentiles ``qs`` (0-100) of one channel without a full-size float copy."""
    if channel.dtype == np.bool_:
        channel = channel.view(np.uint8)
    if channel.dtype in (np.uint8, np.uint16):
        bins = 1 << (8 * channel.dtype.itemsize) if channel.size else 1
        counts = histogram(channel, bins)
        cdf = np.cumsum(counts, dtype=np.int64)
        total = int(cdf[-1])
        out = []
        for q in qs:
            # Same convention as np.percentile(method="inverted_cdf"): the smallest value whose
            # cumulative count reaches q % of the pixels.
            rank = max(1, int(np.ceil(q / 100.0 * total)))
            out.append(float(np.searchsorted(cdf, rank)))
        return out[0], out[1]
    flat = channel.ravel()
    if flat.size > _MAX_SAMPLES:
        flat = flat[:: flat.size // _MAX_SAMPLES + 1]
    flat = flat[np.isfinite(flat)] if flat.dtype.kind == "f" else flat
    if flat.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(flat.astype(np.float64), qs, method="inverted_cdf")
    return float(lo), float(hi)


def compute_intensity_stats(image: np.ndarray, spec: Normalization) -> IntensityStats:
    """Offset and scale for an ``(H, W, C)`` image, per channel, as ``spec`` prescribes."""
    if image.ndim != 3:
        raise ValueError(f"expected an (H, W, C) image, got shape {image.shape}")
    channels = image.shape[2]
    if spec.method == "scale":
        return IntensityStats(
            offset=np.zeros(channels, np.float32), scale=np.full(channels, spec.scale, np.float32)
        )
    offsets, scales = [], []
    for c in range(channels):
        lo, hi = _percentiles_of_channel(image[..., c], (spec.low, spec.high))
        offsets.append(lo)
        scales.append(max(hi - lo, _EPS))
    return IntensityStats(
        offset=np.asarray(offsets, np.float32), scale=np.asarray(scales, np.float32)
    )


def normalize_image(image: np.ndarray, spec: Normalization) -> np.ndarray:
    """Whole image to float32 in one go: for training patches and small images only."""
    return compute_intensity_stats(image, spec).apply(image)
