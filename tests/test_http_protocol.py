"""Slow and malformed HTTP against a real uvicorn running the service's protocol
(:mod:`service.api.server`): request heads that never complete are cut after
``SEG_HEADER_TIMEOUT_S``, and requests h11 cannot parse get the service's JSON 400.

Raw sockets on 127.0.0.1 only; every loop is bounded in count and in time.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.live_server import LiveServer, live_server
from tests.conftest import READY_TIMEOUT_S
from tests.figures import record

pytestmark = pytest.mark.slow

HEADER_TIMEOUT_S = 1.0
MARGIN_S = 2.0  # timer resolution of a 2-core box under load, and this test's polling
SLOW_CLIENTS = 50
DRIP_EVERY_S = 0.25
HEALTHZ_LIMIT_S = 1.0


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The toy models with a 1 s head timeout and an API key (the slow clients send none)."""
    settings = {
        "default_model": "toy",
        "intra_op_threads": "1",
        "api_key": "a-key",
        "header_timeout_s": str(HEADER_TIMEOUT_S),
    }
    work = tmp_path_factory.mktemp("http-protocol")
    with live_server(model_dir, work, settings, ready_timeout=READY_TIMEOUT_S) as srv:
        yield srv


def connect(srv: LiveServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=5)


def partial_head(srv: LiveServer) -> bytes:
    """A request line and a header, then the start of a header that never ends."""
    return f"GET /models HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\nX-Slow: ".encode()


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one raw response."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, raw
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return int(status_line.split()[1]), headers, body


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and when it closed (bounded by ``timeout``)."""
    deadline = time.monotonic() + timeout
    data = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return data, time.monotonic()
        data += chunk
    raise AssertionError(f"the server did not close the connection within {timeout} s: {data!r}")


def assert_json_error(raw: bytes, status: int, code: str) -> str:
    """The response is ``status`` with the service's JSON error body; its request ID."""
    got, headers, body = parse(raw)
    assert got == status, raw
    assert headers["content-type"] == "application/json", headers
    assert headers["connection"] == "close", headers
    assert int(headers["content-length"]) == len(body), headers
    doc = json.loads(body)
    assert set(doc) == {"detail", "code", "request_id"}, doc
    assert doc["code"] == code and doc["detail"], doc
    assert doc["request_id"] == headers["x-request-id"], (doc, headers)
    assert len(doc["request_id"]) == 32 and int(doc["request_id"], 16) >= 0, doc
    return str(doc["request_id"])


def test_dripped_heads_are_cut_while_healthz_answers(server: LiveServer) -> None:
    """50 clients drip a head a byte at a time: each is answered 408 and closed about
    ``SEG_HEADER_TIMEOUT_S`` after it connected; ``/healthz`` stays fast meanwhile."""
    opened: dict[socket.socket, float] = {}
    for _ in range(SLOW_CLIENTS):
        sock = connect(server)
        sock.sendall(partial_head(server))
        sock.setblocking(False)
        opened[sock] = time.monotonic()
    received = {sock: b"" for sock in opened}
    lifetimes: dict[socket.socket, float] = {}
    healthz: list[float] = []
    deadline = time.monotonic() + HEADER_TIMEOUT_S + MARGIN_S + 3.0
    try:
        for _ in range(200):  # about 3.25 s / DRIP_EVERY_S rounds; bounded anyway
            if len(lifetimes) == len(opened) or time.monotonic() > deadline:
                break
            open_socks = [s for s in opened if s not in lifetimes]
            readable, _, _ = select.select(open_socks, [], [], DRIP_EVERY_S)
            for sock in readable:
                try:
                    chunk = sock.recv(65536)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    chunk = b""
                received[sock] += chunk
                if not chunk:
                    lifetimes[sock] = time.monotonic() - opened[sock]
            for sock in open_socks:
                if sock in readable or received[sock]:
                    continue  # the server answered: stop sending, read the rest
                with contextlib.suppress(BlockingIOError, BrokenPipeError, ConnectionResetError):
                    sock.send(b"a")  # one more byte of a header value, never its CRLF
            start = time.monotonic()
            r = httpx.get(f"{server.url}/healthz", timeout=5)
            healthz.append(time.monotonic() - start)
            assert r.status_code == 200, r.text
    finally:
        for sock in opened:
            sock.close()

    still_open = len(opened) - len(lifetimes)
    lived = sorted(lifetimes.values())
    record(
        "slow_headers",
        {
            "clients": SLOW_CLIENTS,
            "header_timeout_s": HEADER_TIMEOUT_S,
            "still_open_at_end": still_open,
            "watched_s": round(time.monotonic() - min(opened.values()), 2),
            "lifetime_min_s": round(lived[0], 2) if lived else None,
            "lifetime_max_s": round(lived[-1], 2) if lived else None,
            "healthz_probes": len(healthz),
            "healthz_max_s": round(max(healthz), 3) if healthz else None,
        },
    )
    assert still_open == 0, f"{still_open} of {SLOW_CLIENTS} slow heads still open"
    # Cut for being slow, not at once: the timer runs from the connection opening.
    assert lived[0] >= 0.8 * HEADER_TIMEOUT_S and lived[-1] <= HEADER_TIMEOUT_S + MARGIN_S, lived
    for raw in received.values():
        assert_json_error(raw, 408, "upload_timeout")
    assert len(healthz) >= 3 and max(healthz) < HEALTHZ_LIMIT_S, healthz
    assert "Traceback" not in server.output(200_000)


