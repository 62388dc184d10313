"""The models as Imaging Server Kit algorithms, driven by the real ``imaging_server_kit.Client``
(what napari-serverkit and QuPath's extension use) against the service on a real uvicorn.

The bundled ``nuclei`` (binary) and ``nuclei-3class`` models segment a HeLa-like 16-bit frame;
the mask must be exactly the one ``/segment`` gives for the same frame.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from bench.live_server import LiveServer, live_server
from service.api.serverkit import import_serverkit
from service.core.config import REPO_MODELS
from tests.conftest import READY_TIMEOUT_S, tiff_bytes
from tests.test_default_models import synthetic_nuclei

sk = import_serverkit()
from imaging_server_kit.core.errors import (  # noqa: E402  (after the offline import above)
    AlgorithmServerError,
    InvalidAlgorithmParametersError,
)

MODELS = ("nuclei", "nuclei-3class")


def bundled(root: Path) -> Path:
    """A model directory with the two bundled full-precision models."""
    root.mkdir()
    for name in MODELS:
        (root / name).symlink_to(REPO_MODELS / name)
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("serverkit")
    models = bundled(root / "models")
    settings = {"intra_op_threads": "1", "max_image_pixels": str(2000 * 2000)}
    with live_server(models, root / "work", settings, ready_timeout=READY_TIMEOUT_S) as srv:
        yield srv


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    """A HeLa-like 16-bit frame: bright blurred nuclei on a noisy background."""
    return synthetic_nuclei((300, 420), seed=3)


def segment_png(srv: LiveServer, image: np.ndarray, **params: Any) -> np.ndarray:
    r = httpx.post(
        f"{srv.url}/segment", files={"image": tiff_bytes(image)}, params=params, timeout=120
    )
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(r.content)))


def test_every_model_is_listed_with_its_parameters(server: LiveServer) -> None:
    client = sk.Client(f"{server.url}/serverkit")
    assert sorted(client.algorithms) == sorted(MODELS)
    binary = client.get_parameters("nuclei")["properties"]
    assert binary["threshold"]["default"] == 0.5
    assert (binary["threshold"]["min"], binary["threshold"]["max"]) == (0.01, 0.99)
    assert binary["overlap"]["default"] == 0.125 and binary["overlap"]["max"] == 0.75
    # precision=auto by default; each loaded precision of the newest version may be chosen.
    assert binary["precision"]["default"] == "auto"
    assert binary["precision"]["enum"] == ["auto", "fp32", "int8", "fp16"]
    assert binary["image"]["param_type"] == "image"
    multiclass = client.get_parameters("nuclei-3class")["properties"]
    assert "threshold" not in multiclass and "overlap" in multiclass


def test_a_frame_gives_the_same_mask_as_segment(server: LiveServer, frame: np.ndarray) -> None:
    client = sk.Client(f"{server.url}/serverkit")
    result = client.run(frame, algorithm="nuclei", threshold=0.4, overlap=0.5, output="mask")
    (layer,) = result.layers
    assert layer.kind == "mask" and layer.data.shape == frame.shape
    expected = segment_png(server, frame, threshold=0.4, overlap=0.5) > 0
    assert 0.02 < expected.mean() < 0.6  # nuclei were found, not everything
    np.testing.assert_array_equal(layer.data.astype(bool), expected)
    # The default model gives instances: its objects by default, as /segment?output=labels.
    (objects,) = client.run(frame, algorithm="nuclei", overlap=0.5).layers
    labels = segment_png(server, frame, overlap=0.5, output="labels")
    assert objects.name == "nuclei objects" and labels.max() > 5
    np.testing.assert_array_equal(np.asarray(objects.data), labels)

    # Each precision runs what /segment runs in it.
    for precision in ("fp32", "int8"):
        run = client.run(frame, algorithm="nuclei", precision=precision, output="mask")
        asked = segment_png(server, frame, precision=precision) > 0
        np.testing.assert_array_equal(run.layers[0].data.astype(bool), asked)

    classes = client.run(frame, algorithm="nuclei-3class", overlap=0.25).layers[0].data
    np.testing.assert_array_equal(classes, segment_png(server, frame, model="nuclei-3class"))
    assert set(np.unique(classes)) == {0, 1, 2}


def test_a_z_stack_is_segmented_plane_by_plane(server: LiveServer, frame: np.ndarray) -> None:
    stack = np.stack([frame, synthetic_nuclei(frame.shape, seed=4)])
    client = sk.Client(f"{server.url}/serverkit")
    mask = client.run(stack, algorithm="nuclei", output="mask").layers[0].data
    assert mask.shape == stack.shape
    np.testing.assert_array_equal(mask[1].astype(bool), segment_png(server, stack[1]) > 0)


def test_bad_input_gets_a_clear_error(server: LiveServer, frame: np.ndarray) -> None:
    """Server Kit's client raises on the service's 4xx with the service's message: 422 for a
    bad parameter or image, 413 (before decoding) for one over the pixel limit."""
    client = sk.Client(f"{server.url}/serverkit")
    with pytest.raises(InvalidAlgorithmParametersError, match="threshold") as bad:
        client.run(frame, algorithm="nuclei", threshold=1.5)
    assert bad.value.status_code == 422
    with pytest.raises(InvalidAlgorithmParametersError, match="precision: expected one of"):
        client.run(frame, algorithm="nuclei", precision="fp64")
    with pytest.raises(InvalidAlgorithmParametersError, match="NaN or infinite"):
        client.run(np.full((20, 20), np.nan, np.float32), algorithm="nuclei")
    with pytest.raises(AlgorithmServerError, match="at most 4,000,000 pixels") as big:
        client.run(np.zeros((2100, 2000), np.uint8), algorithm="nuclei")
    assert big.value.status_code == 413
    with pytest.raises(InvalidAlgorithmParametersError, match="2 or more dimensions"):
        client.run(np.zeros(50, np.uint8), algorithm="nuclei")
    # The service carries on.
    assert client.run(frame, algorithm="nuclei").layers[0].data.shape == frame.shape


def test_the_api_key_protects_the_algorithms(tmp_path: Path) -> None:
    models = bundled(tmp_path / "models")
    settings = {"intra_op_threads": "1", "api_key": "s3cret", "model_versions": "newest"}
    with live_server(models, tmp_path / "work", settings, ready_timeout=READY_TIMEOUT_S) as srv:
        with pytest.raises(AlgorithmServerError, match="API key"):
            sk.Client(f"{srv.url}/serverkit")
        r = httpx.get(
            f"{srv.url}/serverkit/algorithms", headers={"X-API-Key": "s3cret"}, timeout=10
        )
    assert r.status_code == 200 and sorted(r.json()["algorithms"]) == sorted(MODELS)


def test_the_mount_can_be_turned_off(make_client: Any) -> None:
    with make_client(serverkit_prefix="") as c:
        assert c.get("/serverkit/algorithms").status_code == 404
    with make_client() as c:
        assert c.get("/serverkit/algorithms").json() == {
            "algorithms": ["toy", "toy3", "toy3lv", "toyobj"]
        }


def test_a_model_with_instances_answers_its_objects(model_dir: Path, tmp_path: Path) -> None:
    """``toyobj`` separates touching nuclei: the Server Kit client gets a Mask layer of
    instance labels (napari shows it as a Labels layer), or the mask with output=mask."""
    from tests.test_instances import CENTRES, nuclei_image

    image, truth = nuclei_image(200, 200, CENTRES)
    settings = {"intra_op_threads": "1"}
    with live_server(model_dir, tmp_path / "work", settings, ready_timeout=READY_TIMEOUT_S) as srv:
        client = sk.Client(f"{srv.url}/serverkit")
        output = client.get_parameters("toyobj")["properties"]["output"]
        assert output["default"] == "labels"
        assert "output" not in client.get_parameters("toy")["properties"]
        (layer,) = client.run(image, algorithm="toyobj").layers
        assert layer.kind == "mask" and layer.name == "toyobj objects"
        labels = np.asarray(layer.data)
        assert labels.shape == image.shape and labels.max() == len(CENTRES)
        assert labels[40, 40] != labels[40, 57] and labels[40, 40] and labels[40, 57]
        for i in range(1, len(CENTRES) + 1):  # each true nucleus is one predicted object
            assert len(np.unique(labels[truth == i])) == 1
        mask = client.run(image, algorithm="toyobj", output="mask").layers[0].data
        np.testing.assert_array_equal(np.asarray(mask).astype(bool), truth > 0)
        with pytest.raises(InvalidAlgorithmParametersError, match="output"):
            client.run(image, algorithm="toyobj", output="outlines")
