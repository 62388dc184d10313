"""The HTTP API through FastAPI's TestClient, on real ONNX Runtime sessions of small real models.

The binary ``toy`` model computes ``sigmoid(8 * (x / 255 - 0.5))`` per pixel, so for any image
the mask it must return is known exactly: ``x / 255 >= 0.5`` (threshold 0.5).
"""

from __future__ import annotations

import base64
import io
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.core.config import DEFAULT_OVERLAP
from tests.conftest import (
    LABEL_VALUES,
    MULTICLASS,
    decode_png,
    expected_toy_mask,
    jpeg_bytes,
    png_bytes,
    random_image,
    running_app,
    segment_files,
    tiff_bytes,
)

GOOD = random_image(40, 70, seed=1)


def post(
    client: TestClient,
    image: bytes,
    truth: bytes | None = None,
    *,
    headers: dict[str, str] | None = None,
    **params: Any,
) -> httpx.Response:
    """``POST /segment`` with ``image`` (and ``truth``) as multipart fields."""
    return client.post(
        "/segment", files=segment_files(image, truth), params=params, headers=headers
    )


def mask_of(response: httpx.Response) -> np.ndarray:
    """The mask PNG of a 200 response as an array, checked to be single-channel."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    img = decode_png(response.content)
    assert img.mode in ("L", "P")
    return np.asarray(img)


def json_of(client: TestClient, image: bytes, truth: bytes | None = None, **params: Any) -> dict:
    r = post(client, image, truth, format="json", **params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    return r.json()


def b64_png(data: str) -> Image.Image:
    return decode_png(base64.b64decode(data))


def assert_error(response: httpx.Response, status: int, *words: str) -> dict:
    """An error answer: the status, a JSON body with detail/code/request_id, the words in the
    detail, and nothing internal (no traceback, no server paths)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail", "code", "request_id"}, body
    assert body["request_id"] == response.headers["x-request-id"]
    for word in words:
        assert word.lower() in body["detail"].lower(), body
    text = response.text
    for leak in ("Traceback", 'File "', ".py", "site-packages", "/tmp", "/work", "/home"):
        assert leak not in text, text
    return body


def assert_still_serves(client: TestClient) -> None:
    np.testing.assert_array_equal(mask_of(post(client, png_bytes(GOOD))), expected_toy_mask(GOOD))


def metric_samples(client: TestClient, headers: dict[str, str] | None = None) -> dict:
    """``{(name, frozenset(labels)): value}`` from ``/metrics``."""
    r = client.get("/metrics", headers=headers)
    assert r.status_code == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


# --- the mask is right ----------------------------------------------------------------------


SIZES = [(1, 1), (1, 7), (3, 500), (500, 3), (64, 64), (65, 63), (17, 300), (130, 200)]


@pytest.mark.parametrize(("height", "width"), SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_png_mask_is_exact_for_every_size(client: TestClient, height: int, width: int) -> None:
    img = random_image(height, width, seed=height * 1000 + width)
    r = post(client, png_bytes(img))
    mask = mask_of(r)
    assert decode_png(r.content).mode == "L"
    assert mask.shape == (height, width)
    assert set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(mask, expected_toy_mask(img))
    assert r.headers["x-model"] == "toy/1"
    assert r.headers["x-provider"] == "CPUExecutionProvider"


def _grey16() -> tuple[bytes, np.ndarray]:
    img = np.random.default_rng(5).integers(0, 300, (70, 90), dtype=np.uint16)
    return tiff_bytes(img), img


def _rgb_as_grey() -> tuple[bytes, np.ndarray]:
    grey = random_image(50, 80, seed=6)
    return png_bytes(np.dstack([grey] * 3)), grey


def _jpeg() -> tuple[bytes, np.ndarray]:
    data = jpeg_bytes(random_image(45, 66, seed=7))
    return data, np.asarray(Image.open(io.BytesIO(data)))  # what the service decodes


def _planar_rgb_tiff() -> tuple[bytes, np.ndarray]:
    grey = random_image(33, 47, seed=8)
    planes = np.stack([grey] * 3)
    return tiff_bytes(planes, photometric="rgb", planarconfig="separate"), grey


def _float_tiff() -> tuple[bytes, np.ndarray]:
    img = np.random.default_rng(9).uniform(0, 255, (30, 40)).astype(np.float32)
    img[np.abs(img - 127.5) < 0.01] = 0  # nothing on the edge of the threshold
    return tiff_bytes(img), img


@pytest.mark.parametrize(
    "make",
    [_grey16, _rgb_as_grey, _jpeg, _planar_rgb_tiff, _float_tiff],
    ids=["tiff-16bit", "png-rgb", "jpeg", "tiff-planar-rgb", "tiff-float32"],
)
def test_other_inputs_give_the_exact_mask(client: TestClient, make: Any) -> None:
    data, pixels = make()
    np.testing.assert_array_equal(mask_of(post(client, data)), expected_toy_mask(pixels))


@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.75])
@pytest.mark.parametrize("blend", ["constant", "gaussian", "cosine"])
def test_overlap_and_blend_do_not_change_a_pointwise_model(
    client: TestClient, overlap: float, blend: str
) -> None:
    img = random_image(150, 170, seed=11)
    r = post(client, png_bytes(img), overlap=overlap, blend=blend)
    np.testing.assert_array_equal(mask_of(r), expected_toy_mask(img))


