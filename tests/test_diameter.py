"""Object size: ``diameter=`` rescales the image to the model's training scale
(``object_diameter`` in its metadata) before tiling, and the mask back to the image's size.

Real parts: the resampling is checked against Pillow's own ``BILINEAR``; the pipeline runs real
ONNX Runtime sessions; the API answers from a real uvicorn serving small ONNX models that carry
a training scale, and one that does not.
"""

from __future__ import annotations

import base64
import io
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tifffile
from PIL import Image

from bench.live_server import LiveServer
from bench.onnx_models import build_model
from service.inference.modelmeta import ModelMetadata, Normalization
from service.inference.normalize import compute_intensity_stats
from service.inference.pipeline import predict_mask
from service.inference.rescale import (
    RESAMPLE_CHUNK_BYTES,
    ScaleError,
    ScalePlan,
    StripResampler,
    linear_taps,
    plan_scale,
    resize_image,
)
from service.segmentation.images import ImageHeader
from service.segmentation.memory import request_memory
from tests.conftest import decode_png, png_bytes, segment_files, tiff_bytes, toy_server

TRAINED = 12.0  # the toy models' training scale: objects 12 px across
MAX_PIXELS = 60_000  # the test server's pixel limit (small, so that a 413 is cheap to reach)


def discs(height: int, width: int, diameter: float, seed: int = 0) -> np.ndarray:
    """Bright discs of ``diameter`` pixels on a dark, slightly noisy background (uint8)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    img = np.full((height, width), 30.0)
    step = int(diameter * 1.8)
    for cy in range(int(diameter // 2) + 1, height, step):
        for cx in range(int(diameter // 2) + 1 + (cy // step % 2) * step // 2, width, step):
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= (diameter / 2) ** 2] = 200.0
    img += rng.normal(0, 4, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def pil_resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pillow's BILINEAR resampling of a 2-D array (float32 in, float32 out)."""
    return np.asarray(
        Image.fromarray(img.astype(np.float32), mode="F").resize((width, height), Image.BILINEAR)
    )


@pytest.fixture(scope="module")
def scaled_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``disc`` (binary, pointwise: its mask is known), ``blob`` (binary, a 5x5 convolution:
    its answer depends on the scale) and ``multi`` (3 classes), all trained at 12 px; ``plain``
    without a training scale."""
    root = tmp_path_factory.mktemp("scaled_models")
    build_model(root / "disc/1/model.onnx", name="disc", tile_size=32, object_diameter=TRAINED)
    build_model(
        root / "blob/1/model.onnx",
        name="blob",
        tile_size=32,
        kernel=5,
        seed=3,
        object_diameter=TRAINED,
    )
    build_model(
        root / "multi/1/model.onnx",
        name="multi",
        classes=["background", "a", "b"],
        kernel=3,
        tile_size=32,
        seed=1,
        object_diameter=TRAINED,
    )
    build_model(root / "plain/1/model.onnx", name="plain", tile_size=32)
    return root


@pytest.fixture(scope="module")
def server(scaled_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with toy_server(
        scaled_models,
        tmp_path_factory.mktemp("diameter_server"),
        default_model="disc",
        max_image_pixels=str(MAX_PIXELS),
    ) as srv:
        yield srv


def post(
    srv: LiveServer, img: np.ndarray, path: str = "/segment", **params: object
) -> httpx.Response:
    return httpx.post(
        f"{srv.url}{path}",
        files=segment_files(png_bytes(img)),
        params={k: str(v) for k, v in params.items()},
        timeout=120,
    )


def mask_of(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    if r.headers["content-type"].startswith("application/json"):
        return np.asarray(decode_png(base64.b64decode(r.json()["mask_png"])))
    return np.asarray(decode_png(r.content))


def scaled(meta: ModelMetadata, header: ImageHeader, diameter: float) -> ScalePlan:
    """The scale plan the use case makes for ``diameter`` on this image."""
    return plan_scale(meta, diameter, header.height, header.width)


# --- resampling --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("src", "dst"), [((37, 53), (11, 70)), ((20, 21), (201, 13)), ((5, 7), (1, 1))]
)
def test_resampling_is_pillows_bilinear(src: tuple[int, int], dst: tuple[int, int]) -> None:
    """Enlarging and shrinking, each axis on its own: the same values as Pillow's BILINEAR."""
    img = np.random.default_rng(0).random(src).astype(np.float32) * 1000
    ours = resize_image(img[..., None], dst)[..., 0]
    np.testing.assert_allclose(ours, pil_resize(img, dst[1], dst[0]), rtol=0, atol=1e-3)


