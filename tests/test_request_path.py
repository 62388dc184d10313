"""One request path: a request walks each step of the use case once, whichever way it came in.

The steps are counted by a profile hook on every thread of a real app (no step is replaced):
before the one use case, a ``/segment`` request with ``diameter=`` made its scale plan 4-5
times and walked back into the segmenter seven times (issue 25).
"""

from __future__ import annotations

import base64
import io
import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import pytest
import tifffile
from fastapi.testclient import TestClient

from bench.onnx_models import build_model
from service.inference import rescale, tiling
from service.segmentation import images, memory, render, runner, usecase
from tests.conftest import png_bytes, random_image, running_app

# Each step of a request, by its function: the count of calls one request makes.
STEPS: dict[str, Callable[..., Any]] = {
    "probe": images.probe,
    "plan": usecase.plan,
    "plan_scale": rescale.plan_scale,
    "count_tiles": tiling.count_tiles,
    "request_memory": memory.request_memory,
    "submit": runner.Runner.submit,
    "run": usecase.run,
    "decode": images.decode,
    "encode_mask": render.encode_mask,
}
CODES = {fn.__code__: name for name, fn in STEPS.items()}


@contextmanager
def counting() -> Iterator[Counter[str]]:
    """Count the steps called on any thread while the block runs."""
    calls: Counter[str] = Counter()
    lock = threading.Lock()

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code in CODES:
            with lock:
                calls[CODES[frame.f_code]] += 1

    threading.setprofile(hook)  # type: ignore[arg-type]
    sys.setprofile(hook)  # type: ignore[arg-type]
    try:
        yield calls
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Counter[str]]]:
    """A model with a training scale (12 px objects), behind an app whose every thread (event
    loop, thread pool, inference workers) is watched from its start."""
    root = tmp_path_factory.mktemp("path_models")
    build_model(root / "disc/1/model.onnx", name="disc", tile_size=32, object_diameter=12.0)
    with counting() as calls, running_app(root, default_model="disc", serverkit_prefix="/sk") as c:
        yield c, calls


def walk(app: tuple[TestClient, Counter[str]], send: Callable[[TestClient], Any]) -> dict:
    client, calls = app
    calls.clear()
    answer = send(client)
    assert answer.status_code in (200, 202), answer.text
    return dict(calls)


ONCE = {"probe", "plan", "count_tiles", "request_memory", "submit", "run", "decode"}


@pytest.mark.parametrize("diameter", [None, 24.0])
def test_segment_makes_each_step_once(app: tuple[TestClient, Counter[str]], diameter: Any) -> None:
    image = png_bytes(random_image(90, 120))
    params = {} if diameter is None else {"diameter": diameter}
    steps = walk(app, lambda c: c.post("/segment", files={"image": image}, params=params))
    expected = dict.fromkeys(ONCE | {"encode_mask"}, 1)
    if diameter is not None:
        expected["plan_scale"] = 1
    assert steps == expected


def test_a_ground_truth_is_probed_and_decoded_once_too(
    app: tuple[TestClient, Counter[str]],
) -> None:
    image, truth = random_image(90, 120), random_image(90, 120) > 128
    files = {"image": png_bytes(image), "ground_truth": png_bytes(truth.astype("uint8") * 255)}
    steps = walk(
        app,
        lambda c: c.post(
            "/segment", files=files, params={"diameter": 24}, headers={"Accept": "application/json"}
        ),
    )
    assert steps == dict.fromkeys(ONCE | {"encode_mask", "plan_scale"}, 1) | {
        "probe": 2,
        "decode": 2,
    }


def test_a_job_makes_each_step_once(app: tuple[TestClient, Counter[str]]) -> None:
    """Planned when posted, run on a worker, encoded when its result is fetched."""
    client, calls = app
    calls.clear()
    image = png_bytes(random_image(90, 120))
    job = client.post("/jobs", files={"image": image}, params={"diameter": 24}).json()
    deadline = time.monotonic() + 30
    while client.get(job["status_url"]).json()["state"] != "succeeded":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert client.get(job["result_url"]).status_code == 200
    assert dict(calls) == dict.fromkeys(ONCE | {"encode_mask", "plan_scale"}, 1)


def test_serverkit_makes_each_step_once(app: tuple[TestClient, Counter[str]]) -> None:
    tiff = io.BytesIO()
    tifffile.imwrite(tiff, random_image(90, 120))
    body = json.dumps(
        [
            {"kind": "image", "name": "image", "data": base64.b64encode(tiff.getvalue()).decode()},
            {"kind": "float", "name": "diameter", "data": 24.0},
        ]
    )
    steps = walk(
        app,
        lambda c: c.post(
            "/sk/disc/process", content=body, headers={"content-type": "application/json"}
        ),
    )
    # The array's header is read from its shape (no probe); the mask goes out as a layer.
    assert steps == dict.fromkeys(ONCE - {"probe"} | {"plan_scale"}, 1)
