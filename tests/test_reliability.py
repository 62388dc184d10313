"""Load and faults against a real uvicorn process on loopback: a soak, overload, uploads over
the limit refused while streaming, and clients that vanish mid-upload or mid-inference.

Every loop is bounded, every server is killed in ``finally``, and the figures go to
``tests/figures.py`` (``SEG_FIGURES=path.json``) for ``docs/reliability.md``.
"""

from __future__ import annotations

import asyncio
import select
import socket
import statistics
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.live_server import LiveServer
from service.core.gate import InferenceGate, OverloadedError
from tests.conftest import (
    decode_png,
    expected_toy_mask,
    http_head,
    png_bytes,
    random_image,
    read_response,
    segment_files,
    segment_ok,
    toy_server,
)
from tests.figures import record

pytestmark = pytest.mark.slow

SOAK_REQUESTS = 3000
SOAK_WARMUP = 300
CONCURRENCY = 16
UPLOAD_LIMIT = 8 * 1024 * 1024
SETTLE_S = 30.0


def big_image(side: int = 3000) -> np.ndarray:
    """Seconds of work for one CPU thread, yet a small PNG (ramps with a little noise)."""
    ramp = np.add.outer(np.arange(side), np.arange(side)) % 256
    noise = np.random.default_rng(side).integers(0, 4, (side, side))
    return ((ramp + noise) % 256).astype(np.uint8)


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One worker and room for 16 more: the soak's 16 concurrent requests all fit."""
    with toy_server(
        model_dir,
        tmp_path_factory.mktemp("server"),
        inference_workers="1",
        max_queue=str(CONCURRENCY),
        max_upload_bytes=str(UPLOAD_LIMIT),
    ) as srv:
        yield srv


def abort(sock: socket.socket) -> None:
    """Make the coming close a reset (RST), as when a client process dies."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def temp_dir(srv: LiveServer) -> set[str]:
    """Files in the server's TMPDIR (ONNX Runtime leaves a small ``.ses`` file there at start)."""
    return {p.name for p in srv.tmpdir.iterdir()}


def assert_clean_log(srv: LiveServer) -> None:
    log = srv.output(200_000)
    assert "Traceback" not in log and " ERROR " not in log, log[-4000:]


