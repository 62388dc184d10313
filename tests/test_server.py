"""The service as a real uvicorn process on loopback: start, serve, and a graceful SIGTERM."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.live_server import LiveServer, metric_sample
from tests.conftest import (
    decode_png,
    expected_toy_mask,
    png_bytes,
    random_image,
    segment_files,
    toy_server,
)

pytestmark = pytest.mark.slow

EXIT_TIMEOUT_S = 30.0


@pytest.fixture
def server(model_dir: Path, tmp_path: Path) -> Iterator[LiveServer]:
    """``uvicorn service.main:create_app --factory`` on a free loopback port, models loaded."""
    with toy_server(model_dir, tmp_path) as srv:
        yield srv


def test_real_server_segments_and_reports_metrics(server: LiveServer) -> None:
    img = random_image(150, 230, seed=31)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        r = client.post("/segment", files=segment_files(png_bytes(img)))
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png"
        mask = np.asarray(decode_png(r.content))
        np.testing.assert_array_equal(mask, expected_toy_mask(img))

        r = client.post("/segment", files=segment_files(png_bytes(img)), params={"format": "json"})
        assert r.status_code == 200 and r.json()["tiles"] > 0
        assert r.json()["provider"] == "CPUExecutionProvider"

        r = client.post("/segment", files=segment_files(b"GIF89a" + b"\0" * 32))
        assert r.status_code == 415 and "GIF" in r.json()["detail"]

        names = {m["name"] for m in client.get("/models").json()["models"]}
        assert names == {"toy", "toy3", "toy3lv", "toyobj"}

        text = client.get("/metrics").text
    assert metric_sample(text, "segment_inference_seconds_count", model="toy") == 2
    assert (metric_sample(text, "segment_tiles_total", model="toy") or 0) > 0
    assert (
        metric_sample(text, "segment_model_info", model="toy", provider="CPUExecutionProvider") == 1
    )
    assert metric_sample(text, "http_requests_total", handler="/segment", status="2xx") == 2
    assert metric_sample(text, "segment_errors_total", reason="unsupported_media_type") == 1


def test_sigterm_lets_the_request_in_flight_finish_then_exits_cleanly(server: LiveServer) -> None:
    img = random_image(2500, 2500, seed=32)  # about a second of work on one CPU thread
    data = png_bytes(img)
    result: dict[str, httpx.Response | BaseException] = {}

    def request() -> None:
        try:
            with httpx.Client(base_url=server.url, timeout=120) as client:
                result["response"] = client.post("/segment", files=segment_files(data))
        except BaseException as exc:
            result["error"] = exc

    worker = threading.Thread(target=request)
    worker.start()
    # Wait until the request is admitted and running, as the service itself reports it.
    deadline = time.monotonic() + 60
    with httpx.Client(base_url=server.url, timeout=5) as probe:
        while metric_sample(probe.get("/metrics").text, "segment_requests_in_flight") != 1:
            assert worker.is_alive(), result
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.01)

    server.proc.send_signal(signal.SIGTERM)
    worker.join(timeout=120)
    assert not worker.is_alive()
    assert "error" not in result, result
    response = result["response"]
    assert isinstance(response, httpx.Response)
    assert response.status_code == 200, response.text
    np.testing.assert_array_equal(np.asarray(decode_png(response.content)), expected_toy_mask(img))

    # uvicorn (>= 0.29) shuts down gracefully, then re-raises the signal it caught so that the
    # parent sees why it stopped: a clean stop on SIGTERM ends "killed by SIGTERM" (shell: 143).
    code = server.proc.wait(timeout=EXIT_TIMEOUT_S)
    log = server.output()
    assert code in (0, -signal.SIGTERM), log
    assert "Application shutdown complete" in log and "Finished server process" in log
    assert "Traceback" not in log and "ERROR" not in log
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/healthz", timeout=2)


def test_json_logs_are_one_object_per_line_for_the_service_and_uvicorn(
    model_dir: Path, tmp_path: Path
) -> None:
    """``SEG_LOG_FORMAT=json``: every line a real uvicorn run writes parses as JSON, and each
    request's access line says what a log stack needs to find and group it."""
    img = random_image(120, 90, seed=33)
    with toy_server(model_dir, tmp_path, graceful_stop=True, log_format="json") as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            ok = client.post(
                "/segment", files=segment_files(png_bytes(img)), headers={"X-Request-ID": "ok-1"}
            )
            bad = client.post("/segment?model=toy", files=segment_files(b"GIF89a" + b"\0" * 32))
            client.get("/models")
        assert ok.status_code == 200 and bad.status_code == 415
    lines = [line for line in srv.log.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line, uvicorn's own included
    assert len(records) == len(lines) > 5
    for record in records:
        assert {"time", "level", "logger", "message", "request_id"} <= set(record), record
    loggers = {r["logger"] for r in records}
    expected = {"uvicorn.error", "uvicorn.access", "service", "service.segmentation.registry"}
    assert expected <= loggers
    assert any(r["message"].startswith("Finished server process") for r in records)

    access = [r for r in records if r["logger"] == "uvicorn.access"]
    (segmented,) = [r for r in access if r["request_id"] == "ok-1"]
    assert segmented["method"] == "POST" and segmented["path"] == "/segment"
    assert segmented["status"] == 200 and segmented["duration_ms"] > 0
    assert segmented["model"] == "toy" and segmented["tiles"] > 0
    assert segmented["bytes"] == len(png_bytes(img))

    rid = bad.headers["x-request-id"]
    refused = [r for r in records if r["request_id"] == rid]
    assert {r["logger"] for r in refused} == {"service", "uvicorn.access"}
    (line,) = [r for r in refused if r["logger"] == "uvicorn.access"]
    assert line["status"] == 415 and line["query"] == "model=toy" and "model" not in line
    assert any("GIF" in r["message"] for r in refused if r["logger"] == "service")


def test_text_logs_carry_the_request_id_on_uvicorns_access_lines_too(
    model_dir: Path, tmp_path: Path
) -> None:
    """The default text log: the access line of a request has its request ID, as the service's
    own lines do (what docs/operations.md promises for every line)."""
    img = random_image(64, 64, seed=34)
    with toy_server(model_dir, tmp_path, graceful_stop=True) as srv:
        r = httpx.post(
            f"{srv.url}/segment",
            files=segment_files(png_bytes(img)),
            headers={"X-Request-ID": "lab-42"},
            timeout=30,
        )
        assert r.status_code == 200
    lines = srv.log.read_text().splitlines()
    access = [ln for ln in lines if " uvicorn.access " in ln and "POST /segment" in ln]
    assert len(access) == 1 and "[lab-42]" in access[0], access
    started = [ln for ln in lines if "Application startup complete" in ln]
    assert started and " uvicorn.error [-] " in started[0], started