def test_resampling_keeps_integer_types_and_channels() -> None:
    rng = np.random.default_rng(1)
    for dtype, high in ((np.uint8, 256), (np.uint16, 65536)):
        img = rng.integers(0, high, (31, 17, 3)).astype(dtype)
        out = resize_image(img, (62, 9))
        assert out.dtype == dtype and out.shape == (62, 9, 3)
        for c in range(3):
            expected = np.rint(pil_resize(img[..., c], 9, 62))
            np.testing.assert_allclose(out[..., c], expected, atol=1)
    assert np.array_equal(resize_image(img, (31, 17)), img)  # the same size is the identity


def test_streamed_back_resampling_equals_resampling_the_whole_map() -> None:
    """Strips of any height, in order, give exactly the rows the whole map resampled gives."""
    prob = np.random.default_rng(2).random((45, 33, 2)).astype(np.float32)
    for dst in ((90, 66), (13, 71), (45, 33)):
        for rows in (1, 7, 45):
            resampler = StripResampler((45, 33), dst, lambda strip: strip)
            pieces = [resampler(prob[r : r + rows]) for r in range(0, 45, rows)]
            # The same sums, columns before rows here: equal to float32 rounding.
            np.testing.assert_allclose(
                np.concatenate(pieces), resize_image(prob, dst), rtol=0, atol=1e-6
            )


def test_taps_weights_sum_to_one() -> None:
    for n_in, n_out in ((100, 10), (10, 100), (7, 7), (1, 5), (5, 1)):
        idx, w = linear_taps(n_in, n_out)
        assert idx.min() >= 0 and idx.max() < n_in
        np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-6)


# --- the pipeline ------------------------------------------------------------------------------


