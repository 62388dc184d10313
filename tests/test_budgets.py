"""Memory, spool space and upload time as budgets, against a real uvicorn process.

Each test gives the service a budget small enough to run out of and checks what a lab user gets:
413 with the numbers for what can never fit, 503 + ``Retry-After`` for what does not fit now,
408 for uploads that arrive too slowly; never a 400 or a 5xx, nothing left behind, and the next
request served. The container tests (tests/test_containers.py) do the same under real kernel
limits: podman's ``--memory`` and a small tmpfs. Figures go to ``docs/reliability.md``.
"""

from __future__ import annotations

import contextlib
import io
import math
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from bench.live_server import live_server
from service.core.config import REPO_MODELS
from service.core.resources import MIB
from service.inference.modelmeta import ModelMetadata
from service.segmentation.images import ImageHeader
from service.segmentation.memory import request_memory
from tests.conftest import (
    decode_png,
    expected_toy_mask,
    http_head,
    png_bytes,
    random_image,
    read_response,
    segment_files,
    segment_ok,
    tiff_bytes,
    toy_server,
)
from tests.figures import record

pytestmark = pytest.mark.slow


def zeros_png16(side: int) -> bytes:
    """A 16-bit grey PNG of ``side``² zeros: hundreds of MB decoded, a few hundred KB sent."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((side, side), np.uint16)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def multipart(data: bytes) -> tuple[bytes, str]:
    """The body and content type of a ``/segment`` upload of ``data``."""
    request = httpx.Request("POST", "http://x/segment", files=segment_files(data))
    return request.read(), request.headers["content-type"]


def status_of(response: bytes) -> int:
    """The status code of a raw HTTP response (0 if none came)."""
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


# --- memory -----------------------------------------------------------------------------------


def test_the_estimate_is_the_documented_formula() -> None:
    """docs/design.md: a 16384² 16-bit grey TIFF with a bundled U-Net (tile 256, batch 8)
    holds 512 + 256 + 256 + 96 + 32 + 32 MiB + ONNX Runtime's batch buffers at its peak."""
    session = ort.InferenceSession(str(REPO_MODELS / "nuclei" / "1" / "model.onnx"))
    meta = ModelMetadata.from_props(dict(session.get_modelmeta().custom_metadata_map))
    side = 16384
    header = ImageHeader("TIFF", side, side, 1, side * side * 2, side * side * 2)
    batch_bytes = 190 * MIB
    cost = request_memory(meta, header, 8, batch_bytes=batch_bytes)
    assert cost == (512 + 256 + 256 + 96 + 32 + 32) * MIB + batch_bytes
    # A Pillow image's decoding peak (twice the pixels) can be the larger one.
    png = ImageHeader("PNG", side, side, 1, side * side * 2, 1000)
    assert request_memory(meta, png, 8) == max(2 * side * side * 2, cost - batch_bytes)
    # A ground truth adds 3 bytes per pixel (class map, masks while scoring) to that peak.
    truth = ImageHeader("PNG", side, side, 1, side * side, 1000)
    assert request_memory(meta, header, 8, truth, batch_bytes=batch_bytes) == cost + 3 * side**2


