"""Instances: the seeded watershed in strips, the object table, object matching and scores, and
``output=labels`` / object scores / ``model=NAME@VERSION`` through the API (real ONNX Runtime
sessions of the ``toyobj`` test model: foreground from 0.5 of the intensity, cores from 0.75)."""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile
from fastapi.testclient import TestClient
from httpx import Response
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from bench.onnx_models import build_model
from service.inference.instances import (
    BACKGROUND,
    CORE,
    FOREGROUND,
    label_instances,
    object_table,
    speck_area,
)
from service.inference.matching import (
    DSB_THRESHOLDS,
    image_counts,
    image_counts_both,
    match_counts,
    object_scores,
    overlaps,
    unlabelled_at_border,
)
from service.inference.modelmeta import Instances
from tests.conftest import make_unloadable, png_bytes, running_app, tiff_bytes, write_models

# --- the watershed ----------------------------------------------------------------------------


def discs(
    height: int, width: int, centres: list[tuple[float, float]], radius: float = 10.0, rim: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Codes of discs (a ``rim`` of foreground around a core) and their true labels (a pixel
    shared by two discs goes to the nearer centre)."""
    yy, xx = np.mgrid[:height, :width]
    dist = np.stack([np.hypot(yy - cy, xx - cx) for cy, cx in centres])
    nearest = dist.argmin(axis=0)
    inside = dist.min(axis=0) < radius
    labels = np.where(inside, nearest + 1, 0).astype(np.uint32)
    codes = inside.astype(np.uint8)
    codes[dist.min(axis=0) < radius - rim] = CORE
    return codes, labels


def blob_codes(side: int, blobs: list[tuple[int, int, int]]) -> np.ndarray:
    """Codes of overlapping discs ``(row, column, radius)`` in a square image, each with a core
    of half its radius: neighbours' cores and rims touch at random."""
    yy, xx = np.mgrid[:side, :side]
    codes = np.zeros((side, side), np.uint8)
    for cy, cx, r in blobs:
        d = np.hypot(yy - cy, xx - cx)
        codes[(d < r) & (codes == BACKGROUND)] = FOREGROUND
        codes[d < r / 2] = CORE
    return codes


def test_touching_nuclei_come_back_as_two_objects_parted_half_way() -> None:
    codes, truth = discs(60, 80, [(30, 30), (30, 47)])  # 17 px apart, radius 10: they touch
    assert ndimage.label(codes > 0)[1] == 1  # one blob as a mask
    labels, count = label_instances(codes)
    assert count == 2
    assert (labels > 0).sum() == (codes > 0).sum()
    left, right = (labels == labels[30, 30]).sum(), (labels == labels[30, 47]).sum()
    assert abs(int(left) - int(right)) <= 2  # parted half-way between the cores
    assert (labels == truth).mean() > 0.999


def test_labels_are_unique_across_strip_seams() -> None:
    """A nucleus across a strip seam is one object, whatever the strip height."""
    rng = np.random.default_rng(3)
    centres = [(float(y), float(x)) for y, x in rng.uniform(10, 190, (25, 2))]
    codes, _ = discs(200, 200, centres, radius=9)
    whole, n_whole = label_instances(codes, rows=200)
    for rows in (7, 16, 33, 64):
        strips, n = label_instances(codes, rows=rows, halo=24)
        assert n == n_whole
        assert np.array_equal(strips, whole), rows


def blobs_in(side: int) -> st.SearchStrategy[list[tuple[int, int, int]]]:
    """1-12 discs ``(row, column, radius)`` for :func:`blob_codes`."""
    centre = st.integers(0, side - 1)
    return st.lists(st.tuples(centre, centre, st.integers(3, 12)), min_size=1, max_size=12)


@settings(max_examples=25, deadline=None)
@given(blobs_in(96), st.integers(5, 40))
def test_strips_give_the_labels_of_the_whole_image(
    blobs: list[tuple[int, int, int]], rows: int
) -> None:
    codes = blob_codes(96, blobs)
    whole, n = label_instances(codes, rows=96, halo=48)
    strips, m = label_instances(codes, rows=rows, halo=48)
    assert n == m and np.array_equal(whole, strips)
    assert np.array_equal(whole > 0, codes > 0)  # every foreground pixel is in one object


@settings(max_examples=25, deadline=None)
@given(blobs_in(64), st.integers(5, 64))
def test_each_pixel_takes_a_nearest_core_of_its_own_component(
    blobs: list[tuple[int, int, int]], rows: int
) -> None:
    """The growth rule, against brute force: a foreground pixel's object is one whose core is
    nearest to it among the cores of its foreground component (any of them on a tie)."""
    codes = blob_codes(64, blobs)
    labels, _ = label_instances(codes, rows=rows, halo=64)
    parts, _ = ndimage.label(codes > 0)
    cores, _ = ndimage.label(codes == CORE)
    for y, x in zip(*np.nonzero(codes), strict=True):
        mine = cores[(parts == parts[y, x]) & (cores > 0)]
        if mine.size == 0:
            continue  # a component without a core: an object of its own (next test)
        cy, cx = np.nonzero(np.isin(cores, mine))
        dist = np.hypot(cy - y, cx - x)
        nearest = set(cores[cy, cx][dist <= dist.min() + 1e-9].tolist())
        # the core (a connected component of CORE) that the pixel's object grew from
        grew_from = set(cores[(labels == labels[y, x]) & (cores > 0)].tolist())
        assert grew_from & nearest, (y, x)


def test_a_core_across_the_background_does_not_take_pixels_of_another_object() -> None:
    """Two nuclei a background pixel apart: the far end of the long one is nearer the other's
    core, and still part of its own object (not a third object, nor a speck)."""
    codes = np.zeros((20, 60), np.uint8)
    codes[5:15, 2:40] = FOREGROUND  # a long nucleus, its core at the left end
    codes[7:13, 4:12] = CORE
    codes[5:15, 41:58] = FOREGROUND  # its neighbour, past one column of background
    codes[7:13, 43:56] = CORE
    labels, count = label_instances(codes, min_area=10)
    assert count == 2
    assert (labels[5:15, 2:40] == labels[10, 5]).all()
    assert (labels[5:15, 41:58] == labels[10, 50]).all()


def test_foreground_without_a_core_is_an_object_and_specks_go() -> None:
    codes = np.zeros((50, 50), np.uint8)
    codes[5:25, 5:25] = FOREGROUND  # the model found no core in it
    codes[40:42, 40:42] = FOREGROUND  # a 4-pixel speck
    codes[30:45, 5:20] = FOREGROUND
    codes[34:41, 9:16] = CORE
    labels, count = label_instances(codes, min_area=speck_area(20.0, 0.1))  # 31.4 px
    assert count == 2
    assert labels[40, 40] == 0 and labels[10, 10] > 0 and labels[35, 10] > 0
    assert set(np.unique(labels).tolist()) == {0, 1, 2}  # renumbered 1..N
    assert speck_area(None, 0.1) == 0.0


def test_codes_outside_the_three_values_are_refused() -> None:
    with pytest.raises(ValueError, match="codes must be 0"):
        label_instances(np.full((4, 4), 3, np.uint8))
    with pytest.raises(ValueError, match="one"):
        label_instances(np.zeros((2, 4, 4), np.uint8))


def test_the_object_table_measures_each_object() -> None:
    labels = np.zeros((40, 60), np.uint32)
    labels[2:12, 3:8] = 1  # 10 x 5
    labels[20:40, 50:60] = 2  # touches the border
    intensity = np.arange(40 * 60, dtype=np.float64).reshape(40, 60)
    table = object_table(labels, 2, intensity)
    rows = table.rows()
    assert [r["id"] for r in rows] == [1, 2]
    assert rows[0]["area"] == 50 and rows[1]["area"] == 200
    assert (rows[0]["centroid_y"], rows[0]["centroid_x"]) == (6.5, 5.0)
    assert (rows[1]["bbox_top"], rows[1]["bbox_left"], rows[1]["bbox_bottom"]) == (20, 50, 40)
    assert rows[1]["bbox_right"] == 60
    assert rows[0]["equivalent_diameter"] == round(math.sqrt(4 * 50 / math.pi), 2)
    assert rows[0]["mean_intensity"] == pytest.approx(intensity[labels == 1].mean(), abs=1e-4)
    assert object_table(np.zeros((5, 5), np.uint32), 0, np.zeros((5, 5))).count == 0


def test_the_object_table_of_objects_across_many_strips_is_scikit_images() -> None:
    """A wide image cut into strips of a few rows: objects that span many strips, one whose
    widest part is in a middle strip, an id with no pixels; the same figures as scikit-image's
    regionprops on the whole image."""
    from skimage.measure import regionprops

    labels = np.zeros((200, 40_000), np.uint32)  # strips of ~21 rows at this width
    labels[5:150, 100:130] = 1
    labels[60:70, 90:39_000] = 2  # widest in a middle strip
    labels[30:190, 38_000:38_010] = 2
    labels[0:200, 39_990:40_000] = 4  # every strip, at the border; id 3 has no pixels
    intensity = np.random.default_rng(5).random(labels.shape)
    table = object_table(labels, 4, intensity)
    expected = regionprops(labels.astype(np.int32), intensity_image=intensity)
    assert table.ids.tolist() == [r.label for r in expected] == [1, 2, 4]
    for i, r in enumerate(expected):
        assert table.area[i] == r.area
        assert tuple(table.bbox[i]) == r.bbox
        assert np.allclose(table.centroid[i], r.centroid)
        assert table.mean_intensity[i] == pytest.approx(r.intensity_mean, rel=1e-12)


# --- matching ---------------------------------------------------------------------------------


def test_matching_hand_made_cases() -> None:
    true = np.zeros((20, 40), np.int32)
    true[0:10, 0:10] = 1  # found exactly (touches the border)
    true[0:10, 20:30] = 2  # split 6/4 in two predictions
    true[12:20, 0:8] = 3  # merged with 4 into one prediction
    true[12:20, 8:12] = 4
    true[12:20, 30:38] = 5  # missed
    pred = np.zeros_like(true)
    pred[0:10, 0:10] = 1
    pred[0:10, 20:26] = 2
    pred[0:10, 26:30] = 3
    pred[12:20, 0:12] = 4
    pred[15:18, 15:18] = 5  # a false object
    at50 = match_counts(overlaps(true, pred), 0.5)
    # 1 exact; 2 matches its 6/10 part (IoU 0.6); 3 matches the merge (IoU 64/96 = 0.67)
    assert (at50.tp, at50.fp, at50.fn) == (3, 2, 2)
    assert at50.matched_iou == pytest.approx(1.0 + 0.6 + 64 / 96)
    scores = object_scores([image_counts(true, pred)])
    assert scores.precision == pytest.approx(3 / 5) and scores.recall == pytest.approx(3 / 5)
    assert scores.f1 == pytest.approx(0.6)
    assert scores.ap50 == pytest.approx(3 / 7)
    assert scores.ap[0.65] == pytest.approx(2 / 8)  # the 0.6 match is lost
    assert scores.ap[0.7] == pytest.approx(1 / 9)  # and the 0.67 one
    assert scores.mean_ap == pytest.approx(sum(scores.ap.values()) / 10)  # type: ignore[arg-type]


def test_matching_empty_images() -> None:
    empty = np.zeros((8, 8), np.int32)
    one = empty.copy()
    one[2:5, 2:5] = 7
    nothing = object_scores([image_counts(empty, empty)])
    assert (nothing.tp, nothing.fp, nothing.fn) == (0, 0, 0)
    assert nothing.f1 is None and nothing.mean_ap is None and nothing.mean_matched_iou is None
    missed = object_scores([image_counts(one, empty)])
    assert (missed.fn, missed.recall, missed.f1, missed.precision) == (1, 0.0, 0.0, None)
    invented = object_scores([image_counts(empty, one)])
    assert (invented.fp, invented.precision, invented.recall) == (1, 0.0, None)
    with pytest.raises(ValueError, match=r"\[0.5, 1\)"):
        match_counts(overlaps(one, one), 0.3)
    with pytest.raises(ValueError, match="shape"):
        overlaps(one, one[:4])


def test_unlabelled_objects_at_the_border_are_told_apart_from_the_rest() -> None:
    true = np.zeros((20, 30), np.int32)
    true[0:6, 10:16] = 1  # a labelled nucleus cut by the top border
    true[8:14, 8:14] = 2
    pred = np.zeros_like(true)
    pred[0:6, 10:16] = 1  # found: labelled, kept
    pred[14:20, 0:5] = 2  # cut by the corner, nothing labelled there: left out
    pred[8:14, 8:14] = 3  # inside the image: kept, labelled or not
    pred[10:13, 20:23] = 4  # an unlabelled object inside: still a false positive
    pred[0:5, 25:30] = 5  # cut by the border, 4 of its 25 pixels labelled (16 %): left out
    true[0:1, 25:29] = 3
    pred[15:20, 25:30] = 6  # cut by the border, 5 of 25 labelled (20 %): kept
    true[19:20, 25:30] = 4
    assert unlabelled_at_border(true, pred).tolist() == [2, 5]
    assert unlabelled_at_border(true, pred, labelled=0.1).tolist() == [2]
    kept = np.where(np.isin(pred, unlabelled_at_border(true, pred)), 0, pred)
    counts = match_counts(overlaps(true, kept), 0.5)
    assert (counts.tp, counts.fp, counts.fn) == (2, 2, 2)
    # The same from the overlaps alone (the service's way: no copy of the image).
    plain, labelled, _ = image_counts_both(true, pred)
    assert labelled == image_counts(true, kept) and plain == image_counts(true, pred)
    assert (plain[0.5].fp, labelled[0.5].fp) == (4, 2)
    assert unlabelled_at_border(true, np.zeros_like(pred)).size == 0
    with pytest.raises(ValueError, match="one shape"):
        unlabelled_at_border(true, pred[:5])


def test_data_set_scores_sum_the_counts_of_its_images() -> None:
    a = np.zeros((10, 10), np.int32)
    a[0:4, 0:4] = 1
    b = np.zeros((10, 10), np.int32)
    b[5:9, 5:9] = 1
    scores = object_scores([image_counts(a, a), image_counts(a, b)])
    assert (scores.tp, scores.fp, scores.fn) == (1, 1, 1)
    assert scores.f1 == pytest.approx(0.5)  # not the mean of 1.0 and 0.0 ... which is also 0.5
    scores = object_scores([image_counts(a, a), image_counts(a, a), image_counts(a, b)])
    assert scores.f1 == pytest.approx(4 / 6)  # micro, where the per-image mean is 2/3 too
    assert scores.ap50 == pytest.approx(2 / 4)  # but AP: 2 / (2 + 1 + 1), not mean(1, 1, 0)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_greedy_matching_is_the_optimal_one_at_and_above_half(seed: int) -> None:
    rng = np.random.default_rng(seed)
    true = ndimage.label(rng.random((24, 24)) > 0.55)[0]
    pred = ndimage.label(rng.random((24, 24)) > 0.5)[0]
    pairs = overlaps(true, pred)
    iou = np.zeros((true.max() + 1, pred.max() + 1))
    iou[pairs.true_ids, pairs.pred_ids] = pairs.iou
    for threshold in DSB_THRESHOLDS[:3]:
        ok = iou >= threshold
        rows, cols = linear_sum_assignment(-(ok.astype(float)))
        assert match_counts(pairs, threshold).tp == int(ok[rows, cols].sum())


# --- through the API --------------------------------------------------------------------------


def nuclei_image(
    height: int, width: int, centres: list[tuple[float, float]], radius: float = 10.0
) -> tuple[np.ndarray, np.ndarray]:
    """An 8-bit image the ``toyobj`` model reads exactly (rim 160: foreground, core 230) and
    its instance labels."""
    codes, labels = discs(height, width, centres, radius)
    image = np.choose(codes, [np.uint8(20), np.uint8(160), np.uint8(230)]).astype(np.uint8)
    return image, labels


CENTRES = [(40.0, 40.0), (40.0, 57.0), (100.0, 150.0), (64.0, 128.0), (150.0, 30.0)]


@pytest.fixture(scope="module")
def obj_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = write_models(tmp_path_factory.mktemp("models"))
    # a second, newer version of toyobj without instances: pinning @1 keeps them
    build_model(root / "toyobj" / "2" / "model.onnx", name="toyobj", tile_size=64, version="2")
    with running_app(root) as client:
        yield client


def post(client: TestClient, query: str, image: bytes, truth: bytes | None = None) -> Response:
    files = {"image": ("cells.png", image, "image/png")}
    if truth is not None:
        files["ground_truth"] = ("truth.tif", truth, "image/tiff")
    return client.post(f"/segment?{query}", files=files)


def test_output_labels_gives_a_16_bit_label_png_with_touching_nuclei_apart(
    obj_client: TestClient,
) -> None:
    image, truth = nuclei_image(200, 200, CENTRES)
    r = post(obj_client, "model=toyobj@1&output=labels", png_bytes(image))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-object-count"] == "5" and r.headers["x-model"] == "toyobj/1"
    labels = np.array(Image.open(io.BytesIO(r.content)))
    assert labels.dtype == np.uint16 and labels.max() == 5
    assert labels[40, 40] != labels[40, 57]  # touching, apart
    # (64, 128) sits on the seam of the 64-px tiles: one object, whole
    assert len(np.unique(labels[truth == 4])) == 1
    assert object_scores([image_counts(truth, labels)]).f1 == 1.0


def post_truth(client: TestClient, query: str, image: np.ndarray, truth: np.ndarray) -> Response:
    """``image`` as a PNG with its instance labels as a 16-bit TIFF ground truth: a 200."""
    r = post(client, query, png_bytes(image), tiff_bytes(truth.astype(np.uint16)))
    assert r.status_code == 200, r.text
    return r


def test_json_answers_the_object_table_and_object_scores(obj_client: TestClient) -> None:
    image, truth = nuclei_image(200, 200, CENTRES)
    r = post_truth(obj_client, "model=toyobj@1&output=labels&format=json", image, truth)
    body = r.json()
    assert body["object_count"] == 5 and len(body["objects"]) == 5
    row = body["objects"][0]
    assert set(row) >= {"id", "area", "centroid_y", "centroid_x", "equivalent_diameter"}
    assert row["mean_intensity"] > 160
    metrics = body["object_metrics"]
    assert metrics["truth_objects"] == "instance labels"
    assert (metrics["tp"], metrics["fp"], metrics["fn"], metrics["f1"]) == (5, 0, 0, 1.0)
    assert metrics["mean_ap"] > 0.9 and "0.95" in metrics["ap"]
    assert body["labels_png"] and body["mask_png"]
    assert "instances" in body["timings_ms"]
    assert r.headers["x-object-f1"] == "1.000000"


def test_the_scores_where_the_truth_labels_leave_out_unlabelled_nuclei_at_the_border(
    obj_client: TestClient,
) -> None:
    """A nucleus cut by the border that the truth leaves unlabelled (as the Cell Tracking
    Challenge's references do) is a false positive in the plain scores and left out of
    ``labelled_only``; one inside the image that the truth misses stays a false positive."""
    image, truth = nuclei_image(200, 200, [*CENTRES, (195.0, 100.0), (170.0, 170.0)])
    truth[truth >= len(CENTRES) + 1] = 0  # neither the cut nucleus nor the inner one labelled
    metrics = post_truth(obj_client, "model=toyobj@1&format=json", image, truth).json()
    metrics = metrics["object_metrics"]
    assert (metrics["tp"], metrics["fp"], metrics["fn"]) == (5, 2, 0)
    only = metrics["labelled_only"]
    assert (only["tp"], only["fp"], only["fn"], only["predicted_objects"]) == (5, 1, 0, 6)
    assert only["f1"] == pytest.approx(10 / 11) and metrics["f1"] == pytest.approx(10 / 12)


def test_a_mask_truth_is_scored_by_its_connected_components(obj_client: TestClient) -> None:
    image, truth = nuclei_image(200, 200, CENTRES)
    mask = (truth > 0).astype(np.uint8) * 255  # the touching pair is one component here
    r = post(obj_client, "model=toyobj@1&format=json", png_bytes(image), png_bytes(mask))
    metrics = r.json()["object_metrics"]
    assert metrics["truth_objects"] == "connected components of the mask"
    assert metrics["true_objects"] == 4 and metrics["predicted_objects"] == 5


def test_stacks_are_labelled_plane_by_plane(obj_client: TestClient) -> None:
    image, _ = nuclei_image(128, 128, [*CENTRES[:2], (100.0, 100.0)])
    stack = np.stack([image, image[:, ::-1], np.full_like(image, 20)])
    r = obj_client.post(
        "/segment?model=toyobj@1&output=labels&format=json",
        files={"image": ("s.tif", tiff_bytes(stack, photometric="minisblack"), "image/tiff")},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [p["object_count"] for p in body["plane_objects"]] == [3, 3, 0]
    assert body["object_count"] == 6
    labels = tifffile.imread(io.BytesIO(__import__("base64").b64decode(body["labels_tiff"])))
    assert labels.shape == (3, 128, 128) and labels.dtype == np.uint16
    assert labels[0].max() == 3 and labels[1].max() == 3  # ids restart per plane


def test_labels_need_a_model_that_gives_instances(obj_client: TestClient) -> None:
    image, _ = nuclei_image(64, 64, CENTRES[:1])
    r = post(obj_client, "model=toy&output=labels", png_bytes(image))
    assert r.status_code == 422 and "instances" in r.json()["detail"]
    r = post(obj_client, "model=toyobj@1&output=labels&class_name=foreground", png_bytes(image))
    assert r.status_code == 422 and "class_name" in r.json()["detail"]


def test_versions_are_listed_and_pinned(obj_client: TestClient) -> None:
    listed = {m["name"]: m for m in obj_client.get("/models").json()["models"]}
    assert listed["toyobj"]["versions"] == ["1", "2"]
    assert listed["toyobj"]["version"] == "2" and listed["toyobj"]["instances"] is False
    pinned = obj_client.get("/models/toyobj@1").json()
    assert pinned["version"] == "1" and pinned["instances"] is True and not pinned["default"]
    image, _ = nuclei_image(64, 64, CENTRES[:1])
    r = post(obj_client, "model=toyobj", png_bytes(image))
    assert r.headers["x-model"] == "toyobj/2"
    r = post(obj_client, "model=toyobj@3", png_bytes(image))
    assert r.status_code == 404 and "['1', '2']" in r.json()["detail"]


def test_a_job_answers_labels_too(obj_client: TestClient, tmp_path: Path) -> None:
    image, _ = nuclei_image(200, 200, CENTRES)
    r = obj_client.post(
        "/jobs?model=toyobj@1&output=labels",
        files={"image": ("cells.png", png_bytes(image), "image/png")},
    )
    assert r.status_code == 202, r.text
    job = r.json()
    for _ in range(200):
        state = obj_client.get(job["status_url"]).json()["state"]
        if state not in ("queued", "running"):
            break
        __import__("time").sleep(0.05)
    result = obj_client.get(job["result_url"])
    assert result.status_code == 200 and result.headers["x-object-count"] == "5"
    assert np.array(Image.open(io.BytesIO(result.content))).max() == 5


def test_instances_are_part_of_the_memory_estimate() -> None:
    from service.segmentation.images import ImageHeader
    from service.segmentation.memory import request_memory

    meta = build_model(Path("/tmp") / "unused-memory-model" / "model.onnx", name="m")
    meta = meta.model_copy(update={"instances": Instances()})
    header = ImageHeader("PNG", 4096, 4096, 1, 4096 * 4096)
    plain = request_memory(meta, header, 8)
    labelled = request_memory(meta, header, 8, instances=True)
    assert labelled - plain >= 4 * 4096 * 4096  # the uint32 labels at least


def test_a_small_service_loads_each_models_newest_version_only(tmp_path: Path) -> None:
    root = write_models(tmp_path / "models")
    build_model(root / "toyobj" / "2" / "model.onnx", name="toyobj", tile_size=64, version="2")
    with running_app(root, model_versions="newest") as client:
        listed = {m["name"]: m for m in client.get("/models").json()["models"]}
        assert listed["toyobj"]["versions"] == ["2"]
        image, _ = nuclei_image(64, 64, CENTRES[:1])
        r = post(client, "model=toyobj@1", png_bytes(image))
        assert r.status_code == 404 and "['2']" in r.json()["detail"]


def test_an_earlier_version_loads_on_the_first_request_that_pins_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The default (``SEG_MODEL_VERSIONS=all``): an earlier version is listed and described
    from its metadata, but its session is made by the first request that pins it, once however
    many ask at the same time; it answers what it answers when loaded at start."""
    root = write_models(tmp_path / "models")
    build_model(root / "toyobj" / "2" / "model.onnx", name="toyobj", tile_size=64, version="2")
    image, _ = nuclei_image(96, 96, CENTRES[:2])
    query = "model=toyobj@1&output=labels&format=json"
    with running_app(root, model_versions="all-at-start") as client:
        loaded_at_start = post(client, query, png_bytes(image)).json()
    with running_app(root, memory_budget="8GiB") as client:
        earlier = client.app.state.registry.earlier["toyobj@1"]  # type: ignore[attr-defined]
        budget = client.app.state.memory_budget  # type: ignore[attr-defined]
        at_start = budget.baseline
        assert not earlier.loaded
        listed = {m["name"]: m for m in client.get("/models").json()["models"]}
        assert listed["toyobj"]["versions"] == ["1", "2"]
        described = client.get("/models/toyobj@1").json()
        assert described["version"] == "1" and described["instances"]
        assert not earlier.loaded  # listing and describing load nothing
        # the service's loggers do not propagate to the root (service.core.logs)
        registry_log = logging.getLogger("service.segmentation.registry")
        registry_log.addHandler(caplog.handler)
        try:
            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(lambda _: post(client, query, png_bytes(image)), range(4)))
        finally:
            registry_log.removeHandler(caplog.handler)
        assert earlier.loaded
        loads = [r for r in caplog.records if "toyobj@1 loaded on its first" in r.getMessage()]
        assert len(loads) == 1
        # What the load left the process holding is no longer the requests' (and /metrics says)
        assert budget.baseline >= at_start and budget.capacity == budget.total - budget.baseline
        gauge = 'segment_memory_budget_bytes{part="models"} '
        line = next(x for x in client.get("/metrics").text.splitlines() if x.startswith(gauge))
        assert float(line.removeprefix(gauge)) == budget.baseline
        for r in answers:
            assert r.status_code == 200, r.text
            assert r.json()["objects"] == loaded_at_start["objects"]


def test_an_earlier_version_that_cannot_load_answers_503_and_the_others_serve(
    tmp_path: Path,
) -> None:
    """A file whose metadata reads but whose session does not run (metadata of 3 channels on
    a 1-channel graph) is found by the first request that pins it: 503 naming the model and
    that the file must be replaced (no Retry-After), the same for the next, and every other
    model still serves."""
    root = write_models(tmp_path / "models")
    broken = root / "toy" / "0" / "model.onnx"
    build_model(broken, name="toy", tile_size=64, version="0")
    make_unloadable(broken)
    image, _ = nuclei_image(64, 64, CENTRES[:1])
    with running_app(root) as client:
        for _ in range(2):
            r = post(client, "model=toy@0", png_bytes(image))
            assert r.status_code == 503, r.text
            assert "toy@0 could not be loaded" in r.json()["detail"]
            # Retrying will not help: no Retry-After, and the answer says what will.
            assert "must be replaced" in r.json()["detail"] and "Retry-After" not in r.headers
        assert post(client, "model=toy", png_bytes(image)).status_code == 200
        assert client.get("/healthz").status_code == 200


def test_the_mask_of_a_model_with_cores_blends_only_the_channel_it_thresholds(
    tmp_path: Path,
) -> None:
    """``output=mask`` of a model that gives instances blends only the first output channel
    (half the stitching); its mask is, bit for bit, the threshold of that channel blended with
    the other beside it, and the one the instance path (which blends both) gives."""
    from service.inference.normalize import compute_intensity_stats
    from service.inference.pipeline import as_hwc, predict_instances, predict_mask
    from service.inference.tiling import sliding_window_inference
    from service.segmentation.registry import find_model_files, load_model

    root = write_models(tmp_path / "models")
    model = load_model("toyobj", find_model_files(root)["toyobj"], ["CPUExecutionProvider"], 1, 4)
    assert model.meta.output_channels == 2
    rng = np.random.default_rng(5)
    image = as_hwc(rng.integers(0, 255, (150, 190), dtype=np.uint8))
    mask = predict_mask(image, model.meta, model.predict, overlap=0.25)
    stats = compute_intensity_stats(image, model.meta.normalization)
    blended = sliding_window_inference(
        image, model.meta.tile_size, 4, model.predict, overlap=0.25, prepare=stats.apply
    )
    assert blended.shape[-1] == 2
    assert np.array_equal(mask, (blended[..., 0] >= model.meta.threshold).astype(np.uint8))
    assert 0 < mask.sum() < mask.size
    objects = predict_instances(image, model.meta, model.predict, overlap=0.25)
    assert np.array_equal(objects.mask, mask)
