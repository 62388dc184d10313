"""Sliding-window inference: coverage, blending and exact stitching with known predictors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.onnx_models import build_model
from service.inference.tiling import (
    BlendMode,
    compute_importance_map,
    compute_scan_interval,
    compute_window_starts,
    sliding_window_inference,
)

SIZES = [(1, 1), (1, 7), (3, 500), (500, 3), (31, 33), (64, 64), (65, 64), (130, 257), (301, 173)]


def plus_one(tiles: np.ndarray) -> np.ndarray:
    return tiles + 1.0


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75])
@pytest.mark.parametrize("mode", list(BlendMode))
def test_plus_one_is_stitched_exactly(
    size: tuple[int, int], overlap: float, mode: BlendMode
) -> None:
    rng = np.random.default_rng(sum(size))
    image = rng.random((*size, 2), dtype=np.float32)
    out = sliding_window_inference(image, 64, 3, plus_one, overlap=overlap, mode=mode)
    assert out.shape == image.shape
    np.testing.assert_allclose(out, image + 1.0, rtol=1e-6, atol=1e-6)


def test_constant_blend_is_bit_exact_for_integers() -> None:
    image = np.arange(200 * 150, dtype=np.float32).reshape(200, 150, 1) % 97
    out = sliding_window_inference(image, (48, 32), 4, plus_one, overlap=0.5, mode="constant")
    # Sums of equal integers divided by their count are exact in float32.
    assert np.array_equal(out, image + 1)


def test_every_tile_has_the_roi_shape_and_batches_are_bounded() -> None:
    seen: list[tuple[int, ...]] = []

    def record(tiles: np.ndarray) -> np.ndarray:
        seen.append(tiles.shape)
        return tiles[..., :1] * 0

    sliding_window_inference(np.zeros((5, 1000, 3), np.uint16), 64, 5, record, overlap=0.25)
    assert seen and all(s[1:] == (64, 64, 3) and 1 <= s[0] <= 5 for s in seen)
    # One row of tiles across 1000 px with a 48 px step: ceil((1000 - 64) / 48) + 1 windows.
    assert sum(s[0] for s in seen) == len(compute_window_starts(1000, 64, 48)) == 21


def test_reduce_sees_probabilities_and_output_is_reduced() -> None:
    image = np.linspace(0, 1, 300 * 200, dtype=np.float32).reshape(300, 200, 1)
    mask = sliding_window_inference(
        image,
        64,
        8,
        lambda t: t,
        overlap=0.25,
        reduce=lambda s: (s[..., 0] >= 0.5).astype(np.uint8),
    )
    assert mask.dtype == np.uint8 and mask.shape == (300, 200)
    assert np.array_equal(mask, (image[..., 0] >= 0.5).astype(np.uint8))


def test_output_channels_may_differ_from_input_channels() -> None:
    image = np.random.default_rng(0).random((100, 90, 3), dtype=np.float32)
    out = sliding_window_inference(image, 32, 2, lambda t: t.sum(axis=-1, keepdims=True), 0.5)
    np.testing.assert_allclose(out[..., 0], image.sum(axis=-1), rtol=1e-5)


def test_importance_maps_are_positive_and_peak_in_the_centre() -> None:
    for mode in BlendMode:
        w = compute_importance_map((64, 48), mode)
        assert w.shape == (64, 48) and w.dtype == np.float32
        assert w.min() > 0 and w.max() == pytest.approx(1.0)
        assert w[32, 24] >= w[0, 0]
    gauss = compute_importance_map((64, 64), BlendMode.GAUSSIAN)
    np.testing.assert_allclose(gauss, gauss.T)  # symmetric


def test_window_starts_cover_the_axis() -> None:
    assert compute_window_starts(10, 64, 48) == [0]
    assert compute_window_starts(64, 64, 48) == [0]
    assert compute_window_starts(65, 64, 48) == [0, 1]
    assert compute_window_starts(200, 64, 48) == [0, 48, 96, 136]
    assert compute_scan_interval((64, 64), 0.25) == (48, 48)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"overlap": 1.0}, "overlap must be in"),
        ({"overlap": -0.1}, "overlap must be in"),
        ({"roi_size": 0}, "roi_size must be a positive int"),
        ({"sw_batch_size": 0}, "sw_batch_size must be >= 1"),
    ],
)
def test_bad_arguments_say_what_was_expected(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"roi_size": 32, "sw_batch_size": 2, "predictor": plus_one}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        sliding_window_inference(np.zeros((40, 40, 1), np.float32), **args)  # type: ignore[arg-type]


def test_wrong_image_rank_and_predictor_shape_are_reported() -> None:
    with pytest.raises(ValueError, match=r"expected an \(H, W, C\) image"):
        sliding_window_inference(np.zeros((40, 40), np.float32), 32, 2, plus_one)
    with pytest.raises(ValueError, match="predictor must map"):
        sliding_window_inference(np.zeros((40, 40, 1), np.float32), 32, 2, lambda t: t[:, :16])


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(1, 150),
    width=st.integers(1, 150),
    roi=st.integers(8, 48),
    overlap=st.floats(0.0, 0.9),
    mode=st.sampled_from(list(BlendMode)),
    batch=st.integers(1, 7),
)
def test_property_any_size_and_overlap(
    height: int, width: int, roi: int, overlap: float, mode: BlendMode, batch: int
) -> None:
    image = np.random.default_rng(height * width).random((height, width, 1), dtype=np.float32)
    out = sliding_window_inference(image, roi, batch, plus_one, overlap=overlap, mode=mode)
    np.testing.assert_allclose(out, image + 1.0, rtol=1e-5, atol=1e-5)


def test_onnx_model_tiled_equals_whole_image(tmp_path: Path) -> None:
    """A real fully convolutional ONNX model: tiled inference equals one whole-image pass.

    With a pointwise network the tiles see no context beyond themselves, so the stitched result
    must equal the whole-image result to float precision for any overlap and blending.
    """
    meta = build_model(tmp_path / "m.onnx", classes=["bg", "a", "b"], channels=2, kernel=1)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def predict(tiles: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {name: tiles.astype(np.float32)})[0])

    image = np.random.default_rng(1).random((211, 157, 2), dtype=np.float32)
    whole = predict(image[None])[0]
    for overlap, mode in [(0.0, "constant"), (0.25, "gaussian"), (0.5, "cosine")]:
        tiled = sliding_window_inference(image, meta.tile_size, 4, predict, overlap, mode)
        np.testing.assert_allclose(tiled, whole, atol=2e-6)


def _position_dependent(tiles: np.ndarray) -> np.ndarray:
    """A nonlinear predictor whose output depends on the whole tile (like a CNN's): overlapping
    tiles disagree, so the blend's arithmetic and order show in every bit of the result."""
    mean = tiles.mean(axis=(1, 2, 3), keepdims=True)
    grad = np.cumsum(tiles, axis=1) / (1.0 + np.arange(tiles.shape[1]))[None, :, None, None]
    logits = (tiles - mean) * 0.03 + np.sin(grad[..., :1] * 0.01)
    return np.concatenate([1.0 / (1.0 + np.exp(-logits[..., :1])), np.cos(logits[..., :1])], -1)


@pytest.mark.parametrize("size", [(1, 1), (37, 500), (301, 173), (517, 263)])
@pytest.mark.parametrize("mode", list(BlendMode))
@pytest.mark.parametrize("reduce", ["none", "threshold", "argmax"])
def test_overlapped_path_is_bit_identical_to_the_serial_path(
    size: tuple[int, int], mode: BlendMode, reduce: str
) -> None:
    """Cutting, normalising and blending on helper threads changes nothing, bit for bit: odd
    sizes, every blend mode, with and without a reducer, a last batch that is not full."""
    rng = np.random.default_rng(size[0] * 1000 + size[1])
    image = rng.integers(0, 4096, (*size, 2), dtype=np.uint16)
    reducers = {
        "none": None,
        "threshold": lambda s: (s[..., 0] >= 0.5).astype(np.uint8),
        "argmax": lambda s: np.argmax(s, axis=-1).astype(np.uint8),
    }
    results = [
        sliding_window_inference(
            image,
            64,
            5,
            _position_dependent,
            overlap=0.3,
            mode=mode,
            reduce=reducers[reduce],
            prepare=lambda t: t.astype(np.float32) / 4095.0,
            overlapped=overlapped,
        )
        for overlapped in (False, True)
    ]
    assert results[0].dtype == results[1].dtype
    assert np.array_equal(results[0], results[1])


@pytest.mark.parametrize("fails", ["predictor", "prepare"])
def test_an_error_in_any_stage_reaches_the_caller_and_no_thread_is_left(fails: str) -> None:
    import threading

    calls = {"n": 0}

    def flaky(t: np.ndarray) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError(f"{fails} broke")
        return t.astype(np.float32)

    before = threading.active_count()
    image = np.zeros((300, 300, 1), np.uint8)
    with pytest.raises(RuntimeError, match=f"{fails} broke"):
        sliding_window_inference(
            image,
            32,
            4,
            flaky if fails == "predictor" else plus_one,
            prepare=flaky if fails == "prepare" else None,
            overlapped=True,
        )
    assert threading.active_count() == before
