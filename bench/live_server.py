"""The service as a real ``uvicorn`` process on loopback, and what /proc says about it.

The one place that starts the service on a free port for the tests and the benchmarks: both
need the real server (sockets, worker threads, spooled uploads, signals), not an in-process app.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
# asyncio and the service's h11 protocol (request-head timeout, JSON 400s), as segment-service
# runs (service.main.run), even where uvicorn[standard] would pick uvloop and httptools.
HTTP_PROTOCOL = "service.api.server:ServiceH11Protocol"
UVICORN = [
    sys.executable,
    "-m",
    "uvicorn",
    "service.main:create_app",
    "--factory",
    "--loop",
    "asyncio",
    "--http",
    HTTP_PROTOCOL,
]
READY_TIMEOUT_S = 120.0


@dataclass
class LiveServer:
    """A running service process, its address, its log and its temporary directory."""

    proc: subprocess.Popen[bytes]
    url: str
    port: int
    log: Path
    tmpdir: Path

    def output(self, tail: int = 4000) -> str:
        """The end of the process's stdout and stderr."""
        return self.log.read_text(errors="replace")[-tail:]

    def status(self, field: str) -> int:
        """A number from ``/proc/<pid>/status`` (``VmRSS``/``VmHWM`` in KiB, ``Threads``)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise KeyError(field)

    def reset_peak(self) -> None:
        """Start a new ``VmHWM`` (peak resident memory) measurement of the process."""
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def rss_mib(self) -> float:
        """Resident memory in MiB."""
        return self.status("VmRSS") / 1024

    def threads(self) -> int:
        """Threads of the process."""
        return self.status("Threads")

    def open_files(self) -> list[str]:
        """What each open file descriptor points at."""
        fd_dir = Path(f"/proc/{self.proc.pid}/fd")
        targets = []
        for fd in fd_dir.iterdir():
            try:
                targets.append(os.readlink(fd))
            except FileNotFoundError:  # closed while listing
                continue
        return targets

    def temp_files_open(self) -> list[str]:
        """Open descriptors on files in the process's temporary directory (spooled uploads)."""
        return [t for t in self.open_files() if t.startswith(str(self.tmpdir))]

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample of ``/metrics``."""
        return metric_sample(httpx.get(f"{self.url}/metrics", timeout=10).text, name, **labels)

    def wait_for_metric(self, name: str, value: float, timeout: float = 60.0) -> None:
        """Poll ``/metrics`` until ``name`` equals ``value`` (bounded)."""
        deadline = time.monotonic() + timeout
        while self.metric(name) != value:
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, f"{name} never reached {value}"
            time.sleep(0.02)


def metric_sample(text: str, name: str, **labels: str) -> float | None:
    """The value of sample ``name`` with ``labels`` in a Prometheus text exposition, or None."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes], graceful: bool) -> None:
    """Kill the process, or with ``graceful`` SIGTERM it and wait for uvicorn's own shutdown."""
    if proc.poll() is None:
        if graceful:
            proc.terminate()
            try:
                proc.wait(timeout=30)
                return
            except subprocess.TimeoutExpired:
                pass
        proc.kill()
    proc.wait(timeout=10)


@contextmanager
def live_server(
    model_dir: Path,
    workdir: Path,
    settings: Mapping[str, str] | None = None,
    *,
    graceful_stop: bool = False,
    ready_timeout: float = READY_TIMEOUT_S,
    uvicorn_args: Sequence[str] = (),
    accept_degraded: bool = False,
) -> Iterator[LiveServer]:
    """``uvicorn service.main:create_app --factory`` on a free loopback port.

    Serves ``model_dir`` on the CPU, with ``SEG_<KEY>`` = value for each of ``settings``, the
    log in ``workdir/server.log`` and ``TMPDIR`` in ``workdir/tmp`` (so spooled uploads can be
    watched); ``uvicorn_args`` are added to uvicorn's command line. Yields once ``/readyz``
    says 200 (with ``accept_degraded``: once loading is over, even if models failed);
    afterwards always stops the process: killed, or with ``graceful_stop`` sent SIGTERM first.
    """
    port = free_port()
    tmpdir = workdir / "tmp"
    tmpdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEG_")}
    env.update(
        TMPDIR=str(tmpdir),
        SEG_MODEL_DIR=str(model_dir),
        SEG_PROVIDERS='["CPUExecutionProvider"]',
    )
    env.update({f"SEG_{k.upper()}": v for k, v in (settings or {}).items()})
    log = workdir / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*UVICORN, "--host", "127.0.0.1", "--port", str(port), *uvicorn_args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    srv = LiveServer(proc, f"http://127.0.0.1:{port}", port, log, tmpdir)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}:\n{srv.output()}")
            try:
                ready = httpx.get(f"{srv.url}/readyz", timeout=2)
                if ready.status_code == 200 or (
                    accept_degraded and ready.json().get("status") == "degraded"
                ):
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server not ready after {ready_timeout} s:\n{srv.output()}")
            time.sleep(0.05)
        yield srv
    finally:
        _stop(proc, graceful_stop)
