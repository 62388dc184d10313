"""The service on Ray Serve, on a real local Ray instance started here.

The application is ``deploy/ray/serve.yaml`` (only the ``nuclei`` model, fixed replica counts,
no GPU: :func:`bench.rayserve.local_config`), deployed as ``serve run`` deploys it: 2 ingress
replicas and 2 model replicas. What is shown:

- the same API: readiness, models, errors with request IDs, ``/metrics``;
- masks and scores identical to the standalone service's (a real uvicorn) on the held-out HeLa
  frames;
- tile batches of concurrent requests merged into one model call (the model replicas' batch
  counters, read through a handle);
- a model replica killed with ``ray.kill`` in the middle of a load: every request is answered
  with the correct mask or a JSON 503 with ``Retry-After``, none hangs, and Serve brings the
  replica back;
- back-pressure: a full model queue is the service's JSON 503 with ``Retry-After``; a full
  ingress queue is Serve's 503 with ``Retry-After``.

Ray runs with a few logical CPUs; the replicas share the machine's cores, so nothing here is
about speed (bench/scaling.py measures that).
"""

from __future__ import annotations

import base64
import copy
import io
import json
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

pytest.importorskip("ray", reason="Ray Serve comes with the scale extra (make install-dev)")

from ray import serve

from bench.images import TEST_FRAMES
from bench.live_server import metric_sample
from bench.rayserve import ServeApp, fixed_replicas, local_config, local_serve
from service.core.config import REPO_MODELS
from service.inference.precision import variant_files
from service.segmentation.registry import choose_variant, find_model_files, load_model
from service.segmentation.render import encode_mask
from service.segmentation.usecase import SegmentParams, Upload, segment
from tests.conftest import (
    decode_png,
    make_unloadable,
    png_bytes,
    random_image,
    segment_files,
    toy_server,
)

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = REPO_MODELS.parent
HELA = ROOT / "data" / "hela"
MODEL = "nuclei"
ENV = {
    "SEG_PROVIDERS": '["CPUExecutionProvider"]',
    "SEG_INTRA_OP_THREADS": "1",
    # Replicas and handles report their load every 0.5 s instead of every 10 s (for the
    # autoscaling test). Set from the start: changing the application's environment later
    # would restart every replica.
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
}
TIMEOUT_S = 120.0
# The lane's first deployment runs beside the install, lint and the other tests' start, with
# Ray's workers at nice 15: its whole setup took 285 s in one CI run (bench.rayserve's default
# wait for /readyz is 240 s).
FIRST_READY_S = 600.0


@pytest.fixture(scope="module")
def frames(data_sets: Path) -> dict[str, tuple[bytes, bytes]]:
    """The held-out frames as the service receives them: image TIFF and ground-truth TIFF."""
    return {
        stem: (
            (HELA / "images" / f"{stem}.tif").read_bytes(),
            (HELA / "masks" / f"{stem}.tif").read_bytes(),
        )
        for stem in TEST_FRAMES
    }


@pytest.fixture(scope="module")
def base_config() -> dict[str, Any]:
    """The tests' application: deploy/ray/serve.yaml with 2 ingress and 2 model replicas."""
    return local_config([MODEL], ingress_replicas=2, model_replicas=2, env=ENV)


@pytest.fixture(scope="module")
def ray_app(ray_cluster: None, base_config: dict[str, Any]) -> Iterator[ServeApp]:
    """``base_config`` deployed on the session's Ray; tests may redeploy it, each leaving it
    as the tests below it need it."""
    with local_serve(copy.deepcopy(base_config), num_cpus=4, ready_timeout=FIRST_READY_S) as app:
        yield app


def post(url: str, files: dict, **params: Any) -> httpx.Response:
    return httpx.post(f"{url}/segment", files=files, params=params, timeout=TIMEOUT_S)


def expected_mask(image: bytes) -> np.ndarray:
    """The mask the standalone pipeline makes, in process (one ONNX Runtime thread), in the
    precision ``auto`` runs on this host."""
    files = variant_files(find_model_files(REPO_MODELS)[MODEL].parent)
    loaded = {p: load_model(MODEL, f, ["CPUExecutionProvider"], 1, 8) for p, f in files.items()}
    model = loaded[choose_variant(loaded).precision]
    result = segment(model, Upload(io.BytesIO(image)), SegmentParams(), max_pixels=1 << 30)
    png = encode_mask(result, tiff=False)
    return np.asarray(decode_png(png))