def settle(srv: LiveServer, threads: int, fds: int | None = None) -> None:
    """Wait (bounded) until nothing is in flight, no spooled upload is open, and threads (and
    open descriptors) are back to ``threads`` (``fds``) or fewer; assert that it got there."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        open_fds, temp_open, now = len(srv.open_files()), srv.temp_files_open(), srv.threads()
        in_flight = srv.metric("segment_requests_in_flight")
        if in_flight == 0 and not temp_open and now <= threads and (fds is None or open_fds <= fds):
            return
        state = {"in_flight": in_flight, "temp": temp_open, "threads": now, "fds": open_fds}
        assert time.monotonic() < deadline, f"left behind: {state}; before: {threads}, {fds}"
        time.sleep(0.1)


# --- soak -----------------------------------------------------------------------------------


async def _soak(url: str, total: int, images: list[tuple[bytes, np.ndarray]]) -> dict:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    wrong = 0
    counter = iter(range(total))
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            nonlocal wrong
            for i in counter:
                data, expected = images[i % len(images)]
                t0 = time.perf_counter()
                r = await client.post("/segment", files=segment_files(data))
                latencies.append(time.perf_counter() - t0)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200 and not np.array_equal(
                    np.asarray(decode_png(r.content)), expected
                ):
                    wrong += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        wall = time.perf_counter() - t0
    latencies.sort()
    return {
        "requests": total,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "wrong_masks": wrong,
        "wall_s": round(wall, 2),
        "requests_per_s": round(total / wall, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p95_ms": round(1000 * latencies[int(0.95 * (len(latencies) - 1))], 1),
        "max_ms": round(1000 * latencies[-1], 1),
    }


def test_soak_thousands_of_requests_at_concurrency_16(server: LiveServer) -> None:
    images = []
    for seed, (h, w) in enumerate([(48, 64), (64, 64), (100, 37), (130, 90)]):
        img = random_image(h, w, seed=100 + seed)
        images.append((png_bytes(img), expected_toy_mask(img)))
    warm = asyncio.run(_soak(server.url, SOAK_WARMUP, images))
    assert warm["statuses"] == {"200": SOAK_WARMUP}, warm
    threads = server.threads()
    rss_before = server.rss_mib()

    result = asyncio.run(_soak(server.url, SOAK_REQUESTS, images))
    rss_after = server.rss_mib()
    growth = (rss_after - rss_before) / rss_before
    result |= {
        "concurrency": CONCURRENCY,
        "warmup_requests": SOAK_WARMUP,
        "rss_before_mib": round(rss_before, 1),
        "rss_after_mib": round(rss_after, 1),
        "rss_growth_pct": round(100 * growth, 2),
        "threads_before": threads,
        "threads_after": server.threads(),
    }
    record("soak", result)
    assert result["statuses"] == {"200": SOAK_REQUESTS}, result  # no error, nothing refused
    assert result["wrong_masks"] == 0, result
    assert growth < 0.10, result
    settle(server, threads)
    assert server.metric("segment_inference_seconds_count", model="toy") == (
        SOAK_WARMUP + SOAK_REQUESTS
    )
    assert_clean_log(server)


# --- uploads over the limit: refused while they stream ----------------------------------------


def test_a_chunked_upload_over_the_limit_is_refused_while_it_streams(server: LiveServer) -> None:
    """No Content-Length: the client streams up to 256 MiB; the 413 must come after about the
    8 MiB limit has arrived, long before the rest is sent, and the service keeps serving."""
    threads = server.threads()
    offered = 256 * 1024 * 1024
    boundary = "stream"
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.tif"\r\n'
        "Content-Type: image/tiff\r\n\r\n"
    ).encode()
    block = part + bytes(65536 - len(part))
    chunk = f"{len(block):x}\r\n".encode() + block + b"\r\n"
    sent = 0
    rss_before = server.rss_mib()
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(http_head(server.port, None, f"multipart/form-data; boundary={boundary}"))
        sock.setblocking(False)
        view = memoryview(chunk)
        pos = 0
        while sent < offered:
            readable, writable, _ = select.select([sock], [sock], [], 10)
            if readable:
                break  # the server answered while the body was still coming
            assert writable, "neither answer nor progress for 10 s"
            try:
                n = sock.send(view[pos:])
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += n
            pos = (pos + n) % len(chunk)
            if pos == 0:
                chunk = f"{len(block):x}\r\n".encode() + bytes(len(block)) + b"\r\n"
                view = memoryview(chunk)
        sock.setblocking(True)
        answer = read_response(sock)
    elapsed = time.perf_counter() - t0
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413"), answer[:500]
    assert b'"code":"too_large"' in rest and b"SEG_MAX_UPLOAD_BYTES" in rest
    assert sent < offered / 4, sent  # refused long before the end of the body
    record(
        "upload_limit_streaming",
        {
            "limit_bytes": UPLOAD_LIMIT,
            "offered_bytes": offered,
            "sent_before_413_bytes": sent,
            "status": 413,
            "seconds": round(elapsed, 3),
            "rss_growth_mib": round(server.rss_mib() - rss_before, 1),
        },
    )
    settle(server, threads)
    segment_ok(server, random_image(50, 60, seed=7))
    assert_clean_log(server)


# --- clients that vanish --------------------------------------------------------------------


def test_a_client_that_disconnects_mid_upload_leaves_nothing_behind(server: LiveServer) -> None:
    """The upload is spooled to a temporary file (over 1 MiB) when the client goes away."""
    threads, fds, files_before = server.threads(), len(server.open_files()), temp_dir(server)
    data = png_bytes(random_image(1500, 1500, seed=8))  # noise: ~2.2 MB
    files = {"image": ("cells.png", data, "image/png")}
    request = httpx.Request("POST", server.url, files=files)
    body, ctype = request.read(), request.headers["content-type"]
    spooled = False
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(http_head(server.port, len(body), ctype))
        half = len(body) * 3 // 4
        for i in range(0, half, 65536):
            sock.sendall(body[i : min(i + 65536, half)])
        deadline = time.monotonic() + 10
        while not spooled and time.monotonic() < deadline:  # the server has it on disk
            spooled = bool(server.temp_files_open())
            time.sleep(0.02)
        abort(sock)
    assert spooled, "the partial upload was never spooled to the temporary directory"
    settle(server, threads, fds)
    assert temp_dir(server) == files_before
    segment_ok(server, random_image(50, 60, seed=9))
    record(
        "disconnect_mid_upload",
        {
            "upload_bytes": len(body),
            "sent_before_disconnect": half,
            "spooled_to_disk": spooled,
            "temp_files_left": 0,
            "in_flight_after": 0,
            "threads_before": threads,
            "threads_after": server.threads(),
            "next_request": 200,
        },
    )
    assert_clean_log(server)


def test_a_client_that_disconnects_mid_inference_leaves_nothing_behind(
    server: LiveServer,
) -> None:
    img = big_image()
    segment_ok(server, img)  # the same work once to the end: what "back to normal" means
    threads, fds, rss_warm = server.threads(), len(server.open_files()), server.rss_mib()
    files_before = temp_dir(server)
    files = {"image": ("cells.png", png_bytes(img), "image/png")}
    request = httpx.Request("POST", server.url, files=files)
    body = request.read()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(http_head(server.port, len(body), request.headers["content-type"]) + body)
        server.wait_for_metric("segment_requests_in_flight", 1)  # inference has started
        abort(sock)
    t_gone = time.perf_counter()
    settle(server, threads, fds)
    settled_s = time.perf_counter() - t_gone
    rss_after = server.rss_mib()
    assert temp_dir(server) == files_before
    assert rss_after < rss_warm * 1.10, (rss_warm, rss_after)
    segment_ok(server, random_image(50, 60, seed=10))
    record(
        "disconnect_mid_inference",
        {
            "image": f"{img.shape[1]}x{img.shape[0]}",
            "settled_s": round(settled_s, 2),
            "rss_after_same_request_mib": round(rss_warm, 1),
            "rss_after_disconnect_mib": round(rss_after, 1),
            "threads_before": threads,
            "threads_after": server.threads(),
            "temp_files_left": 0,
            "in_flight_after": 0,
            "next_request": 200,
        },
    )
    assert_clean_log(server)


# --- overload -------------------------------------------------------------------------------


def test_overload_gets_quick_503s_and_every_accepted_request_finishes(
    model_dir: Path, tmp_path: Path
) -> None:
    """One worker and one place in the queue; 10 requests at once."""
    img = big_image()
    data, expected = png_bytes(img), expected_toy_mask(img)
    n = 10
    with toy_server(model_dir, tmp_path, inference_workers="1", max_queue="1") as srv:
        start = threading.Barrier(n)
        results: list[tuple[float, httpx.Response | BaseException]] = []
        t0 = 0.0

        def fire() -> None:
            nonlocal t0
            with httpx.Client(base_url=srv.url, timeout=120) as client:
                if start.wait() == 0:
                    t0 = time.perf_counter()
                try:
                    r: httpx.Response | BaseException = client.post(
                        "/segment", files=segment_files(data)
                    )
                except BaseException as exc:  # reported below, never swallowed
                    r = exc
                results.append((time.perf_counter(), r))

        workers = [threading.Thread(target=fire) for _ in range(n)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=180)
        assert not any(w.is_alive() for w in workers)
        assert len(results) == n
        errors = [r for _, r in results if not isinstance(r, httpx.Response)]
        assert not errors, errors
        done = [(t - t0, r) for t, r in results if isinstance(r, httpx.Response)]
        ok = [(t, r) for t, r in done if r.status_code == 200]
        busy = [(t, r) for t, r in done if r.status_code == 503]
        assert len(ok) + len(busy) == n, [r.status_code for _, r in done]
        assert ok and busy
        for _, r in ok:
            np.testing.assert_array_equal(np.asarray(decode_png(r.content)), expected)
        for _, r in busy:
            assert r.headers["retry-after"] == "2"
            body = r.json()
            assert body["code"] == "overloaded" and body["request_id"] in srv.output(200_000)
        first_done = min(t for t, _ in ok)
        slowest_503 = max(t for t, _ in busy)
        assert slowest_503 < first_done, "a 503 came only after accepted work had finished"
        assert srv.metric("segment_requests_rejected_total") == len(busy)
        srv.wait_for_metric("segment_requests_in_flight", 0)
        segment_ok(srv, random_image(50, 60, seed=11))
        record(
            "overload",
            {
                "concurrent_requests": n,
                "limit": "1 worker + 1 queued",
                "accepted": len(ok),
                "refused_503": len(busy),
                "lost": 0,
                "slowest_503_s": round(slowest_503, 3),
                "first_accepted_done_s": round(first_done, 3),
                "last_accepted_done_s": round(max(t for t, _ in ok), 3),
            },
        )
        log = srv.output(200_000)
        assert "Traceback" not in log


def test_the_gate_gives_its_place_back_when_the_pool_is_shut_down() -> None:
    """After shutdown (the service is stopping) a request is refused, and no place leaks."""
    gate = InferenceGate(workers=1, max_queue=0)
    assert asyncio.run(gate.run(lambda: 41 + 1)) == 42
    gate.shutdown()
    for _ in range(3):
        with pytest.raises(OverloadedError):
            asyncio.run(gate.run(lambda: 0))
    assert gate.admitted == 0 and not gate.saturated