def test_an_image_that_can_never_fit_the_memory_budget_gets_413_with_the_numbers(
    model_dir: Path, tmp_path: Path
) -> None:
    with toy_server(model_dir, tmp_path, memory_budget="400MiB") as srv:
        capacity = srv.metric("segment_memory_budget_bytes", part="requests")
        assert capacity and capacity > 64 * MIB, srv.output()
        # 16-bit: 2 bytes decoded + 2 bytes of masks per pixel, plus fixed terms: over capacity.
        side = math.ceil(math.sqrt(capacity / 3))
        hwm_before = srv.status("VmHWM")
        srv.reset_peak()
        rss_before = srv.status("VmRSS")
        t0 = time.perf_counter()
        r = httpx.post(f"{srv.url}/segment", files=segment_files(zeros_png16(side)), timeout=60)
        answered_s = time.perf_counter() - t0
        grew_mib = (srv.status("VmHWM") - rss_before) / 1024
        body = r.json()
        assert r.status_code == 413, r.text
        assert body["code"] == "too_large"
        assert f"{side}x{side}" in body["detail"]
        assert "SEG_MEMORY_BUDGET" in body["detail"] and "MiB" in body["detail"]
        # Refused from the header: nothing like the image's 2·side² bytes was ever allocated.
        assert grew_mib < 2 * side * side / MIB / 4, (grew_mib, hwm_before)
        segment_ok(srv, random_image(60, 50, seed=1))
        record(
            "memory_budget_413",
            {
                "budget_mib": 400,
                "for_requests_mib": round(capacity / MIB),
                "image": f"{side}x{side} uint16",
                "answered_s": round(answered_s, 3),
                "rss_peak_growth_mib": round(grew_mib, 1),
                "next_request": 200,
            },
        )


def test_two_requests_that_fit_one_at_a_time_get_200_and_503_then_both_succeed(
    model_dir: Path, tmp_path: Path
) -> None:
    """Two workers, memory for one of the two images at a time: the second gets 503 while the
    first runs, and 200 when retried. The estimate bounds what the first really took."""
    with toy_server(model_dir, tmp_path, memory_budget="400MiB", inference_workers="2") as srv:
        capacity = srv.metric("segment_memory_budget_bytes", part="requests")
        assert capacity
        side = math.ceil(math.sqrt(0.6 * capacity / 4.2))  # ~60 % of the budget each
        data = zeros_png16(side)
        first: dict[str, object] = {}
        srv.reset_peak()
        idle_kib = srv.status("VmRSS")

        def send_first() -> None:
            first["r"] = httpx.post(f"{srv.url}/segment", files=segment_files(data), timeout=300)

        thread = threading.Thread(target=send_first)
        thread.start()
        deadline = time.monotonic() + 60
        while not srv.metric("segment_memory_reserved_bytes"):
            assert time.monotonic() < deadline and thread.is_alive(), srv.output()
            time.sleep(0.01)
        reserved = srv.metric("segment_memory_reserved_bytes")
        assert reserved is not None
        second = httpx.post(f"{srv.url}/segment", files=segment_files(data), timeout=60)
        thread.join(timeout=300)
        peak_growth = (srv.status("VmHWM") - idle_kib) * 1024
        r1 = first["r"]
        assert isinstance(r1, httpx.Response) and r1.status_code == 200, r1
        assert second.status_code == 503, second.text
        assert second.json()["code"] == "overloaded" and "memory" in second.json()["detail"]
        assert second.headers["Retry-After"].isdigit()
        assert srv.metric("segment_requests_rejected_total") == 1
        # The estimate admitted against is an upper bound of what the request held.
        assert peak_growth <= reserved, (peak_growth / MIB, reserved / MIB)
        retried = httpx.post(f"{srv.url}/segment", files=segment_files(data), timeout=300)
        assert retried.status_code == 200, retried.text
        assert srv.metric("segment_memory_reserved_bytes") == 0
        record(
            "memory_budget_503",
            {
                "for_requests_mib": round(capacity / MIB),
                "image": f"{side}x{side} uint16 (each)",
                "estimated_mib": round(reserved / MIB),
                "measured_peak_growth_mib": round(peak_growth / MIB),
                "statuses": [r1.status_code, second.status_code, retried.status_code],
            },
        )