def ort_predictor(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def session_predict(session: ort.InferenceSession) -> Callable[[np.ndarray], np.ndarray]:
    name = session.get_inputs()[0].name
    return lambda tiles: session.run(None, {name: tiles})[0]


@pytest.mark.parametrize("model", ["disc", "blob", "multi"])
def test_the_mask_has_the_images_shape(scaled_models: Path, model: str) -> None:
    """Odd sizes, shrinking and enlarging, multichannel-free and argmax alike."""
    session = ort_predictor(scaled_models / model / "1/model.onnx")
    meta = ModelMetadata.from_props(dict(session.get_modelmeta().custom_metadata_map))
    img = discs(47, 61, 18)
    for diameter in (30.0, 7.0, 1.3, 119.0):
        mask = predict_mask(img, meta, session_predict(session), diameter=diameter)
        assert mask.shape == (47, 61) and mask.dtype == np.uint8
        assert mask.max() < meta.num_classes


def test_a_factor_near_one_is_a_no_op(scaled_models: Path) -> None:
    session = ort_predictor(scaled_models / "blob/1/model.onnx")
    meta = ModelMetadata.from_props(dict(session.get_modelmeta().custom_metadata_map))
    img = discs(53, 41, 12)
    plain = predict_mask(img, meta, session_predict(session))
    for diameter in (TRAINED / 1.049, TRAINED, TRAINED / 0.951):
        assert not plan_scale(meta, diameter, 53, 41).resampled
        same = predict_mask(img, meta, session_predict(session), diameter=diameter)
        assert np.array_equal(same, plain)
    assert plan_scale(meta, TRAINED / 1.06, 53, 41).resampled
    assert plan_scale(meta, TRAINED / 0.94, 53, 41).resampled


def test_intensity_statistics_come_from_the_original_image(tmp_path: Path) -> None:
    """A percentile-normalised model: the statistics of the original image, not of the
    resampled one (enlarging a small bright object changes its share of the pixels)."""
    meta = build_model(
        tmp_path / "p/1/model.onnx",
        name="p",
        tile_size=32,
        normalization=Normalization(method="percentile", low=1.0, high=99.0),
        object_diameter=TRAINED,
    )
    seen: list[np.ndarray] = []

    def record(tiles: np.ndarray) -> np.ndarray:
        seen.append(tiles)
        return np.zeros((*tiles.shape[:3], 1), np.float32)

    img = discs(40, 40, 6)[..., None]
    predict_mask(img, meta, record, diameter=3.0)  # enlarged 4x: 160x160
    original = compute_intensity_stats(img, meta.normalization)
    resized = resize_image(img, (160, 160))
    # Interpolation smooths the noise: the resized image's own percentiles differ.
    assert not np.allclose(
        compute_intensity_stats(resized, meta.normalization).offset, original.offset
    )
    # The first tile (at 0, 0) is the resized image normalised with the original's statistics.
    np.testing.assert_array_equal(seen[0][0], original.apply(resized[:32, :32]))


def test_memory_estimate_grows_with_an_enlarging_diameter() -> None:
    meta = ModelMetadata(
        name="m",
        task="binary",
        classes=["bg", "fg"],
        tile_size=256,
        channels=1,
        object_diameter=TRAINED,
    )
    header = ImageHeader("TIFF", 4000, 3000, 1, 4000 * 3000 * 2, 1000)
    plain = request_memory(meta, header, 8)
    # not resampled
    assert request_memory(meta, header, 8, scale=scaled(meta, header, TRAINED)) == plain
    doubled = request_memory(meta, header, 8, scale=scaled(meta, header, TRAINED / 2))
    tenfold = request_memory(meta, header, 8, scale=scaled(meta, header, TRAINED / 10))
    # At least the rescaled 16-bit plane itself: 4 and 100 times the pixels.
    assert doubled - plain >= 4 * 4000 * 3000 * 2
    assert tenfold - plain >= 100 * 4000 * 3000 * 2
    assert plain < doubled < tenfold
    # Shrinking adds the small plane and bounded buffers, nothing of the image's size.
    shrunk = request_memory(meta, header, 8, scale=scaled(meta, header, TRAINED * 4)) - plain
    assert 1000 * 750 * 2 < shrunk < 1000 * 750 * 2 + 2 * RESAMPLE_CHUNK_BYTES


def test_the_estimate_bounds_what_an_enlarged_image_allocates(scaled_models: Path) -> None:
    """NumPy's allocations (traced) while a 3x enlarged image is segmented stay under the
    estimate's growth over the same image unscaled, plus what the unscaled request took."""
    session = ort_predictor(scaled_models / "disc/1/model.onnx")
    meta = ModelMetadata.from_props(dict(session.get_modelmeta().custom_metadata_map))
    img = discs(300, 420, 12)
    header = ImageHeader("PNG", 420, 300, 1, img.nbytes, 1000)
    peaks = {}
    for diameter in (None, TRAINED / 3):
        tracemalloc.start()
        predict_mask(img, meta, session_predict(session), diameter=diameter)
        peaks[diameter] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    enlarged = request_memory(meta, header, 8, scale=scaled(meta, header, TRAINED / 3))
    grown = enlarged - request_memory(meta, header, 8)
    assert peaks[TRAINED / 3] - peaks[None] <= grown, (peaks, grown)
    assert peaks[TRAINED / 3] > peaks[None] + 9 * img.nbytes  # the enlarged plane was made


# --- the API ------------------------------------------------------------------------------------


def test_diameter_gives_the_mask_of_the_image_rescaled_by_hand(server: LiveServer) -> None:
    """Discs 24 px across, model trained at 12: the mask is the one of the image halved by
    hand (Pillow), segmented as it is, and its probabilities... here its mask, brought back by
    hand: equal but for pixels at the discs' edges."""
    img = discs(101, 77, 24)
    for model in ("disc", "blob"):
        r = post(server, img, model=model, diameter=24, format="json")
        mask = mask_of(r)
        assert mask.shape == img.shape
        assert r.headers["X-Segment-Scale"] == "0.5"
        scale = r.json()["scale"]
        assert scale == {
            "diameter": 24.0,
            "model_diameter": TRAINED,
            "factor": 0.5,
            "resampled": True,
            "width": 39,
            "height": 51,
        }
        small = np.rint(pil_resize(img, 39, 51)).astype(np.uint8)
        by_hand_r = post(server, small, model=model, format="json")
        assert r.json()["tiles"] == by_hand_r.json()["tiles"]  # the model ran on the same size
        by_hand = pil_resize(mask_of(by_hand_r).astype(np.float32), 77, 101) >= 127.5
        differ = (mask > 0) != by_hand
        # Only where the mask changes within a pixel or two (an edge), never inside a region.
        edge = np.zeros_like(differ)
        m = by_hand
        for dy in (-2, -1, 0, 1, 2):
            for dx in (-2, -1, 0, 1, 2):
                edge |= m != np.roll(np.roll(m, dy, 0), dx, 1)
        assert not (differ & ~edge).any(), model
        assert differ.mean() < 0.03, (model, differ.mean())
    # The pointwise model finds the discs themselves.
    truth = img > 115
    disc_mask = mask_of(post(server, img, model="disc", diameter=24)) > 0
    assert (disc_mask != truth).mean() < 0.03


def test_the_scale_matters_for_a_model_that_looks_at_neighbours(server: LiveServer) -> None:
    """blob (a 5x5 filter) at 24 px discs: with diameter=24 its answer is that of the
    training scale, and differs from the unscaled one."""
    img = discs(101, 77, 24)
    scaled = mask_of(post(server, img, model="blob", diameter=24))
    unscaled = mask_of(post(server, img, model="blob"))
    assert (scaled != unscaled).mean() > 0.005


def test_enlarging_keeps_odd_sizes(server: LiveServer) -> None:
    img = discs(53, 41, 6)
    r = post(server, img, model="multi", diameter=6, format="json")
    assert mask_of(r).shape == (53, 41)
    assert r.json()["scale"]["width"] == 82 and r.json()["scale"]["height"] == 106
    assert r.headers["X-Segment-Scale"] == "2"


def test_a_factor_near_one_answers_the_same_bytes(server: LiveServer) -> None:
    img = discs(60, 50, 12)
    plain = post(server, img, model="blob")
    near = post(server, img, model="blob", diameter=12.4)
    assert near.content == plain.content
    assert near.headers["X-Segment-Scale"] == "1"
    doc = post(server, img, model="blob", diameter=12.4, format="json").json()
    assert doc["scale"]["resampled"] is False and doc["scale"]["factor"] == pytest.approx(12 / 12.4)
    assert "X-Segment-Scale" not in plain.headers
    assert post(server, img, model="blob", format="json").json()["scale"] is None


@pytest.mark.parametrize("value", ["0", "-3", "abc", "inf", "nan", ""])
def test_a_diameter_that_is_not_a_positive_number_is_422(server: LiveServer, value: str) -> None:
    r = httpx.post(
        f"{server.url}/segment",
        files=segment_files(png_bytes(discs(40, 40, 12))),
        params={"diameter": value},
        timeout=60,
    )
    assert r.status_code == 422, r.text
    assert "diameter" in r.json()["detail"]


def test_a_model_without_a_training_scale_refuses_diameter(server: LiveServer) -> None:
    for path in ("/segment", "/jobs"):
        r = post(server, discs(40, 40, 12), path=path, model="plain", diameter=12)
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["code"] == "invalid_parameter"
        assert "'plain'" in body["detail"] and "training scale" in body["detail"]
    # Without diameter the model serves as before.
    assert post(server, discs(40, 40, 12), model="plain").status_code == 200


def test_a_diameter_beyond_tenfold_is_422_with_the_range(server: LiveServer) -> None:
    for diameter in (1.0, 200.0):
        r = post(server, discs(40, 40, 12), model="disc", diameter=diameter)
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert "between 1.2 and 120 px" in detail and "'disc'" in detail, detail


def test_a_rescaled_image_over_the_pixel_limit_is_413_with_the_numbers(
    server: LiveServer,
) -> None:
    img = discs(150, 150, 4)  # 22 500 pixels, under the limit; 3x: 202 500, over it
    r = post(server, img, model="disc", diameter=4)
    assert r.status_code == 413, r.text
    body = r.json()
    assert body["code"] == "too_large"
    assert "450x450" in body["detail"] and "202,500" in body["detail"]
    assert f"{MAX_PIXELS:,}" in body["detail"] and "diameter" in body["detail"]
    # The diameter it suggests fits.
    assert post(server, img, model="disc", diameter=7.75).status_code == 200


def test_jobs_rescale_like_segment(server: LiveServer) -> None:
    img = discs(101, 77, 24)
    r = post(server, img, path="/jobs", model="blob", diameter=24)
    assert r.status_code == 202, r.text
    job = r.json()
    deadline = time.monotonic() + 60
    while (status := httpx.get(f"{server.url}{job['status_url']}").json())["state"] not in (
        "succeeded",
        "failed",
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert status["state"] == "succeeded", status
    direct = post(server, img, model="blob", diameter=24, format="json").json()
    assert status["tiles_total"] == direct["tiles"]
    result = httpx.get(f"{server.url}{job['result_url']}")
    assert result.headers["X-Segment-Scale"] == "0.5"
    np.testing.assert_array_equal(
        mask_of(result), mask_of(post(server, img, model="blob", diameter=24))
    )


def test_a_stack_is_rescaled_plane_by_plane(server: LiveServer) -> None:
    planes = np.stack([discs(45, 37, 24, seed=s) for s in range(3)])
    r = httpx.post(
        f"{server.url}/segment",
        files=segment_files(tiff_bytes(planes, photometric="minisblack")),
        params={"model": "blob", "diameter": "24", "format": "tiff"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.headers["X-Segment-Scale"] == "0.5"
    stack = tifffile.imread(io.BytesIO(r.content))
    assert stack.shape == planes.shape
    for plane, mask in zip(planes, stack, strict=True):
        np.testing.assert_array_equal(mask, mask_of(post(server, plane, model="blob", diameter=24)))


def test_models_list_the_training_scale(server: LiveServer) -> None:
    models = {m["name"]: m for m in httpx.get(f"{server.url}/models").json()["models"]}
    assert models["disc"]["metadata"]["object_diameter"] == TRAINED
    assert models["plain"]["metadata"]["object_diameter"] is None


def test_scale_error_names_the_model() -> None:
    meta = ModelMetadata(name="m", task="binary", classes=["bg", "fg"], tile_size=32, channels=1)
    with pytest.raises(ScaleError, match="'served' has no training scale"):
        plan_scale(meta, 10.0, 5, 5, name="served")


def test_server_kit_takes_the_diameter_of_models_with_a_training_scale(
    server: LiveServer,
) -> None:
    """The real ``imaging_server_kit.Client``: a diameter parameter (default: the training
    scale) for models that have one, none for the others, and the same mask as /segment."""
    from service.api.serverkit import import_serverkit

    sk = import_serverkit()
    client = sk.Client(f"{server.url}/serverkit")
    blob = client.get_parameters("blob")["properties"]
    assert blob["diameter"]["default"] == TRAINED
    assert (blob["diameter"]["min"], blob["diameter"]["max"]) == (1.2, 120.0)
    assert "diameter" not in client.get_parameters("plain")["properties"]
    img = discs(101, 77, 24)
    mask = client.run(img, algorithm="blob", diameter=24.0).layers[0].data
    expected = mask_of(post(server, img, model="blob", diameter=24)) > 0
    np.testing.assert_array_equal(mask.astype(bool), expected)
    # The default (the training scale) leaves the image as it is.
    as_is = client.run(img, algorithm="blob").layers[0].data
    np.testing.assert_array_equal(as_is.astype(bool), mask_of(post(server, img, model="blob")) > 0)
    multi = client.run(img, algorithm="multi", diameter=24.0).layers[0].data
    np.testing.assert_array_equal(multi, mask_of(post(server, img, model="multi", diameter=24)))


def test_the_client_and_its_command_line_pass_the_diameter(
    server: LiveServer, tmp_path: Path
) -> None:
    from segment_client import SegmentClient
    from segment_client.cli import run

    img = discs(101, 77, 24)
    expected = mask_of(post(server, img, model="blob", diameter=24)) > 0
    result = SegmentClient(server.url).segment(img, model="blob", diameter=24)
    assert result.document["scale"]["factor"] == 0.5
    np.testing.assert_array_equal(result.mask.astype(bool), expected)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "discs.png").write_bytes(png_bytes(img))
    argv = [str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--url", server.url]
    assert run([*argv, "--model", "blob", "--diameter", "24", "--no-progress"]) == 0
    written = np.asarray(Image.open(tmp_path / "out" / "discs.png"))
    np.testing.assert_array_equal(written > 0, expected)