def model_batch_stats(app: ServeApp) -> list[Any]:
    """Every model replica's batch counters (asked through a handle until each has answered)."""
    handle = serve.get_deployment_handle(f"model-{MODEL}", app_name="segment")
    replicas = app.replica_actors(f"model-{MODEL}")
    seen: dict[str, Any] = {}
    deadline = time.monotonic() + 30
    while len(seen) < len(replicas) and time.monotonic() < deadline:
        stats = handle.batch_stats.remote().result(timeout_s=30)
        seen[stats.replica] = stats
    assert len(seen) == len(replicas), "a model replica never answered"
    return list(seen.values())


def lost_batches_logged() -> int:
    """Lines of this Ray session's worker logs where an ingress sent a tile batch again
    because its model replica died (service.rayserve.app.RemoteModel)."""
    import ray

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    return sum(
        f.read_text(errors="replace").count("a replica was lost during a tile batch")
        for f in logs.glob("worker-*.err")
    )


def test_two_ingress_and_two_model_replicas_serve_the_same_api(ray_app: ServeApp) -> None:
    assert ray_app.running_replicas("SegmentIngress") == 2
    assert ray_app.running_replicas(f"model-{MODEL}") == 2
    assert len(ray_app.replica_actors(f"model-{MODEL}")) == 2

    ready = httpx.get(f"{ray_app.url}/readyz", timeout=10)
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "models": [MODEL], "failed": {}}
    assert httpx.get(f"{ray_app.url}/healthz", timeout=10).json() == {"status": "ok"}
    (info,) = httpx.get(f"{ray_app.url}/models", timeout=10).json()["models"]
    assert info["name"] == MODEL and info["default"] is True
    assert info["provider"] == "CPUExecutionProvider"  # reported by the model replica
    assert info["metadata"]["tile_size"] == 256

    # Errors: the service's JSON body, one request ID, the same in header and body.
    bad = post(ray_app.url, segment_files(b"GIF89a not really"), model=MODEL)
    assert bad.status_code == 415
    assert bad.json()["code"] == "unsupported_media_type"
    assert bad.headers.get_list("x-request-id") == [bad.json()["request_id"]]
    mine = httpx.post(
        f"{ray_app.url}/segment",
        files=segment_files(png_bytes(random_image(64, 64))),
        params={"model": "nope"},
        headers={"X-Request-ID": "lab-42"},
        timeout=TIMEOUT_S,
    )
    assert mine.status_code == 404
    assert mine.json()["code"] == "unknown_model"
    assert "available models: ['nuclei']" in mine.json()["detail"]
    assert mine.headers.get_list("x-request-id") == ["lab-42"] == [mine.json()["request_id"]]

    ok = post(ray_app.url, segment_files(png_bytes(random_image(300, 200))), format="json")
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert body["model"] == MODEL and body["tiles"] == 2
    assert ok.headers["x-model"] == f"{MODEL}/{info['version']}"
    metrics = httpx.get(f"{ray_app.url}/metrics", timeout=10).text
    for family in ("segment_requests_in_flight", "segment_tiles_total", "http_requests_total"):
        assert family in metrics


def test_metrics_are_the_whole_services_whichever_ingress_replica_answers(
    ray_app: ServeApp,
) -> None:
    """Serve's proxy sends each scrape to either ingress replica; /metrics merges both (the
    MetricsHub deployment), so totals neither jump between scrapes nor miss a replica's work."""

    def scrape() -> str:
        return httpx.get(f"{ray_app.url}/metrics", timeout=10).text

    time.sleep(5)  # both replicas have pushed since their last request (every 2 s)
    before = {metric_sample(scrape(), "segment_tiles_total", model=MODEL) for _ in range(6)}
    assert len(before) == 1, before
    image = png_bytes(random_image(300, 200))  # 2 tiles
    for _ in range(8):
        assert post(ray_app.url, segment_files(image)).status_code == 200
    time.sleep(5)
    after = [scrape() for _ in range(6)]
    (tiles_before,) = before
    assert {metric_sample(t, "segment_tiles_total", model=MODEL) for t in after} == {
        tiles_before + 16
    }
    # Per-process families stay per replica: one series for each of the 2 ingress replicas.
    replicas = {
        line.split('replica="')[1].split('"')[0]
        for line in after[0].splitlines()
        if line.startswith("process_resident_memory_bytes{")
    }
    assert len(replicas) == 2, replicas
    assert metric_sample(after[0], "segment_models_ready") == 1.0