def test_models_over_the_memory_budget_at_start_up_get_an_error_line_not_a_kill(
    model_dir: Path, tmp_path: Path
) -> None:
    with live_server(
        model_dir,
        tmp_path,
        {"default_model": "toy", "memory_budget": "1MiB"},
        accept_degraded=True,
    ) as srv:
        ready = httpx.get(f"{srv.url}/readyz").json()
        assert ready["status"] == "degraded" and ready["models"] == []
        log = srv.output(100_000)
        for name, reason in ready["failed"].items():
            assert "memory budget" in reason, reason
            assert f"model {name} could not be loaded" in log and " ERROR " in log
        assert httpx.get(f"{srv.url}/healthz").status_code == 200
        r = httpx.post(f"{srv.url}/segment", files=segment_files(png_bytes(random_image(9, 9))))
        assert r.status_code == 404 and "failed to load" in r.json()["detail"]
        assert srv.proc.poll() is None


# --- spool ------------------------------------------------------------------------------------


def test_uploads_over_the_spool_budget_get_503_and_those_that_fit_succeed(
    model_dir: Path, tmp_path: Path
) -> None:
    """Five uploads of ~2.3 MB declared at once against 6 MiB of spool: the first two are
    admitted before their bodies are sent, the other three get 503 at once; nothing is a 400."""
    with toy_server(model_dir, tmp_path, spool_budget="6MiB") as srv:
        images = [random_image(1500, 1500, seed=s) for s in range(5)]  # noise: ~2.3 MB each
        bodies = [multipart(png_bytes(img)) for img in images]
        socks = [socket.create_connection(("127.0.0.1", srv.port)) for _ in images]
        statuses: dict[int, int] = {}
        refused: list[dict] = []
        try:
            for sock, (body, ctype) in zip(socks, bodies, strict=True):
                sock.sendall(http_head(srv.port, len(body), ctype))
                time.sleep(0.2)  # admitted in this order
            for i, (sock, (body, _)) in enumerate(zip(socks, bodies, strict=True)):
                sock.settimeout(0.5)
                try:
                    early = sock.recv(65536, socket.MSG_PEEK)
                except TimeoutError:
                    early = b""
                if not early:  # admitted: send the body and expect the exact mask
                    sock.sendall(body)
                response = read_response(sock, timeout=60)
                statuses[i] = status_of(response)
                head, _, payload = response.partition(b"\r\n\r\n")
                if statuses[i] == 200:
                    mask = np.asarray(decode_png(payload))
                    np.testing.assert_array_equal(mask, expected_toy_mask(images[i]))
                else:
                    refused.append({"head": head.decode(), "body": payload.decode()})
        finally:
            for sock in socks:
                sock.close()
        assert statuses == {0: 200, 1: 200, 2: 503, 3: 503, 4: 503}, (statuses, refused)
        for answer in refused:
            assert '"code":"spool_full"' in answer["body"]
            assert "retry-after:" in answer["head"].lower()
        log = srv.output(100_000)
        assert log.count("spool space exhausted") == 3 and " ERROR " in log
        time.sleep(0.2)
        assert not srv.temp_files_open() and not any(srv.tmpdir.glob("tmp*"))
        for img in images[2:]:  # the refused ones, sent again: they fit now
            segment_ok(srv, img)
        record(
            "spool_budget",
            {
                "spool_budget_mib": 6,
                "uploads_mib": round(len(bodies[0][0]) / MIB, 2),
                "statuses": list(statuses.values()),
                "retried": [200, 200, 200],
                "spool_files_left": 0,
            },
        )


