"""IoU and Dice from the confusion matrix, checked against cases worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from service.inference.scores import (
    confusion_matrix,
    dice_score,
    get_stats,
    iou_score,
    mean_present,
    score_segmentation,
)


def test_hand_computed_binary_case() -> None:
    # truth:      pred:
    # 1 1 0 0     1 0 0 0
    # 1 1 0 0     1 1 1 0
    truth = np.array([[1, 1, 0, 0], [1, 1, 0, 0]])
    pred = np.array([[1, 0, 0, 0], [1, 1, 1, 0]])
    stats = get_stats(pred, truth, 2)
    # foreground: tp 3, fp 1, fn 1; background: tp 3, fp 1, fn 1
    assert stats.tp.tolist() == [3, 3] and stats.fp.tolist() == [1, 1]
    assert stats.fn.tolist() == [1, 1] and stats.tn.tolist() == [3, 3]
    assert iou_score(stats) == [pytest.approx(3 / 5), pytest.approx(3 / 5)]
    assert dice_score(stats) == [pytest.approx(6 / 8), pytest.approx(6 / 8)]


def test_confusion_matrix_rows_are_truth_columns_prediction() -> None:
    truth = np.array([0, 0, 1, 2, 2, 2])
    pred = np.array([0, 1, 1, 2, 2, 0])
    cm = confusion_matrix(pred, truth, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_absent_class_is_none_and_left_out_of_the_mean() -> None:
    truth = np.array([[0, 0], [1, 1]])
    pred = np.array([[0, 0], [1, 0]])
    scores = score_segmentation(pred, truth, ["bg", "cell", "debris"])
    assert scores.iou["debris"] is None and scores.dice["debris"] is None
    assert scores.iou["bg"] == pytest.approx(2 / 3) and scores.iou["cell"] == pytest.approx(1 / 2)
    assert scores.mean_iou == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert scores.dice["cell"] == pytest.approx(2 / 3)
    assert scores.pixels["cell"] == {"tp": 1, "fp": 0, "fn": 1}


def test_class_predicted_but_absent_from_truth_scores_zero() -> None:
    truth = np.zeros((2, 2), int)
    pred = np.array([[0, 1], [0, 0]])
    scores = score_segmentation(pred, truth, ["bg", "fg"])
    assert scores.iou["fg"] == 0.0 and scores.dice["fg"] == 0.0


def test_perfect_prediction_scores_one_and_nothing_present_is_none() -> None:
    truth = np.array([[0, 1], [2, 1]])
    scores = score_segmentation(truth.copy(), truth, ["a", "b", "c"])
    assert scores.iou == {"a": 1.0, "b": 1.0, "c": 1.0} and scores.mean_dice == 1.0
    assert mean_present([None, None]) is None


def test_large_masks_are_counted_in_chunks_exactly() -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, (3000, 700)).astype(np.uint8)
    pred = rng.integers(0, 3, (3000, 700)).astype(np.uint8)
    expected = np.zeros((3, 3), np.int64)
    np.add.at(expected, (truth.ravel(), pred.ravel()), 1)
    assert np.array_equal(confusion_matrix(pred, truth, 3), expected)


def test_mismatched_shapes_and_out_of_range_labels_are_refused() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        get_stats(np.zeros((2, 2), int), np.zeros((2, 3), int), 2)
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\)"):
        get_stats(np.zeros((2, 2), int), np.full((2, 2), 2), 2)


@settings(max_examples=80, deadline=None)
@given(
    pair=st.integers(1, 4).flatmap(
        lambda k: st.tuples(
            st.just(k),
            arrays(np.int64, (6, 5), elements=st.integers(0, k - 1)),
            arrays(np.int64, (6, 5), elements=st.integers(0, k - 1)),
        )
    )
)
def test_property_bounds_and_consistency(pair: tuple[int, np.ndarray, np.ndarray]) -> None:
    k, pred, truth = pair
    stats = get_stats(pred, truth, k)
    assert int((stats.tp + stats.fn).sum()) == truth.size
    iou, dice = iou_score(stats), dice_score(stats)
    for c, (i, d) in enumerate(zip(iou, dice, strict=True)):
        present = (pred == c).any() or (truth == c).any()
        assert (i is None) == (not present)
        if i is not None and d is not None:
            assert 0.0 <= i <= d <= 1.0  # Dice >= IoU always
            assert d == pytest.approx(2 * i / (1 + i))
    assert all(v == 1.0 for v in iou_score(get_stats(truth, truth, k)) if v is not None)


def test_expositions_of_several_processes_merge_into_the_services() -> None:
    """What GET /metrics answers on Ray Serve: the ingress replicas' registries, merged."""
    from prometheus_client import CollectorRegistry, generate_latest

    from bench.live_server import metric_sample
    from service.core.telemetry import ServiceMetrics, merge_expositions

    one, two = ServiceMetrics(CollectorRegistry()), ServiceMetrics(CollectorRegistry())
    one.tiles.labels("nuclei").inc(3)
    two.tiles.labels("nuclei").inc(4)
    two.tiles.labels("other").inc(1)
    one.tile_batch_size.labels("nuclei").observe(8)
    two.tile_batch_size.labels("nuclei").observe(2)
    one.in_flight.set(2)
    two.in_flight.set(1)
    one.models_ready.set(1)
    two.models_ready.set(0)
    text = merge_expositions(
        {"a": generate_latest(one.registry).decode(), "b": generate_latest(two.registry).decode()}
    ).decode()
    assert metric_sample(text, "segment_tiles_total", model="nuclei") == 7
    assert metric_sample(text, "segment_tiles_total", model="other") == 1
    assert metric_sample(text, "segment_tile_batch_size_count", model="nuclei") == 2
    assert metric_sample(text, "segment_tile_batch_size_sum", model="nuclei") == 10
    assert metric_sample(text, "segment_tile_batch_size_bucket", model="nuclei", le="2.0") == 1
    assert metric_sample(text, "segment_requests_in_flight") == 3
    assert metric_sample(text, "segment_models_ready") == 0  # ready only where all are
    created = metric_sample(text, "segment_tiles_created", model="nuclei")
    assert created == min(
        metric_sample(generate_latest(r.registry).decode(), "segment_tiles_created", model="nuclei")
        for r in (one, two)
    )
    # One series per process for what describes a process.
    assert metric_sample(text, "process_resident_memory_bytes", replica="a") is not None
    assert metric_sample(text, "process_resident_memory_bytes", replica="b") is not None
    assert "# TYPE segment_tiles_total counter" in text