def test_masks_and_scores_are_identical_to_the_standalone_service(
    ray_app: ServeApp, frames: dict[str, tuple[bytes, bytes]], tmp_path: Path
) -> None:
    with toy_server(REPO_MODELS, tmp_path, default_model=MODEL) as standalone:
        for stem, (image, truth) in frames.items():
            alone = post(standalone.url, segment_files(image, truth), format="json")
            on_ray = post(ray_app.url, segment_files(image, truth), format="json")
            assert alone.status_code == on_ray.status_code == 200, (alone.text, on_ray.text)
            a, r = alone.json(), on_ray.json()
            mask_a = np.asarray(decode_png(base64.b64decode(a["mask_png"])))
            mask_r = np.asarray(decode_png(base64.b64decode(r["mask_png"])))
            assert mask_a.shape == (700, 1100)
            assert np.array_equal(mask_a, mask_r), f"{stem}: masks differ"
            assert a["metrics"] == r["metrics"], stem
            assert a["metrics"]["iou"]["nucleus"] > 0.85, stem  # a real segmentation
            assert a["tiles"] == r["tiles"] == 15  # 700x1100 in 256-pixel tiles, overlap 0.125
            assert a["precision"] == r["precision"]  # auto: the same choice on the same host
            # The PNG answer is the same bytes.
            assert (
                post(standalone.url, segment_files(image)).content
                == post(ray_app.url, segment_files(image)).content
            )
        # The objects too (the default model gives instances): same labels, table and scores.
        image, truth = frames[TEST_FRAMES[0]]
        query = {"format": "json", "output": "labels"}
        alone = post(standalone.url, segment_files(image, truth), **query).json()
        on_ray = post(ray_app.url, segment_files(image, truth), **query).json()
        assert alone["labels_png"] == on_ray["labels_png"] and alone["object_count"] > 50
        assert alone["objects"] == on_ray["objects"]
        assert alone["object_metrics"] == on_ray["object_metrics"]
        assert alone["object_metrics"]["f1"] > 0.8
        # Every precision of the version, each giving what the standalone gives in it.
        info = httpx.get(f"{ray_app.url}/models/{MODEL}", timeout=10).json()
        alone_info = httpx.get(f"{standalone.url}/models/{MODEL}", timeout=10).json()
        assert info["auto"] == alone_info["auto"] and info["variants"] == alone_info["variants"]
        for precision in ("fp32", "int8", "fp16"):
            a = post(standalone.url, segment_files(image), precision=precision)
            r = post(ray_app.url, segment_files(image), precision=precision)
            assert r.headers["X-Precision"] == precision and a.content == r.content, precision
        # Ray serves each model's newest version; pinning an older one is the standalone's.
        pinned = post(ray_app.url, segment_files(image), model=f"{MODEL}@1")
        assert pinned.status_code == 404 and "versions of 'nuclei': ['6']" in pinned.text


def test_tile_batches_of_concurrent_requests_share_model_calls(ray_app: ServeApp) -> None:
    """256² images are one tile each: a model call with more than one tile holds tiles of
    several requests (a request's tiler waits for its batch before sending the next)."""
    before = sum(s.merged_calls for s in model_batch_stats(ray_app))
    images = [png_bytes(random_image(256, 256, seed=i)) for i in range(24)]

    def run(i: int) -> int:
        r = post(ray_app.url, segment_files(images[i]))
        assert r.status_code == 200, r.text
        assert decode_png(r.content).size == (256, 256)
        return int(r.status_code)

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(run, range(len(images)))) == [200] * len(images)
    stats = model_batch_stats(ray_app)
    merged = sum(s.merged_calls for s in stats) - before
    assert merged > 0, stats
    assert max(s.max_tiles_per_call for s in stats) > 1, stats
    assert max(s.max_batches_per_call for s in stats) > 1, stats