def _sigmoid_mask(img: np.ndarray, threshold: float) -> np.ndarray:
    p = 1.0 / (1.0 + np.exp(-8.0 * (img.astype(np.float64) / 255.0 - 0.5)))
    return (p >= threshold).astype(np.uint8) * 255


@pytest.mark.parametrize("threshold", [0.1, 0.3, 0.9])
def test_threshold_changes_the_mask_as_the_model_predicts(
    client: TestClient, threshold: float
) -> None:
    img = np.arange(256, dtype=np.uint8).reshape(16, 16)
    mask = mask_of(post(client, png_bytes(img), threshold=threshold))
    np.testing.assert_array_equal(mask, _sigmoid_mask(img, threshold))
    assert not np.array_equal(mask, expected_toy_mask(img))
    body = json_of(client, png_bytes(img), threshold=threshold)
    assert body["threshold"] == threshold


# --- JSON -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "headers"),
    [
        ({"format": "json"}, {}),
        ({}, {"Accept": "application/json"}),
        ({"format": "json"}, {"Accept": "image/png"}),
    ],
    ids=["param", "accept", "param-beats-accept"],
)
def test_json_answer_carries_mask_timings_and_tiles(
    client: TestClient, params: dict, headers: dict
) -> None:
    img = random_image(130, 200, seed=3)
    r = post(client, png_bytes(img), headers=headers, **params)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    mask = b64_png(body["mask_png"])
    assert mask.mode == "L"
    np.testing.assert_array_equal(np.asarray(mask), expected_toy_mask(img))
    assert body["tiles"] == 12  # 3 rows x 4 columns of 64-pixel tiles at overlap 0.125
    assert {"decode", "infer", "stitch", "encode"} <= set(body["timings_ms"])
    assert all(v >= 0 for v in body["timings_ms"].values())
    assert body["model"] == "toy" and body["version"] == "1"
    assert body["provider"] == "CPUExecutionProvider"
    assert body["classes"] == ["background", "foreground"]
    assert body["threshold"] == 0.5 and body["overlap"] == DEFAULT_OVERLAP == 0.125
    assert body["precision"] == "fp32"  # the toy model has no variants
    assert body["image"] == {
        "format": "PNG",
        "dtype": "uint8",
        "mode": "L",
        "width": 200,
        "height": 130,
        "channels": 1,
        "channel": None,
        "physical_pixel_size": None,
    }
    fg = float((expected_toy_mask(img) > 0).mean())
    assert body["class_fractions"]["foreground"] == pytest.approx(fg)
    assert body["metrics"] is None and body["class_masks"] is None
    assert body["request_id"] == r.headers["x-request-id"]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Accept": "*/*"}, {"Accept": "image/png, application/json"}],
    ids=["none", "any", "both"],
)
def test_plain_requests_get_the_png(client: TestClient, headers: dict) -> None:
    r = post(client, png_bytes(GOOD), headers=headers)
    np.testing.assert_array_equal(mask_of(r), expected_toy_mask(GOOD))
    r = post(client, png_bytes(GOOD), headers={"Accept": "application/json"}, format="png")
    np.testing.assert_array_equal(mask_of(r), expected_toy_mask(GOOD))


# --- ground truth and scores ------------------------------------------------------------------


def _truths(img: np.ndarray) -> dict[str, bytes]:
    fg = expected_toy_mask(img) > 0
    labels = np.zeros(fg.shape, np.uint16)
    labels[fg] = np.random.default_rng(0).integers(1, 3000, int(fg.sum()))  # instance IDs
    return {
        "0-255": png_bytes(fg.astype(np.uint8) * 255),
        "0-1": png_bytes(fg.astype(np.uint8)),
        "instances-16bit": tiff_bytes(labels),
        "0-255-as-rgb": png_bytes(np.dstack([fg.astype(np.uint8) * 255] * 3)),
        "bool-float": tiff_bytes(fg.astype(np.float32)),
    }


@pytest.mark.parametrize("kind", list(_truths(GOOD)))
def test_perfect_ground_truth_scores_one(client: TestClient, kind: str) -> None:
    body = json_of(client, png_bytes(GOOD), _truths(GOOD)[kind])
    scores = body["metrics"]
    assert scores["iou"] == {"background": 1.0, "foreground": 1.0}
    assert scores["dice"] == {"background": 1.0, "foreground": 1.0}
    assert scores["mean_iou"] == 1.0 and scores["mean_dice"] == 1.0
    r = post(client, png_bytes(GOOD), _truths(GOOD)[kind])
    assert r.headers["x-mean-iou"] == "1.000000"
    np.testing.assert_array_equal(mask_of(r), expected_toy_mask(GOOD))


def test_scores_match_a_hand_computed_case(client: TestClient) -> None:
    image = np.array([[0, 0, 0, 0, 255, 255, 255, 255]], np.uint8)  # predicts 0 0 0 0 1 1 1 1
    truth = np.array([[0, 0, 0, 1, 1, 1, 0, 0]], np.uint8)
    # foreground: tp 2, fp 2, fn 1 -> IoU 2/5, Dice 4/7
    # background: tp 3, fp 1, fn 2 -> IoU 3/6, Dice 6/9
    scores = json_of(client, png_bytes(image), png_bytes(truth))["metrics"]
    assert scores["iou"]["foreground"] == pytest.approx(2 / 5)
    assert scores["dice"]["foreground"] == pytest.approx(4 / 7)
    assert scores["iou"]["background"] == pytest.approx(3 / 6)
    assert scores["dice"]["background"] == pytest.approx(6 / 9)
    assert scores["mean_iou"] == pytest.approx((2 / 5 + 3 / 6) / 2)
    assert scores["mean_dice"] == pytest.approx((4 / 7 + 6 / 9) / 2)
    assert scores["pixels"]["foreground"] == {"tp": 2, "fp": 2, "fn": 1}
    assert scores["pixels"]["background"] == {"tp": 3, "fp": 1, "fn": 2}


def test_class_absent_from_prediction_and_truth_is_null_and_left_out_of_the_mean(
    client: TestClient,
) -> None:
    dark = np.full((20, 20), 10, np.uint8)  # all background
    r = post(client, png_bytes(dark), png_bytes(np.zeros_like(dark)), format="json")
    assert '"foreground":null' in r.text.replace(" ", "")
    scores = r.json()["metrics"]
    assert scores["iou"] == {"background": 1.0, "foreground": None}
    assert scores["dice"] == {"background": 1.0, "foreground": None}
    assert scores["mean_iou"] == 1.0 and scores["mean_dice"] == 1.0
    # present in the truth only: 0, not null, and it pulls the mean down
    truth = np.zeros_like(dark)
    truth[:10] = 1
    scores = json_of(client, png_bytes(dark), png_bytes(truth))["metrics"]
    assert scores["iou"] == {"background": 0.5, "foreground": 0.0}
    assert scores["mean_iou"] == 0.25


@pytest.mark.parametrize(
    ("truth_shape", "says"),
    [((40, 71), "71x40"), ((41, 70), "70x41"), ((70, 40), "40x70")],
)
def test_ground_truth_of_another_size_is_422_naming_both(
    client: TestClient, truth_shape: tuple[int, int], says: str
) -> None:
    r = post(client, png_bytes(GOOD), png_bytes(np.zeros(truth_shape, np.uint8)))
    body = assert_error(r, 422, says, "70x40")
    assert body["code"] == "invalid_ground_truth"
    assert_still_serves(client)


@pytest.mark.parametrize(
    ("truth", "says"),
    [
        (
            png_bytes(
                np.dstack([np.zeros((40, 70), np.uint8), np.ones((40, 70), np.uint8)] * 2)[..., :3]
            ),
            "channel",
        ),
        (tiff_bytes(np.full((40, 70), -1, np.int16)), "negative"),
        (tiff_bytes(np.full((40, 70), 0.5, np.float32)), "whole-number"),
        (b"GIF89a" + b"\0" * 40, "GIF"),
        (png_bytes(GOOD)[:100], "truncated"),
        (b"", "empty"),
    ],
    ids=["colour", "negative", "fractional", "gif", "truncated", "empty"],
)
def test_unusable_ground_truth_is_refused(client: TestClient, truth: bytes, says: str) -> None:
    r = post(client, png_bytes(GOOD), truth)
    assert r.status_code in (415, 422)
    assert_error(r, r.status_code, says, "ground truth")
    assert_still_serves(client)


# --- multiclass -----------------------------------------------------------------------------


def test_multiclass_returns_a_palette_png_of_class_indices(client: TestClient) -> None:
    img = random_image(90, 110, seed=21)
    r = post(client, png_bytes(img), model="toy3")
    assert r.status_code == 200
    png = decode_png(r.content)
    assert png.mode == "P"
    index = np.asarray(png)
    assert index.shape == (90, 110)
    assert set(np.unique(index)) <= {0, 1, 2}
    assert len(np.unique(index)) >= 2  # a random 3x3 conv on noise predicts more than one class
    palette = png.getpalette()
    assert palette is not None and palette[:3] == [0, 0, 0]
    assert len({tuple(palette[3 * k : 3 * k + 3]) for k in range(3)}) == 3  # distinct colours

    # same mask in JSON, one 0/255 PNG per class on request, and each class alone
    body = json_of(client, png_bytes(img), model="toy3", per_class="true")
    np.testing.assert_array_equal(np.asarray(b64_png(body["mask_png"])), index)
    assert body["threshold"] is None and body["classes"] == MULTICLASS
    assert list(body["class_masks"]) == MULTICLASS
    for k, name in enumerate(MULTICLASS):
        alone = b64_png(body["class_masks"][name])
        assert alone.mode == "L"
        np.testing.assert_array_equal(np.asarray(alone), (index == k).astype(np.uint8) * 255)
        single = mask_of(post(client, png_bytes(img), model="toy3", class_name=name))
        np.testing.assert_array_equal(single, (index == k).astype(np.uint8) * 255)
    assert sum(body["class_fractions"].values()) == pytest.approx(1.0)

    # its own prediction as ground truth scores 1.0 for every class present
    scores = json_of(client, png_bytes(img), png_bytes(index), model="toy3")["metrics"]
    present = set(np.unique(index).tolist())
    for k, name in enumerate(MULTICLASS):
        assert scores["iou"][name] == (1.0 if k in present else None)
    # the same truth written with the pixel values the model was trained on
    lut = np.array(LABEL_VALUES, np.uint8)
    scores = json_of(client, png_bytes(img), png_bytes(lut[index]), model="toy3lv")["metrics"]
    own = np.asarray(decode_png(post(client, png_bytes(img), model="toy3lv").content))
    np.testing.assert_array_equal(own, index)  # same weights and tile size as toy3
    assert scores["mean_iou"] == 1.0


def test_class_name_also_works_for_binary_models(client: TestClient) -> None:
    fg = mask_of(post(client, png_bytes(GOOD), class_name="foreground"))
    np.testing.assert_array_equal(fg, expected_toy_mask(GOOD))
    bg = mask_of(post(client, png_bytes(GOOD), class_name="background"))
    np.testing.assert_array_equal(bg, 255 - expected_toy_mask(GOOD))


@pytest.mark.parametrize(
    ("truth", "says"),
    [
        (np.full((40, 70), 3, np.uint8), "[3]"),
        (np.full((40, 70), 255, np.uint8), "[255]"),
        (np.arange(40 * 70, dtype=np.uint16).reshape(40, 70) % 7, "0..2"),
    ],
    ids=["3", "255", "0-to-6"],
)
def test_multiclass_truth_with_labels_outside_the_classes_is_422(
    client: TestClient, truth: np.ndarray, says: str
) -> None:
    r = post(client, png_bytes(GOOD), png_bytes(truth), model="toy3")
    body = assert_error(r, 422, says, "background, a, b")
    assert body["code"] == "invalid_ground_truth"
    assert_still_serves(client)


# --- bad requests -----------------------------------------------------------------------------


BAD_PARAMS = [
    ({"threshold": 0}, 422, "threshold"),
    ({"threshold": 1}, 422, "threshold"),
    ({"threshold": 1.5}, 422, "threshold"),
    ({"threshold": -0.1}, 422, "threshold"),
    ({"threshold": "half"}, 422, "threshold"),
    ({"threshold": 0.5, "model": "toy3"}, 422, "binary"),
    ({"overlap": -0.1}, 422, "overlap"),
    ({"overlap": 0.8}, 422, "overlap"),
    ({"overlap": 1}, 422, "overlap"),
    ({"blend": "median"}, 422, "blend"),
    ({"format": "gif"}, 422, "format"),
    ({"class_name": "nucleus"}, 422, "nucleus"),
    ({"model": "nope"}, 404, "nope"),
    ({"model": "../x"}, 422, "model"),
    ({"model": "..%2Fx"}, 422, "model"),
    ({"model": "Toy"}, 422, "model"),
    ({"model": "a" * 65}, 422, "model"),
]


@pytest.mark.parametrize(
    ("params", "status", "says"), BAD_PARAMS, ids=[str(p[0]) for p in BAD_PARAMS]
)
def test_bad_parameters_are_refused_and_the_service_carries_on(
    client: TestClient, params: dict, status: int, says: str
) -> None:
    r = post(client, png_bytes(GOOD), **params)
    body = assert_error(r, status, says)
    assert body["code"] == ("unknown_model" if status == 404 else "invalid_parameter")
    if status == 404:
        assert "toy" in body["detail"]  # says what is available
    assert_still_serves(client)


BAD_UPLOADS: list[tuple[dict, dict, int, str]] = [
    ({}, {}, 422, "image"),
    ({"file": ("a.png", png_bytes(GOOD), "image/png")}, {}, 422, "image"),
    ({"ground_truth": ("t.png", png_bytes(GOOD), "image/png")}, {}, 422, "image"),
    ({}, {"content": png_bytes(GOOD), "headers": {"content-type": "image/png"}}, 422, "image"),
    ({"image": ("a.gif", b"GIF89a" + b"\0" * 64, "image/gif")}, {}, 415, "GIF"),
    ({"image": ("a.bmp", b"BM" + b"\0" * 64, "image/bmp")}, {}, 415, "BMP"),
    ({"image": ("a.png", b"hello, world" * 10, "image/png")}, {}, 415, "not an image"),
    ({"image": ("a.png", b"", "image/png")}, {}, 422, "empty"),
    ({"image": ("a.png", png_bytes(GOOD)[:60], "image/png")}, {}, 422, "PNG"),
    ({"image": ("a.tif", tiff_bytes(np.zeros((5, 8, 8), np.float32)), "")}, {}, 422, "TIFF"),
]


@pytest.mark.parametrize(
    ("files", "extra", "status", "says"),
    BAD_UPLOADS,
    ids=[
        "nothing",
        "wrong-field",
        "truth-only",
        "raw-body",
        "gif",
        "bmp",
        "text",
        "empty",
        "truncated",
        "tiff-stack",
    ],
)
def test_bad_uploads_are_refused_and_the_service_carries_on(
    client: TestClient, files: dict, extra: dict, status: int, says: str
) -> None:
    r = client.post("/segment", files=files or None, **extra)
    assert_error(r, status, says)
    assert_still_serves(client)


def test_request_id_is_echoed_when_sane(client: TestClient) -> None:
    r = post(client, b"not an image", headers={"X-Request-ID": "lab-42.run_7"})
    assert r.headers["x-request-id"] == "lab-42.run_7"
    assert assert_error(r, 415)["request_id"] == "lab-42.run_7"
    r = post(client, b"not an image", headers={"X-Request-ID": "bad id\twith spaces"})
    assert r.headers["x-request-id"] != "bad id\twith spaces"
    assert len(r.headers["x-request-id"]) == 32


# --- models, health, readiness ---------------------------------------------------------------


def test_models_lists_every_model_with_metadata_and_provider(client: TestClient) -> None:
    for path in ("/models", "/v1/models"):
        r = client.get(path)
        assert r.status_code == 200
        body = r.json()
        assert body["failed"] == {}
        by_name = {m["name"]: m for m in body["models"]}
        assert set(by_name) == {"toy", "toy3", "toy3lv", "toyobj"}
        assert {n for n, m in by_name.items() if m["instances"]} == {"toyobj"}
        assert by_name["toyobj"]["metadata"]["instances"]["seed_channel"] == 1
        for name, model in by_name.items():
            assert model["versions"] == ["1"]
            assert model["provider"] == "CPUExecutionProvider"
            assert model["providers"] == ["CPUExecutionProvider"]
            assert model["default"] is (name == "toy")
            assert model["version"] == "1"
            assert model["input"] == {"name": "input_1", "layout": "NHWC"}
            assert model["output"] == {"name": "output_0"}
            meta = model["metadata"]
            for key in ("classes", "tile_size", "channels", "normalization", "threshold"):
                assert key in meta
        assert by_name["toy"]["metadata"]["classes"] == ["background", "foreground"]
        assert by_name["toy"]["metadata"]["tile_size"] == 64
        assert by_name["toy"]["metadata"]["task"] == "binary"
        assert by_name["toy3"]["metadata"]["classes"] == MULTICLASS
        assert by_name["toy3"]["metadata"]["task"] == "multiclass"
        assert by_name["toy3lv"]["metadata"]["label_values"] == LABEL_VALUES
        assert by_name["toy"]["metadata"]["normalization"]["method"] == "scale"
    one = client.get("/models/toy3")
    assert one.status_code == 200 and one.json()["metadata"]["classes"] == MULTICLASS
    assert_error(client.get("/models/nope"), 404, "nope")


def test_health_readiness_and_docs(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {
        "status": "ready",
        "models": ["toy", "toy3", "toy3lv", "toyobj"],
        "failed": {},
    }
    assert client.get("/docs").status_code == 200
    assert "/segment" in client.get("/openapi.json").json()["paths"]


def test_before_the_models_are_loaded_readyz_and_segment_say_503(model_dir: Path) -> None:
    """A client that has not run the lifespan is the app before its loader has finished."""
    from service.core.config import Settings
    from service.main import create_app

    app = create_app(Settings(model_dir=model_dir, default_model="toy"))
    client = TestClient(app)  # no `with`: the lifespan (and the loader) never starts
    assert client.get("/healthz").status_code == 200
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["status"] == "loading"
    body = assert_error(post(client, png_bytes(GOOD)), 503, "loading")
    assert body["code"] == "not_ready"
    assert post(client, png_bytes(GOOD)).headers["retry-after"] == "2"


def test_a_corrupt_model_degrades_readiness_but_the_others_serve(broken_model_dir: Path) -> None:
    with running_app(broken_model_dir, expect_ready=503) as client:
        r = client.get("/readyz")
        assert r.status_code == 503
        body = r.json()
        assert body["status"] == "degraded"
        assert body["models"] == ["toy", "toy3", "toy3lv", "toyobj"]
        assert set(body["failed"]) == {"broken"}
        assert str(broken_model_dir) not in r.text  # no server paths, even here
        models = client.get("/models").json()
        assert set(models["failed"]) == {"broken"}
        assert str(broken_model_dir) not in str(models)
        assert {m["name"] for m in models["models"]} == {"toy", "toy3", "toy3lv", "toyobj"}
        assert_still_serves(client)
        assert_error(post(client, png_bytes(GOOD), model="broken"), 404, "failed to load")
        info = metric_samples(client)
        assert sample(info, "segment_models_ready") == 0


def test_an_empty_model_dir_is_not_ready(tmp_path: Path) -> None:
    with running_app(tmp_path, expect_ready=503) as client:
        body = client.get("/readyz").json()
        assert body["status"] == "degraded" and body["models"] == []
        assert str(tmp_path) not in str(body)
        assert_error(post(client, png_bytes(GOOD)), 404, "toy")


# --- metrics --------------------------------------------------------------------------------


def test_metrics_count_what_was_done(make_client: Any) -> None:
    with make_client() as client:
        tiles = [
            json_of(client, png_bytes(random_image(130, 200, seed=s)))["tiles"] for s in (1, 2)
        ]
        post(client, png_bytes(GOOD), model="toy3")
        post(client, b"GIF89a" + b"\0" * 64)
        post(client, png_bytes(GOOD), model="nope")
        m = metric_samples(client)
    assert sample(m, "segment_inference_seconds_count", model="toy") == 2
    assert sample(m, "segment_inference_seconds_count", model="toy3") == 1
    assert sample(m, "segment_tiles_total", model="toy") == sum(tiles) == 24
    assert sample(m, "segment_pixels_total", model="toy") == 2 * 130 * 200
    assert sample(m, "segment_tile_batch_size_count", model="toy") == 4  # 12 tiles, batches of 8
    for name in ("toy", "toy3", "toy3lv"):
        labels = {"model": name, "version": "1", "provider": "CPUExecutionProvider"}
        assert sample(m, "segment_model_info", **labels) == 1
    assert sample(m, "segment_models_ready") == 1
    assert sample(m, "segment_errors_total", reason="unsupported_media_type") == 1
    assert sample(m, "segment_errors_total", reason="unknown_model") == 1
    assert sample(m, "segment_errors_total", reason="invalid_image") == 0
    assert sample(m, "segment_requests_rejected_total") == 0
    assert sample(m, "segment_requests_in_flight") == 0
    requests = {
        (dict(labels)["handler"], dict(labels)["status"]): value
        for (name, labels), value in m.items()
        if name == "http_requests_total"
    }
    assert requests[("/segment", "2xx")] == 3
    assert requests[("/segment", "4xx")] == 2
    assert not any(handler == "/metrics" for handler, _ in requests)


# --- API key --------------------------------------------------------------------------------


def test_api_key_guards_segment_and_models_but_not_health(make_client: Any) -> None:
    with make_client(api_key="s3cret") as client:
        for path in ("/models", "/v1/models", "/models/toy"):
            body = assert_error(client.get(path), 401, "API key")
            assert body["code"] == "unauthorized"
            assert client.get(path, headers={"X-API-Key": "s3cret"}).status_code == 200
        r = post(client, png_bytes(GOOD))
        assert_error(r, 401, "API key")
        assert r.headers["www-authenticate"] == "Bearer"
        assert_error(post(client, png_bytes(GOOD), headers={"X-API-Key": "wrong"}), 401)
        assert_error(post(client, png_bytes(GOOD), headers={"Authorization": "Bearer s3"}), 401)
        for headers in ({"Authorization": "Bearer s3cret"}, {"X-API-Key": "s3cret"}):
            got = mask_of(post(client, png_bytes(GOOD), headers=headers))
            np.testing.assert_array_equal(got, expected_toy_mask(GOOD))
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        assert client.get("/metrics").status_code == 200
        assert "s3cret" not in client.get("/metrics").text
    with make_client(api_key="s3cret", metrics_require_key=True) as client:
        assert_error(client.get("/metrics"), 401)
        assert client.get("/metrics", headers={"X-API-Key": "s3cret"}).status_code == 200


# --- limits and overload ----------------------------------------------------------------------


def test_upload_over_the_byte_limit_is_413(make_client: Any) -> None:
    big = png_bytes(random_image(200, 200, seed=4))  # noise: ~40 kB
    with make_client(max_upload_bytes=10_000) as client:
        body = assert_error(post(client, big), 413, "larger than", "10,000")
        assert body["code"] == "too_large"
        small = png_bytes(np.zeros((20, 20), np.uint8))
        assert mask_of(post(client, small)).shape == (20, 20)


def test_streamed_upload_over_the_byte_limit_is_413(make_client: Any) -> None:
    """Without Content-Length (chunked) the limit holds as the body arrives."""
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    body = head + png_bytes(random_image(200, 200, seed=4)) + f"\r\n--{boundary}--\r\n".encode()
    with make_client(max_upload_bytes=10_000) as client:
        r = client.post(
            "/segment",
            content=(body[i : i + 4096] for i in range(0, len(body), 4096)),
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        )
        assert "content-length" not in r.request.headers
        assert assert_error(r, 413, "larger than", "10,000")["code"] == "too_large"
        assert_still_serves(client)


def test_image_over_the_pixel_limit_is_413(make_client: Any) -> None:
    with make_client(max_image_pixels=2800) as client:
        body = assert_error(post(client, png_bytes(random_image(40, 71))), 413, "2,800", "40")
        assert body["code"] == "too_large"
        assert_still_serves(client)  # 40 x 70 = 2800: exactly at the limit


def test_saturated_service_answers_503_with_retry_after(make_client: Any) -> None:
    img = random_image(2000, 2000, seed=5)  # long enough to keep the only worker busy
    data, expected = png_bytes(img), expected_toy_mask(img)
    with make_client(inference_workers=1, max_queue=0) as client:
        start = threading.Barrier(6)
        responses: list[httpx.Response] = []

        def fire() -> None:
            start.wait()
            responses.append(post(client, data))

        threads = [threading.Thread(target=fire) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(responses) == 6
        ok = [r for r in responses if r.status_code == 200]
        busy = [r for r in responses if r.status_code == 503]
        assert len(ok) + len(busy) == 6, [r.status_code for r in responses]
        assert ok and busy
        for r in ok:
            np.testing.assert_array_equal(mask_of(r), expected)
        for r in busy:
            body = assert_error(r, 503, "busy")
            assert body["code"] == "overloaded"
            assert r.headers["retry-after"] == "2"
        m = metric_samples(client)
        assert sample(m, "segment_requests_rejected_total") == len(busy)
        assert sample(m, "segment_requests_in_flight") == 0
        assert_still_serves(client)  # the place is given back


@pytest.mark.parametrize("arena", ["off", "shrink", "on"])
def test_every_cpu_arena_setting_gives_the_same_masks(model_dir: Path, arena: str) -> None:
    """SEG_CPU_MEMORY_ARENA changes how ONNX Runtime keeps memory, never an answer."""
    img = random_image(300, 410, seed=71)
    with running_app(model_dir, cpu_memory_arena=arena) as client:
        registry = client.app.state.registry  # type: ignore[attr-defined]
        session_options = registry.get("toy").session.get_session_options()
        assert session_options.enable_cpu_mem_arena is (arena != "off")
        r = post(client, png_bytes(img))
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(mask_of(r), expected_toy_mask(img))
        r3 = post(client, png_bytes(img), model="toy3")
        assert r3.status_code == 200, r3.text
    with running_app(model_dir) as client:  # the default
        assert np.array_equal(mask_of(post(client, png_bytes(img), model="toy3")), mask_of(r3))


@pytest.mark.parametrize("spinning", [True, False])
def test_ort_spinning_reaches_the_session_and_never_changes_an_answer(
    model_dir: Path, spinning: bool
) -> None:
    """SEG_ORT_SPINNING sets ONNX Runtime's thread spinning on every session it loads."""
    img = random_image(300, 410, seed=72)
    with running_app(model_dir, ort_spinning=spinning, intra_op_threads=2) as client:
        registry = client.app.state.registry  # type: ignore[attr-defined]
        for name in ("toy", "toy3"):
            options = registry.get(name).session.get_session_options()
            entry = options.get_session_config_entry("session.intra_op.allow_spinning")
            assert entry == ("1" if spinning else "0")
        r = post(client, png_bytes(img))
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(mask_of(r), expected_toy_mask(img))
