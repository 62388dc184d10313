"""Whole-image normalisation: exact histogram percentiles, bounded memory, tile application."""

from __future__ import annotations

import numpy as np
import pytest

from service.inference.modelmeta import Normalization
from service.inference.normalize import compute_intensity_stats, normalize_image


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_histogram_percentiles_match_numpy(dtype: type) -> None:
    rng = np.random.default_rng(0)
    image = rng.gamma(2.0, 300.0, (300, 200, 1)).clip(0, np.iinfo(dtype).max).astype(dtype)
    spec = Normalization(low=1.0, high=99.8)
    stats = compute_intensity_stats(image, spec)
    lo, hi = np.percentile(image, [1.0, 99.8], method="inverted_cdf")
    assert stats.offset[0] == lo and stats.scale[0] == pytest.approx(hi - lo)


def test_float_images_use_numpy_percentiles() -> None:
    image = np.random.default_rng(1).normal(5, 2, (100, 100, 1)).astype(np.float32)
    stats = compute_intensity_stats(image, Normalization(low=2, high=98))
    lo, hi = np.percentile(image.astype(np.float64), [2, 98], method="inverted_cdf")
    assert stats.offset[0] == pytest.approx(lo) and stats.scale[0] == pytest.approx(hi - lo)


def test_per_channel_and_constant_images() -> None:
    image = np.zeros((10, 10, 3), np.uint8)
    image[..., 1] = 7
    image[:5, :, 2] = 200
    stats = compute_intensity_stats(image, Normalization())
    assert stats.offset.tolist() == [0.0, 7.0, 0.0]
    assert stats.scale[0] > 0 and stats.scale[1] > 0  # constant channels do not divide by zero
    assert stats.scale[2] == 200.0


def test_apply_matches_whole_image_normalisation() -> None:
    image = np.random.default_rng(2).integers(0, 4000, (64, 48, 1)).astype(np.uint16)
    spec = Normalization()
    whole = normalize_image(image, spec)
    stats = compute_intensity_stats(image, spec)
    tile = stats.apply(image[10:30, 5:40])
    assert tile.dtype == np.float32
    np.testing.assert_array_equal(tile, whole[10:30, 5:40])
    # The 1st and 99.8th percentiles land near 0 and 1.
    assert -0.05 < np.percentile(whole, 1) < 0.05 and 0.95 < np.percentile(whole, 99.8) < 1.05


def test_scale_method() -> None:
    image = np.full((4, 4, 1), 255, np.uint8)
    out = normalize_image(image, Normalization(method="scale", scale=255.0))
    assert np.all(out == 1.0)