def test_a_model_replica_killed_mid_load_loses_no_request(
    ray_app: ServeApp, frames: dict[str, tuple[bytes, bytes]]
) -> None:
    import ray

    image = frames["frame_017"][0]
    expected = expected_mask(image)
    before = ray_app.replica_actors(f"model-{MODEL}")
    assert len(before) == 2
    logged_before = lost_batches_logged()  # the session's Ray may have run other applications

    def run(_: int) -> httpx.Response:
        return post(ray_app.url, segment_files(image))

    with ThreadPoolExecutor(10) as pool:
        futures = [pool.submit(run, i) for i in range(10)]
        time.sleep(1.5)  # requests are in their tile batches by now
        assert not all(f.done() for f in futures), "the load was over before the kill"
        ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
        answers = [f.result(timeout=TIMEOUT_S) for f in futures]

    statuses = [r.status_code for r in answers]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 1
    for r in answers:
        if r.status_code == 200:
            assert np.array_equal(np.asarray(decode_png(r.content)), expected)
        else:
            assert r.headers["retry-after"] == "2"
            assert r.json()["code"] in ("model_unavailable", "overloaded"), r.text
            assert r.headers.get_list("x-request-id") == [r.json()["request_id"]]

    # The kill did land in the middle of tile batches: the ingress logged sending them again.
    assert lost_batches_logged() > logged_before

    # Serve replaces the replica; the service keeps answering.
    deadline = time.monotonic() + 90
    while True:  # Serve's count and its actor list are read apart: wait for both to agree
        after = ray_app.replica_actors(f"model-{MODEL}")
        replaced = len(after) == 2 and before[0] not in after
        if replaced and ray_app.running_replicas(f"model-{MODEL}") == 2:
            break
        assert time.monotonic() < deadline, "the killed replica did not come back"
        time.sleep(0.5)
    assert before[1] in after
    again = post(ray_app.url, segment_files(image))
    assert again.status_code == 200
    assert np.array_equal(np.asarray(decode_png(again.content)), expected)


def test_model_replicas_autoscale_on_ongoing_requests(
    ray_app: ServeApp, frames: dict[str, tuple[bytes, bytes]]
) -> None:
    """Serve's autoscaler adds a model replica under load (ongoing requests above target) and
    goes back to one when idle (after 2 s here). Changing the range is an update in place: the
    other deployments' replicas keep running (bench.rayserve.fixed_replicas)."""
    ingress = ray_app.replica_actors("SegmentIngress")
    fixed = copy.deepcopy(ray_app.config)
    config = copy.deepcopy(fixed)  # load reported every 0.5 s (ENV)
    for d in config["applications"][0]["deployments"]:
        if d["name"] == f"model-{MODEL}":
            d["autoscaling_config"] = {
                "min_replicas": 1,
                "initial_replicas": 1,
                "max_replicas": 2,
                "target_ongoing_requests": 1,
                "upscale_delay_s": 0,
                "downscale_delay_s": 2,
                "look_back_period_s": 2,
            }
    ray_app.redeploy(config)
    ray_app.wait_replicas(f"model-{MODEL}", 1)  # idle: down to min_replicas
    image = frames["frame_017"][0]
    # 8 requests in flight until a second replica runs (or 180 s): a fixed number of requests
    # could end before a replica starting on a busy machine is ready (seen in CI).
    seen, statuses = set(), []
    deadline = time.monotonic() + 180
    with ThreadPoolExecutor(8) as pool:
        pending = {pool.submit(post, ray_app.url, segment_files(image)) for _ in range(8)}
        while pending:
            done = {f for f in pending if f.done()}
            statuses += [f.result().status_code for f in done]
            pending -= done
            seen.add(ray_app.running_replicas(f"model-{MODEL}"))
            if 2 not in seen and time.monotonic() < deadline:
                pending |= {pool.submit(post, ray_app.url, segment_files(image)) for _ in done}
            time.sleep(0.3)
    assert len(statuses) >= 8 and set(statuses) == {200}, statuses
    assert 2 in seen, f"running model replicas seen under load: {sorted(seen)}"
    ray_app.redeploy(fixed)  # the fixed 2 + 2 replicas again, for the tests below
    assert ray_app.replica_actors("SegmentIngress") == ingress, "the ingress was restarted"


def with_limits(config: dict[str, Any], deployment: str, **limits: int) -> dict[str, Any]:
    """``config`` with other options for one deployment."""
    config = copy.deepcopy(config)
    for d in config["applications"][0]["deployments"]:
        if d["name"] == deployment:
            d.update(limits)
    return config


def test_a_full_model_queue_is_a_json_503_with_retry_after(
    ray_app: ServeApp, frames: dict[str, tuple[bytes, bytes]]
) -> None:
    image = frames["frame_018"][0]
    ray_app.redeploy(
        with_limits(ray_app.config, f"model-{MODEL}", max_ongoing_requests=1, max_queued_requests=1)
    )
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: post(ray_app.url, segment_files(image)), range(12)))
    statuses = [r.status_code for r in answers]
    assert 503 in statuses and 200 in statuses, statuses
    for r in answers:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "2"
            assert r.json()["code"] == "overloaded"
            assert "queued" in r.json()["detail"]
    rejected = httpx.get(f"{ray_app.url}/metrics", timeout=10).text
    assert "segment_requests_rejected_total" in rejected