def test_a_silent_connection_is_closed(server: LiveServer) -> None:
    with connect(server) as sock:
        start = time.monotonic()
        data, closed = read_until_closed(sock, HEADER_TIMEOUT_S + MARGIN_S)
    assert data == b""  # nothing was asked: nothing to answer
    assert 0.8 * HEADER_TIMEOUT_S <= closed - start <= HEADER_TIMEOUT_S + MARGIN_S


def test_the_next_head_on_a_kept_alive_connection_is_timed_too(server: LiveServer) -> None:
    """The timer restarts when a response finishes; dripping the next head does not hold the
    connection any longer than the first."""
    with connect(server) as sock:
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode())
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 "), first
        answered = time.monotonic()
        sock.sendall(partial_head(server))
        for _ in range(4):  # about HEADER_TIMEOUT_S of dripping, then wait for the answer
            time.sleep(DRIP_EVERY_S)
            try:
                sock.sendall(b"a")
            except (BrokenPipeError, ConnectionResetError):
                break
        data, closed = read_until_closed(sock, HEADER_TIMEOUT_S + MARGIN_S)
    assert closed - answered <= HEADER_TIMEOUT_S + MARGIN_S
    assert_json_error(data, 408, "upload_timeout")


def test_a_body_dripped_after_an_early_answer_is_cut_too(server: LiveServer) -> None:
    """``POST /segment`` without the key is answered 401 before its body is read; a client that
    keeps dripping that body after the answer does not hold the connection either."""
    head = (
        f"POST /segment HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        "Content-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n"
    )
    with connect(server) as sock:
        sock.sendall(head.encode())
        sock.settimeout(5)
        answer = sock.recv(65536)
        answered = time.monotonic()
        assert answer.startswith(b"HTTP/1.1 401 "), answer
        sock.settimeout(DRIP_EVERY_S)
        closed = None
        for _ in range(round((HEADER_TIMEOUT_S + MARGIN_S) / DRIP_EVERY_S)):
            try:
                sock.sendall(b"x")  # one more byte of a body nobody reads
                if sock.recv(65536) == b"":
                    closed = time.monotonic()
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = time.monotonic()
                break
    assert closed is not None, "the connection was still open"
    assert closed - answered <= HEADER_TIMEOUT_S + MARGIN_S


MALFORMED = {
    "request_line": b"THIS IS NOT HTTP\r\n\r\n",
    "header_without_colon": b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nNo colon here\r\n\r\n",
    "space_in_header_name": b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX Bad: 1\r\n\r\n",
    # h11 refuses a head once 16 KiB of it are buffered incomplete (uvicorn's default limit).
    "head_over_the_size_limit": b"GET /healthz HTTP/1.1\r\nX-Big: " + b"b" * 20000,
}


@pytest.mark.parametrize("request_bytes", MALFORMED.values(), ids=list(MALFORMED))
def test_malformed_requests_get_the_json_error_body(
    server: LiveServer, request_bytes: bytes
) -> None:
    with connect(server) as sock:
        sock.sendall(request_bytes)
        data, _ = read_until_closed(sock, 10)
    rid = assert_json_error(data, 400, "bad_request")
    deadline = time.monotonic() + 10
    while rid not in server.output(200_000):  # the ID a user quotes is in the service log
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.05)
    assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200


def test_a_kept_alive_client_still_works(server: LiveServer) -> None:
    """Several requests on one connection, with pauses shorter than the head timeout and a
    head sent in two parts, all answered on that same connection."""
    with connect(server) as sock:
        for i in range(5):
            head = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode()
            if i == 2:  # split head, within the timeout
                sock.sendall(head[:10])
                time.sleep(HEADER_TIMEOUT_S / 3)
                sock.sendall(head[10:])
            else:
                sock.sendall(head)
            sock.settimeout(5)
            raw = b""
            for _ in range(100):
                raw += sock.recv(65536)
                if raw.endswith(b"}"):
                    break
            status, headers, body = parse(raw)
            assert status == 200 and json.loads(body) == {"status": "ok"}, raw
            assert headers.get("connection") != "close", headers
            time.sleep(HEADER_TIMEOUT_S / 2)
    with httpx.Client(base_url=server.url, timeout=5) as client:
        for _ in range(5):
            r = client.get("/models", headers={"X-API-Key": "a-key"})
            assert r.status_code == 200, r.text