# --- upload time ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "settings"),
    [
        ("min_rate", {"min_upload_rate": "1000", "upload_grace_s": "1"}),
        ("timeout", {"min_upload_rate": "0", "upload_timeout_s": "2"}),
    ],
)
def test_slow_drip_uploads_get_408_and_their_number_is_capped(
    model_dir: Path, tmp_path: Path, rule: str, settings: dict[str, str]
) -> None:
    """40 connections that each send a byte every 0.2 s: 32 (SEG_MAX_UPLOADS) are held until
    the rule cuts them with 408, 8 get 503 at once; afterwards the service serves as before."""
    drips, cap = 40, 32
    with toy_server(model_dir, tmp_path, max_uploads=str(cap), **settings) as srv:
        body, ctype = multipart(png_bytes(random_image(40, 40)))
        socks = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(drips)]
        answers: dict[int, tuple[int, float]] = {}
        t0 = time.monotonic()
        try:
            for sock in socks:
                sock.sendall(http_head(srv.port, len(body), ctype))
                sock.setblocking(False)
            sent = 0
            while len(answers) < drips and time.monotonic() - t0 < 30:
                for i, sock in enumerate(socks):
                    if i in answers:
                        continue
                    try:
                        data = sock.recv(65536)
                    except BlockingIOError:
                        continue
                    answers[i] = (status_of(data), time.monotonic() - t0)
                if sent < len(body) - 1:
                    for i, sock in enumerate(socks):
                        if i not in answers:
                            with contextlib.suppress(OSError):
                                sock.send(body[sent : sent + 1])
                    sent += 1
                time.sleep(0.2)
        finally:
            for sock in socks:
                sock.close()
        statuses = [status for status, _ in answers.values()]
        assert len(answers) == drips, answers
        assert statuses.count(408) == cap and statuses.count(503) == drips - cap, statuses
        cut_after = max(t for status, t in answers.values() if status == 408)
        assert cut_after < 10, cut_after
        assert srv.metric("segment_errors_total", reason="upload_timeout") == cap
        assert srv.metric("segment_requests_rejected_total") == drips - cap
        segment_ok(srv, random_image(60, 50, seed=3))
        record(
            f"slow_uploads_{rule}",
            {
                "connections": drips,
                "max_uploads": cap,
                "answered_408": cap,
                "answered_503": drips - cap,
                "all_cut_within_s": round(cut_after, 1),
                "settings": settings,
                "next_request": 200,
            },
        )


def test_labelling_objects_stays_within_its_estimate(model_dir: Path, tmp_path: Path) -> None:
    """output=labels with an instance ground truth on a 3000² image of 5,625 nuclei: the
    request's measured peak stays under the estimate it was admitted against (labels, object
    table, the truth's objects, the watershed's strips)."""
    side, cell = 3000, 40
    yy, xx = np.mgrid[:cell, :cell]
    d = np.hypot(yy - cell / 2, xx - cell / 2)
    patch = np.choose((d < 15).astype(int) + (d < 11), [20, 160, 230]).astype(np.uint8)
    image = np.tile(patch, (side // cell, side // cell))
    ids = np.arange((side // cell) ** 2, dtype=np.uint16).reshape(side // cell, side // cell) + 1
    truth = np.kron(ids, np.ones((cell, cell), np.uint16)) * np.tile(d < 15, (side // cell,) * 2)
    files = {
        "image": ("nuclei.png", png_bytes(image), "image/png"),
        "ground_truth": ("truth.tif", tiff_bytes(truth.astype(np.uint16)), "image/tiff"),
    }
    with toy_server(model_dir, tmp_path, memory_budget="1GiB") as srv:
        srv.reset_peak()
        idle_kib = srv.status("VmRSS")
        peak: dict[str, int] = {}

        def watch() -> None:
            while "done" not in peak:
                reserved = srv.metric("segment_memory_reserved_bytes") or 0
                peak["reserved"] = max(peak.get("reserved", 0), int(reserved))
                time.sleep(0.005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        r = httpx.post(
            f"{srv.url}/segment",
            files=files,
            params={"model": "toyobj", "output": "labels", "format": "json"},
            timeout=300,
        )
        peak["done"] = 1
        watcher.join()
        growth = (srv.status("VmHWM") - idle_kib) * 1024
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object_count"] == (side // cell) ** 2
    assert body["object_metrics"]["f1"] == 1.0
    assert 0 < growth <= peak["reserved"], (growth / MIB, peak["reserved"] / MIB)
    record(
        "labels_memory",
        {
            "image": f"{side}x{side} uint8, {body['object_count']} objects, instance truth",
            "estimated_mib": round(peak["reserved"] / MIB),
            "measured_peak_growth_mib": round(growth / MIB),
        },
    )