def test_a_full_ingress_queue_is_refused_by_serve_with_retry_after(
    ray_app: ServeApp, frames: dict[str, tuple[bytes, bytes]]
) -> None:
    image = frames["frame_019"][0]
    config = with_limits(
        ray_app.config, "SegmentIngress", max_ongoing_requests=1, max_queued_requests=1
    )
    ray_app.redeploy(with_limits(config, f"model-{MODEL}", max_ongoing_requests=64))
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: post(ray_app.url, segment_files(image)), range(8)))
    statuses = [r.status_code for r in answers]
    assert 503 in statuses and 200 in statuses, statuses
    for r in answers:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "2"
            assert "backpressure" in r.text


def test_scaling_quick_run_writes_its_tables(
    ray_app: ServeApp, base_config: dict[str, Any], tmp_path: Path
) -> None:
    """bench.scaling end to end, a few requests per case (no speed asserted): the real model
    on the tests' application (its queue limits above undone: an update in place), then the
    fixed-cost applications in its place. Last but one: the next test deploys its own."""
    from bench import scaling

    ray_app.redeploy(copy.deepcopy(base_config))
    data = scaling.measure(ray_app, quick=True)
    doc = tmp_path / "scaling.md"
    scaling.write(data, doc)
    data = json.loads(doc.with_suffix(".json").read_text())
    assert sorted((r["setup"], r["clients"]) for r in data["standalone"]) == [
        ("standalone (defaults)", 1),
        ("standalone (defaults)", 8),
        ("standalone, 1 ONNX Runtime thread", 1),
        ("standalone, 1 ONNX Runtime thread", 8),
    ]
    assert [(r["replicas"], r["clients"]) for r in data["ray_real"]] == [(2, 1), (2, 8)]
    assert [(r["replicas"], r["max_batch_tiles"]) for r in data["fixed_cost"]] == [(1, 1), (1, 16)]
    for row in data["standalone"] + data["ray_real"] + data["fixed_cost"]:
        assert row["per_s"] > 0 and row["p95_ms"] >= row["p50_ms"] > 0
    for row in data["ray_real"] + data["fixed_cost"]:
        assert row["model_calls"] > 0 and row["tiles_per_call"] >= 1
    # One tile per call when the batch is capped at one tile.
    assert data["fixed_cost"][0]["tiles_per_call"] == 1.0
    text = doc.read_text()
    assert "<!-- generated by bench.scaling: begin -->" in text
    assert "fixed cost, 1 replica(s), batch <= 16" in text


def test_a_model_that_cannot_load_is_reported_and_the_others_serve(
    ray_app: ServeApp, tmp_path: Path
) -> None:
    """As in the standalone service: /readyz 503 "degraded" naming it, 404 for it, the other
    models serve, and Serve does not restart its replica in a loop (a restart would not fix
    the file). A precision file that reads but does not run (metadata of 3 channels on a
    1-channel graph) is found by the first request that asks for it, in the model replica:
    a 503 naming it, without Retry-After, as the standalone service answers."""
    shutil.copytree(REPO_MODELS / MODEL, tmp_path / MODEL)
    make_unloadable(find_model_files(tmp_path)[MODEL].parent / "model.fp16.onnx")
    broken = tmp_path / "broken" / "1" / "model.onnx"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"this is not an ONNX model" * 10)
    config = copy.deepcopy(ray_app.config)
    app = config["applications"][0]
    app["args"] |= {"model_dir": str(tmp_path), "models": [MODEL, "broken"]}
    app["deployments"].append({"name": "model-broken", "autoscaling_config": fixed_replicas(1)})
    ray_app.redeploy(config, expect_ready=503)

    ready = httpx.get(f"{ray_app.url}/readyz", timeout=10)
    assert ready.status_code == 503
    body = ready.json()
    assert body["status"] == "degraded" and body["models"] == [MODEL]
    assert str(tmp_path) not in body["failed"]["broken"]  # no server paths in the answer
    unknown = post(ray_app.url, segment_files(png_bytes(random_image(64, 64))), model="broken")
    assert unknown.status_code == 404
    assert "failed to load" in unknown.json()["detail"]
    assert post(ray_app.url, segment_files(png_bytes(random_image(64, 64)))).status_code == 200
    for _ in range(2):
        r = post(ray_app.url, segment_files(png_bytes(random_image(64, 64))), precision="fp16")
        assert r.status_code == 503, r.text
        assert f"{MODEL} (fp16) could not be loaded" in r.json()["detail"], r.text
        assert "must be replaced" in r.json()["detail"] and "Retry-After" not in r.headers
    time.sleep(12)  # longer than a health-check period: nothing is being restarted
    assert ray_app.running_replicas("model-broken") == 1
    assert serve.status().applications["segment"].status == "RUNNING"
