"""The Dockerfile's images and the compose stack, built and run with podman (no Docker engine).

tests/test_deploy.py lints the Dockerfile and validates docker-compose.yml; this module builds the
images and runs them, because a file that lints can still build an image that does not start, or
start one that writes to its read-only root:

1. the `cpu` target is built, once per session, from the Dockerfile as it is, on a local Debian
   bookworm image (Docker Hub is not needed: the base is made with debootstrap and kept in
   podman's store as the cache for later runs);
2. it runs with docker-compose.yml's own hardening (read-only root, tmpfs /tmp, no capabilities,
   no-new-privileges, init, UID 10001) and answers /readyz, /segment (the same mask, pixel for
   pixel, as the service outside the container), its HEALTHCHECK, /metrics, and logs request IDs;
   nothing is written outside /tmp;
3. `podman stop` with the compose file's stop_grace_period lets a large request in flight finish;
4. the compose file itself comes up with podman-compose (segment-cpu and a Prometheus built from
   Debian's package, swapped in by docker-compose.podman.yml), Prometheus scrapes the service by
   its compose name, and `down` leaves nothing behind;
5. memory and spool space under real kernel limits: with `--memory`, the service reads its
   budget from the cgroup and answers an image that cannot fit with 413 and stays up, where
   the same image without admission gets the container OOM-killed; with a small tmpfs /tmp,
   concurrent uploads that do not fit get 503 (never 400) and those that fit succeed, also
   when SEG_SPOOL_BUDGET promises more space than the disk has;
6. the `gpu` target builds (its ldd check proves the CUDA provider's libraries resolve) and, with
   no GPU, serves on the CPU and says so. Its build (~70 s alone) runs last; it needs ~11 GB of
   free disk while it builds (a 3.0 GB image, removed afterwards), which CI affords;
   SEG_TEST_GPU_IMAGE=0 leaves it out of a local run (never under CI=true).

Machine specifics stay out of the Dockerfile: the machine's pip configuration (indexes, wheel
folders, certificate bundle) is mounted into the build's RUN steps with `podman build -v`, and
podman's own settings come from deploy/podman/containers.conf through CONTAINERS_CONF.

The tools come from `make container-tools` (Debian's podman, runc, catatonit, debootstrap,
netavark, aardvark-dns, iptables) and the dev extra (podman-compose). Without them, or without
root, the tests skip and say why, except under CI=true, where they fail instead.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image

from bench.live_server import free_port, metric_sample
from service.core.config import REPO_MODELS
from tests.conftest import (
    READY_TIMEOUT_S,
    http_head,
    png_bytes,
    read_response,
    running_app,
    segment_files,
)
from tests.figures import record
from tests.test_bundled_quality import ROOT
from tests.test_deploy import JOB, PromAPI, _wait_for

REPO = Path(__file__).resolve().parents[1]
HELA = ROOT / "data" / "hela"  # frames fetched by segtrain fetch-data
CONTAINERS_CONF = REPO / "deploy" / "podman" / "containers.conf"
COMPOSE_FILE = REPO / "docker-compose.yml"
PODMAN_OVERRIDE = REPO / "docker-compose.podman.yml"
PROMETHEUS_CONTEXT = REPO / "deploy" / "prometheus"
# The cache between runs: a Debian bookworm root file system with Python 3.11, made once with
# debootstrap. Kept in podman's store on purpose (delete it to make a fresh one).
BASE_IMAGE = "localhost/unet-segmentation-base:bookworm"
SUFFIX = uuid.uuid4().hex[:10]
BUILD_TIMEOUT_S = 900
PODMAN_TIMEOUT_S = 120
SCRAPE_TIMEOUT_S = 120.0  # the project's scrape and DNS refresh intervals are 15 s each
GPU_FLAG = "SEG_TEST_GPU_IMAGE"
CI = os.environ.get("CI") == "true"
PODMAN_CWD = Path(tempfile.gettempdir()) / "seg-test-podman"
# For the containers whose test is about something else than the models (a stop, the spool, the
# providers): the newest version of each model loads, not all, which is start-up work saved.
NEWEST = ("--env=SEG_MODEL_VERSIONS=newest",)

# `make check` leaves these out; `make test` runs them in their own pytest after the others.
pytestmark = [pytest.mark.slow, pytest.mark.containers]


def _unavailable(reason: str) -> None:
    """Skip, saying why; under CI=true fail instead (CI must run these tests)."""
    if CI:
        pytest.fail(f"{reason} (CI=true: the container tests must run, not skip)")
    pytest.skip(reason)


def _podman_env(**extra: str) -> dict[str, str]:
    """The environment for podman and podman-compose: the project's containers.conf, and none of
    the caller's SEG_* or COMPOSE_* settings (compose interpolates them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEG_", "COMPOSE_"))}
    env["CONTAINERS_CONF"] = str(CONTAINERS_CONF)
    env.update(extra)
    return env


def podman(
    *args: str, timeout: float = PODMAN_TIMEOUT_S, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``podman ARGS``; with ``check``, fail the test showing its output if it fails.

    From a scratch folder: conmon writes a file ``oom`` into its working directory when a
    container is OOM-killed (the memory test does that on purpose), which must not land in the
    repository."""
    PODMAN_CWD.mkdir(exist_ok=True)
    proc = subprocess.run(
        ["podman", *args],
        cwd=PODMAN_CWD,
        env=_podman_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        pytest.fail(f"podman {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def _gone(kind: str, name: str) -> None:
    """Remove a container, pod, network, volume or image if it exists (clean-up never fails)."""
    cmd = {
        "container": ["rm", "-f", "-t", "0"],
        "pod": ["pod", "rm", "-f"],
        "network": ["network", "rm", "-f"],
        "volume": ["volume", "rm", "-f"],
        "image": ["rmi", "-f"],
    }[kind]
    subprocess.run(
        ["podman", *cmd, name], env=_podman_env(), capture_output=True, timeout=PODMAN_TIMEOUT_S
    )


# --- the tools, the base image and the build ---------------------------------------------------


@pytest.fixture(scope="session")
def podman_ready() -> None:
    """podman and its helpers are installed and usable (root, as in CI); otherwise skip/fail."""
    missing = [t for t in ("podman", "runc", "catatonit", "debootstrap") if not shutil.which(t)]
    if missing:
        _unavailable(f"{', '.join(missing)} not installed; `make container-tools` installs them")
    if os.geteuid() != 0:
        _unavailable("the container tests need root (debootstrap, podman's networks)")
    info = subprocess.run(
        ["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"],
        env=_podman_env(),
        capture_output=True,
        text=True,
        timeout=PODMAN_TIMEOUT_S,
    )
    if info.returncode != 0:
        _unavailable(f"podman does not work here: {info.stderr.strip()[-500:]}")
    assert info.stdout.strip() == "runc", "deploy/podman/containers.conf was not applied"


def _debian_mirror() -> str:
    """The Debian archive this machine's apt already uses (deb.debian.org if none is found)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for src in sources:
        text = src.read_text(errors="replace") if src.is_file() else ""
        # one-line format: "deb http://... bookworm main"; deb822: "URIs: http://..."
        for m in re.finditer(r"^(?:deb\s+(?:\[[^]]*\]\s+)?|URIs:\s*)(\S+)", text, re.MULTILINE):
            uri = m.group(1)
            if uri.startswith("http") and "security" not in uri:
                return uri
    return "http://deb.debian.org/debian"


@pytest.fixture(scope="session")
def base_image(podman_ready: None) -> str:
    """A Debian bookworm image with Python 3.11, like python:3.11-slim-bookworm: reused from
    podman's store when a previous run made it, else made with debootstrap (~1 min) by one
    xdist worker while the others wait for it."""
    import fcntl

    PODMAN_CWD.mkdir(exist_ok=True)
    with (PODMAN_CWD / "base-image.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if podman("image", "exists", BASE_IMAGE, check=False).returncode != 0:
            _make_base_image()
    return BASE_IMAGE


def _make_base_image() -> None:
    """Debootstrap bookworm (python3, venv, certificates) and import it as BASE_IMAGE."""
    rootfs = Path(tempfile.mkdtemp(prefix="seg-bookworm-"))
    try:
        debootstrap = subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates",
                "bookworm",
                str(rootfs),
                _debian_mirror(),
            ],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
        assert debootstrap.returncode == 0, f"debootstrap failed:\n{debootstrap.stdout[-3000:]}"
        # The image's python is `python` (python:3.11-slim has it), and no package cache.
        (rootfs / "usr" / "bin" / "python").symlink_to("python3")
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for f in (rootfs / cache).glob("*"):
                if f.is_file():
                    f.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            ["podman", "import", "--change", 'CMD ["/bin/bash"]', "-", BASE_IMAGE],
            stdin=tar.stdout,
            env=_podman_env(),
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
        assert tar.wait(timeout=60) == 0 and imported.returncode == 0, imported.stderr
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


@pytest.fixture(scope="session")
def build_mounts(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """``podman build -v`` options that give the build's RUN steps this machine's pip
    configuration (as /etc/pip.conf) and the local folders and certificate bundle it names.
    The Dockerfile itself knows nothing about them."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    sections: dict[str, dict[str, str]] = {}
    for line in listed.splitlines():
        m = re.match(r"^([^.]*)\.([^=]+)='(.*)'$", line.strip())
        if not m:
            continue
        section = m.group(1) if m.group(1) not in ("", ":env:") else "global"
        sections.setdefault(section, {})[m.group(2)] = m.group(3)
    conf = tmp_path_factory.mktemp("pip") / "pip.conf"
    conf.write_text(
        "".join(
            f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in opts.items()) + "\n"
            for s, opts in sections.items()
        )
    )
    mounts = ["-v", f"{conf}:/etc/pip.conf:ro"]
    paths = set()
    for opts in sections.values():
        for token in " ".join(opts.values()).split():
            path = token.removeprefix("file://").rstrip("/")
            # A local PEP 503 index links to its files beside it (../../files/...): mount the
            # folder that holds the `simple` tree.
            if token.startswith("file://") and Path(path).name == "simple":
                path = str(Path(path).parent)
            if path.startswith("/") and Path(path).exists():
                paths.add(path)
    for path in sorted(paths):
        mounts += ["-v", f"{path}:{path}:ro"]
    return mounts


@dataclass
class Build:
    """A `podman build` of a Dockerfile target, running in the background."""

    tag: str
    proc: subprocess.Popen[bytes]
    log: Path
    started: float

    def wait(self) -> float:
        """Wait for the build; fail the test with its output if it failed. Returns its
        seconds."""
        try:
            code = self.proc.wait(
                timeout=max(1.0, self.started + BUILD_TIMEOUT_S - time.monotonic())
            )
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"podman build of {self.tag} took over {BUILD_TIMEOUT_S} s")
        if code != 0:
            tail = self.log.read_text(errors="replace")[-4000:]
            pytest.fail(f"podman build of {self.tag} failed ({code}):\n{tail}")
        return time.monotonic() - self.started

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=60)


def start_build(target: str, tag: str, base: str, mounts: list[str], log: Path) -> Build:
    """Start building a Dockerfile target as is, its output in ``log``."""
    PODMAN_CWD.mkdir(exist_ok=True)
    args = [
        "build",
        "--format=docker",  # keeps HEALTHCHECK (the OCI format drops it)
        "--network=host",
        "--layers=false",  # no intermediate images left behind
        "--pull=never",
        f"--target={target}",
        f"--build-arg=PYTHON_IMAGE={base}",
        *mounts,
        "-t",
        tag,
        str(REPO),
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["podman", *args], cwd=PODMAN_CWD, env=_podman_env(), stdout=out, stderr=out
        )
    return Build(tag, proc, log, time.monotonic())


def build_image(target: str, tag: str, base: str, mounts: list[str], log: Path) -> float:
    """Build a Dockerfile target as is; returns the seconds it took."""
    return start_build(target, tag, base, mounts, log).wait()


def image_size_mb(tag: str) -> float:
    """The image's size in MB (10^6 bytes), as `podman images` reports it."""
    return int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout) / 1e6


GPU_TEST = "test_gpu_image_builds_and_serves_on_the_cpu_loudly"


@pytest.fixture(scope="session")
def gpu_build(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Build | None]:
    """The `gpu` target's build, for its test (the module's last). Not in the background beside
    the cpu image's tests: on 2 cores, beside the other xdist workers, it starved them (a 408
    upload, a stop past its grace period). None when the gpu test is not to run."""
    if os.environ.get(GPU_FLAG) == "0" or not any(
        item.name == GPU_TEST for item in request.session.items
    ):
        yield None
        return
    base, mounts = request.getfixturevalue("base_image"), request.getfixturevalue("build_mounts")
    tag = f"localhost/unet-segmentation-test:gpu-{SUFFIX}"
    build = start_build("gpu", tag, base, mounts, tmp_path_factory.mktemp("gpu") / "build.log")
    try:
        yield build
    finally:
        build.stop()
        _gone("image", tag)


@pytest.fixture(scope="session")
def cpu_image(
    base_image: str, build_mounts: list[str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The `cpu` target, built once per session under a unique tag, removed at the end."""
    tag = f"localhost/unet-segmentation-test:cpu-{SUFFIX}"
    log = tmp_path_factory.mktemp("cpu") / "build.log"
    try:
        seconds = build_image("cpu", tag, base_image, build_mounts, log)
        print(f"\ncpu image: built in {seconds:.0f} s, {image_size_mb(tag):.0f} MB")
        yield tag
    finally:
        _gone("image", tag)


# --- the service container, run with the compose file's own settings --------------------------


def _interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` with the defaults (the tests never set SEG_* variables)."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def _seconds(duration: str) -> int:
    m = re.fullmatch(r"(\d+)s", duration)
    assert m, f"unexpected duration {duration!r}"
    return int(m.group(1))


@dataclass
class ComposeService:
    """The settings of docker-compose.yml's ``segment-cpu`` service that `podman run` takes."""

    env: dict[str, str]
    stop_grace_s: int
    args: list[str]

    @classmethod
    def from_compose(cls) -> ComposeService:
        svc = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["segment-cpu"]
        env = {k: _interpolate(str(v)) for k, v in svc["environment"].items() if v is not None}
        args = [f"--env={k}={v}" for k, v in env.items()]
        if svc["read_only"]:
            args.append("--read-only")
        args += [f"--tmpfs={t}" for t in svc["tmpfs"]]
        if svc["init"]:
            args.append("--init")
        args += [f"--cap-drop={c}" for c in svc["cap_drop"]]
        args += [f"--security-opt={o}" for o in svc["security_opt"]]
        for volume in svc["volumes"]:
            host, _, rest = _interpolate(volume).partition(":")
            args.append(f"--volume={(REPO / host).resolve()}:{rest}")
        return cls(env, _seconds(svc["stop_grace_period"]), args)


@dataclass
class Container:
    """A running service container and its address on the host's loopback."""

    name: str
    url: str

    def logs(self) -> str:
        proc = podman("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def inspect(self, fmt: str) -> str:
        return podman("inspect", "--format", fmt, self.name).stdout.strip()


@contextmanager
def service_container(
    image: str, what: str, extra: Sequence[str] = (), tmp: str | None = None
) -> Iterator[Container]:
    """The image run like compose's segment-cpu, on a free loopback port, with ``extra``
    ``podman run`` options and, given ``tmp``, that tmpfs for /tmp instead of compose's; yields
    once /readyz says 200 and always removes the container."""
    compose = ComposeService.from_compose()
    name = f"seg-test-{what}-{SUFFIX}"
    port = free_port()
    args = compose.args
    if tmp is not None:
        args = [a for a in args if not a.startswith("--tmpfs=/tmp")] + [f"--tmpfs=/tmp:{tmp}"]
    try:
        podman(
            "run",
            "--detach",
            f"--name={name}",
            f"--publish=127.0.0.1:{port}:8000",
            *args,
            *extra,
            image,
        )
        box = Container(name, f"http://127.0.0.1:{port}")

        def ready() -> bool | None:
            state = box.inspect("{{.State.Status}}")
            assert state == "running", f"container {state}:\n{box.logs()[-3000:]}"
            try:
                return httpx.get(f"{box.url}/readyz", timeout=2).status_code == 200 or None
            except httpx.TransportError:
                return None

        _wait_for(ready, READY_TIMEOUT_S, f"{name} to be ready")
        yield box
    finally:
        _gone("container", name)


@pytest.fixture(scope="module")
def cpu_service(cpu_image: str) -> Iterator[Container]:
    """One container of the cpu image, shared by the tests that only send it requests."""
    with service_container(cpu_image, "cpu") as box:
        yield box


@pytest.fixture(scope="module")
def held_out_frame(data_sets: Path) -> np.ndarray:
    """frame_017 of the HeLa set, held out from the bundled models' training."""
    return np.asarray(tifffile.imread(HELA / "images" / "frame_017.tif"))


def _mask(png: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(png))
    img.load()
    return np.asarray(img)


# --- 1 and 2: the cpu image, run hardened -----------------------------------------------------


def test_cpu_image_runs_with_the_compose_hardening(cpu_service: Container, cpu_image: str) -> None:
    """The container really runs as compose asks: the settings are in force, not just passed."""
    host = json.loads(cpu_service.inspect("{{json .HostConfig}}"))
    assert host["ReadonlyRootfs"] is True
    assert "/tmp" in host["Tmpfs"] and "size=4g" in host["Tmpfs"]["/tmp"]
    assert host["Init"] is True
    assert "no-new-privileges" in " ".join(host["SecurityOpt"])
    # Every process: UID and GID 10001, no effective capabilities; catatonit is PID 1. (huser
    # and hgroup are the IDs seen from the host, the same here: no user namespace.)
    top = podman("top", cpu_service.name, "pid", "huser", "hgroup", "capeff", "args").stdout
    rows = [line.split(None, 4) for line in top.splitlines()[1:] if line.strip()]
    assert rows and all(r[1:4] == ["10001", "10001", "none"] for r in rows), top
    assert any(r[0] == "1" and "init" in r[4] for r in rows), top
    ids = podman("exec", cpu_service.name, "python", "-c", "import os; print(os.getuid())")
    assert ids.stdout.strip() == "10001"
    # The image says the same of itself (so `docker run` without compose is non-root too).
    assert podman("image", "inspect", "--format", "{{.Config.User}}", cpu_image).stdout.strip() == (
        "10001:10001"
    )


def test_cpu_container_is_ready_and_answers_metrics(cpu_service: Container) -> None:
    ready = httpx.get(f"{cpu_service.url}/readyz", timeout=10)
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"
    assert set(ready.json()["models"]) == {"nuclei", "nuclei-3class"}
    models = httpx.get(f"{cpu_service.url}/models", timeout=10).json()["models"]
    assert {m["provider"] for m in models} == {"CPUExecutionProvider"}
    metrics = httpx.get(f"{cpu_service.url}/metrics", timeout=10)
    assert metrics.status_code == 200
    assert "segment_models_ready 1.0" in metrics.text


def test_segment_in_the_container_equals_the_service_outside(
    cpu_service: Container, held_out_frame: np.ndarray
) -> None:
    """The held-out frame gives, pixel for pixel, the mask the service gives outside the
    container with the same models and the compose file's settings."""
    body = png_bytes(held_out_frame)
    r = httpx.post(f"{cpu_service.url}/segment", files=segment_files(body), timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    inside = _mask(r.content)

    settings = {
        k.removeprefix("SEG_").lower(): v for k, v in ComposeService.from_compose().env.items()
    }
    # The image's own settings: all cores (intra_op_threads 0), the CPU provider; the default
    # model's newest version is the one compared, so the others need not load.
    with running_app(
        REPO_MODELS, intra_op_threads=0, model_versions="newest", **settings
    ) as client:
        ref = client.post("/segment", files=segment_files(body))
    assert ref.status_code == 200, ref.text
    outside = _mask(ref.content)

    assert inside.shape == outside.shape == held_out_frame.shape
    assert inside.dtype == outside.dtype == np.uint8
    assert np.array_equal(inside, outside), f"{np.count_nonzero(inside != outside)} pixels differ"
    assert 0 < np.count_nonzero(inside) < inside.size  # a real mask, not blank


def test_image_healthcheck_reports_healthy(cpu_service: Container) -> None:
    """The image's HEALTHCHECK (kept by --format docker), run by hand: podman's timers need
    systemd, which CI does not have."""
    assert cpu_service.inspect("{{.Config.Healthcheck.Test}}").find("/healthz") > 0
    podman("healthcheck", "run", cpu_service.name)
    assert cpu_service.inspect("{{.State.Health.Status}}") == "healthy"


def test_container_logs_carry_request_ids(cpu_service: Container) -> None:
    """A request's ID, sent as X-Request-ID, comes back on the response and is on the
    container's log line about it (a rejected upload is logged; a successful one is not)."""
    rid = f"ci-{uuid.uuid4().hex[:12]}"
    r = httpx.post(
        f"{cpu_service.url}/segment",
        files=segment_files(b"this is not an image" * 10),
        headers={"X-Request-ID": rid},
        timeout=30,
    )
    assert 400 <= r.status_code < 500, r.text
    assert r.headers["x-request-id"] == rid and r.json()["request_id"] == rid
    line = _wait_for(
        lambda: next((ln for ln in cpu_service.logs().splitlines() if rid in ln), None),
        10,
        f"request ID {rid} in podman logs",
    )
    assert f"[{rid}] POST /segment -> {r.status_code}" in line


def test_nothing_written_outside_tmp(cpu_service: Container, held_out_frame: np.ndarray) -> None:
    """After inference ran (an upload spooled to /tmp, ONNX Runtime sessions made), the
    container's writable layer holds only the mount points podman itself adds under /etc
    (hosts, resolv.conf, hostname), and nothing failed to be written."""
    r = httpx.post(
        f"{cpu_service.url}/segment?precision=int8",
        files=segment_files(png_bytes(held_out_frame)),
        timeout=120,
    )
    assert r.status_code == 200, r.text
    diff = podman("diff", "--format", "json", cpu_service.name).stdout
    changes = json.loads(diff) if diff.strip() else {}
    paths = {p for kind in changes.values() for p in (kind or [])}
    allowed = {"/etc", "/etc/hosts", "/etc/resolv.conf", "/etc/hostname", "/run", "/tmp"}
    assert paths <= allowed, f"written outside /tmp: {sorted(paths - allowed)}"
    # A write refused by the read-only root shows up in the log (e.g. ONNX Runtime's telemetry
    # device ID, which the image turns off with ORT_DISABLE_TELEMETRY).
    logs = cpu_service.logs()
    for refused in ("Read-only file system", "Failed to persist", "Permission denied"):
        assert refused not in logs, logs[-3000:]


# --- 3: stop while a large request is in flight ------------------------------------------------


def test_stop_lets_a_large_request_in_flight_finish(
    cpu_image: str, held_out_frame: np.ndarray
) -> None:
    """`podman stop -t <stop_grace_period>` during a large request: the request still gets its
    mask, the stop takes less than the grace period (no SIGKILL), and the exit code is 0."""
    grace = ComposeService.from_compose().stop_grace_s
    # 2100 x 2200, 100 tiles: several seconds of inference, so that the stop lands mid-request
    # (checked below), and well inside the grace period even on two busy cores.
    big = np.tile(held_out_frame, (3, 2))
    result: dict[str, Any] = {}

    with service_container(cpu_image, "stop", NEWEST) as box:

        def send() -> None:
            try:
                result["response"] = httpx.post(
                    f"{box.url}/segment", files=segment_files(png_bytes(big)), timeout=grace + 30
                )
                result["answered"] = time.monotonic()
            except Exception as exc:  # the assertion below reports it
                result["error"] = exc

        sender = threading.Thread(target=send)
        sender.start()
        try:

            def in_flight() -> bool | None:
                text = httpx.get(f"{box.url}/metrics", timeout=10).text
                m = re.search(r"^segment_requests_in_flight (\S+)$", text, re.MULTILINE)
                return (m is not None and float(m.group(1)) >= 1) or None

            _wait_for(in_flight, 60, "the large request to be in flight")
            start = time.monotonic()
            podman("stop", "-t", str(grace), box.name, timeout=grace + 30)
            stop_s = time.monotonic() - start
        finally:
            sender.join(timeout=grace + 60)
        print(f"\npodman stop took {stop_s:.1f} s with a {big.shape} request in flight")

        assert "error" not in result, f"the request in flight failed: {result.get('error')!r}"
        r = result["response"]
        assert r.status_code == 200, r.text
        assert _mask(r.content).shape == big.shape
        assert result["answered"] > start, "the request was over before the stop: not in flight"
        assert stop_s < grace, f"stop took {stop_s:.0f} s: SIGKILL after the grace period?"
        assert box.inspect("{{.State.Status}}") == "exited"
        assert box.inspect("{{.State.ExitCode}}") == "0", box.logs()[-3000:]
        logs = box.logs()
        assert "Waiting for connections to close" in logs or "Shutting down" in logs, logs[-2000:]


# --- 4: the compose file, brought up with podman-compose ----------------------------------------


@pytest.fixture(scope="module")
def prometheus_image(base_image: str) -> Iterator[str]:
    """deploy/prometheus/Dockerfile: Debian's prometheus package on the local bookworm base."""
    tag = f"localhost/unet-segmentation-test:prometheus-{SUFFIX}"
    try:
        podman(
            "build",
            "--format=docker",
            "--network=host",
            "--layers=false",
            "--pull=never",
            f"--build-arg=BASE_IMAGE={base_image}",
            "-t",
            tag,
            str(PROMETHEUS_CONTEXT),
            timeout=BUILD_TIMEOUT_S,
        )
        yield tag
    finally:
        _gone("image", tag)


def _podman_compose() -> str:
    path = shutil.which("podman-compose") or shutil.which(
        "podman-compose", path=str(Path(sys.executable).parent)
    )
    if path is None:
        _unavailable("podman-compose is not installed; it comes with the dev extra")
    assert path is not None
    return path


def _project_containers(project: str) -> list[str]:
    """The containers podman-compose made for ``project`` (it labels them)."""
    label = f"label=io.podman.compose.project={project}"
    return podman("ps", "-a", "--filter", label, "--format", "{{.Names}}").stdout.split()


def _project_leftovers(project: str) -> dict[str, list[str]]:
    """What podman still holds of a compose project: containers, pods, networks and volumes
    (podman-compose names pods, networks and volumes after the project)."""
    named = {
        "pod": podman("pod", "ps", "--format", "{{.Name}}").stdout.split(),
        "network": podman("network", "ls", "--format", "{{.Name}}").stdout.split(),
        "volume": podman("volume", "ls", "--format", "{{.Name}}").stdout.split(),
    }
    left = {kind: [n for n in names if project in n] for kind, names in named.items()}
    left["container"] = _project_containers(project)
    return {kind: names for kind, names in left.items() if names}


def test_compose_stack_with_podman_compose(cpu_image: str, prometheus_image: str) -> None:
    """docker-compose.yml as it is, plus docker-compose.podman.yml (the local images): the
    service and Prometheus come up, Prometheus finds the service by its compose name, loads the
    alert rules and sees the models ready and an inference, and `down` removes everything."""
    compose = _podman_compose()
    project = f"segtest{SUFFIX}"
    seg_port, prom_port = free_port(), free_port()
    env = _podman_env(
        SEG_PUBLISH_PORT=str(seg_port),
        PROMETHEUS_PUBLISH_PORT=str(prom_port),
        SEG_CPU_IMAGE=cpu_image,
        PROMETHEUS_IMAGE=prometheus_image,
    )
    files = ["-f", str(COMPOSE_FILE), "-f", str(PODMAN_OVERRIDE)]
    base = [compose, "--project-name", project, *files]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*base, *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
        assert proc.returncode == 0, f"podman-compose {' '.join(args)}:\n{proc.stderr[-4000:]}"
        return proc

    try:
        # docs/deployment.md's CPU way. Docker Compose starts a named service although its
        # profile is off; podman-compose (1.6) needs the profile, and starts only those named.
        run("--profile", "cpu", "up", "-d", "segment-cpu", "prometheus")
        service_url, prom_url = f"http://127.0.0.1:{seg_port}", f"http://127.0.0.1:{prom_port}"

        def ready() -> bool | None:
            try:
                return httpx.get(f"{service_url}/readyz", timeout=2).status_code == 200 or None
            except httpx.TransportError:
                return None

        _wait_for(ready, READY_TIMEOUT_S, "segment-cpu to be ready")
        names = _project_containers(project)
        assert len(names) == 2, names
        for name in names:
            if "segment-cpu" in name:
                podman("healthcheck", "run", name)  # compose's healthcheck, run by hand
        api = PromAPI(prom_url)

        def target() -> dict[str, Any] | None:
            data = api.get("targets", state="active")
            for t in (data or {}).get("activeTargets", []):
                if t["labels"].get("job") == JOB and t["health"] == "up":
                    return dict(t)
            return None

        up = _wait_for(target, SCRAPE_TIMEOUT_S, "Prometheus to scrape segment-cpu")
        # Found by DNS under its compose service name, relabelled as the CPU service.
        assert up["discoveredLabels"]["__meta_dns_name"] == "segment-cpu"
        assert up["scrapeUrl"].startswith("http://") and up["scrapeUrl"].endswith(":8000/metrics")
        assert up["labels"]["compose_service"] == "segment-cpu"
        assert up["labels"]["accelerator"] == "cpu"
        assert api.value(f'up{{job="{JOB}"}}') == 1.0
        # Ready in Prometheus from its first scrape after /readyz turned 200 (a scrape before
        # it, while the models loaded, says 0: seen under load).
        _wait_for(
            lambda: api.value(f'segment_models_ready{{job="{JOB}"}}') == 1.0 or None,
            SCRAPE_TIMEOUT_S,
            "Prometheus to see the models ready",
        )

        rules = api.get("rules", type="alert")
        loaded = [r["name"] for g in rules["groups"] if g["name"] == JOB for r in g["rules"]]
        assert len(loaded) == 6 and "SegmentModelNotOnGPU" in loaded, loaded

        query = f'sum(segment_inference_seconds_count{{job="{JOB}"}}) or vector(0)'
        before = api.value(query)
        assert before is not None
        img = np.random.default_rng(7).integers(0, 256, (300, 400), dtype=np.uint8)
        r = httpx.post(f"{service_url}/segment", files=segment_files(png_bytes(img)), timeout=60)
        assert r.status_code == 200, r.text
        after = _wait_for(
            lambda: v if (v := api.value(query)) is not None and v > before else None,
            SCRAPE_TIMEOUT_S,
            "the inference counter to increase in Prometheus",
        )
        assert after == before + 1
    finally:
        down = subprocess.run(
            [*base, "--profile", "cpu", "down", "-v", "-t", "10"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=PODMAN_TIMEOUT_S * 2,
            check=False,
        )
        leftovers = _project_leftovers(project)
        # Whatever `down` missed is removed anyway (containers first), then reported.
        for kind in ("container", "pod", "network", "volume"):
            for name in leftovers.get(kind, []):
                _gone(kind, name)
    assert down.returncode == 0, down.stderr[-3000:]
    assert leftovers == {}, f"`podman-compose down -v` left: {leftovers}"


# --- 5: the gpu image, without a GPU ------------------------------------------------------------


def test_gpu_image_builds_and_serves_on_the_cpu_loudly(gpu_build: Build | None) -> None:
    """The `gpu` target builds, so its ldd check found every library of the CUDA provider
    (bar the driver's libcuda); run without a GPU, it serves on the CPU and warns."""
    if gpu_build is None:
        _unavailable(f"{GPU_FLAG}=0: the gpu image (~70 s, ~11 GB of disk) is left out")
    assert gpu_build is not None
    seconds = gpu_build.wait()
    tag = gpu_build.tag
    print(f"\ngpu image: built in {seconds:.0f} s beside the others, {image_size_mb(tag):.0f} MB")
    with service_container(tag, "gpu", NEWEST) as box:
        models = httpx.get(f"{box.url}/models", timeout=10).json()["models"]
        assert {m["provider"] for m in models} == {"CPUExecutionProvider"}
        assert all(m["providers"][0] == "CPUExecutionProvider" for m in models), models
        warnings = [ln for ln in box.logs().splitlines() if " WARNING " in ln and "CUDA" in ln]
        assert warnings, box.logs()[-3000:]
        assert any("runs it on CPUExecutionProvider" in ln for ln in warnings), warnings


# --- 5: memory and spool space under real limits -----------------------------------------------

MEMORY_LIMIT_MIB = 600  # the container: SIGKILLed at start-up before budgets


def _zeros_png16(side: int) -> bytes:
    """A 16-bit grey PNG of zeros: hundreds of MB decoded, a few hundred KB sent."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((side, side), np.uint16)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _metric(box: Container, name: str, **labels: str) -> float | None:
    text = httpx.get(f"{box.url}/metrics", timeout=10).text
    return metric_sample(text, name, **labels)


def test_a_memory_limited_container_refuses_what_cannot_fit_and_stays_up(
    cpu_image: str, held_out_frame: np.ndarray
) -> None:
    """`--memory 600m` (newest model versions only): the budget comes from the cgroup; an image
    that needs more than that
    gets 413 with the numbers, the container stays up and serves the next request. The same
    image with SEG_MEMORY_ADMISSION=false (the service before budgets) kills the container."""
    limit = [f"--memory={MEMORY_LIMIT_MIB}m", f"--memory-swap={MEMORY_LIMIT_MIB}m"]
    # A small container serves each model's newest version only (every version: 250 MiB of
    # models, which leaves too little for the frame below).
    limit.extend(NEWEST)
    with service_container(cpu_image, "memory", limit) as box:
        assert _metric(box, "segment_memory_budget_bytes", part="total") == MEMORY_LIMIT_MIB << 20
        capacity = _metric(box, "segment_memory_budget_bytes", part="requests")
        assert capacity and capacity > 64 << 20, box.logs()[-3000:]
        # About twice what is left for requests: 16-bit, 2 bytes decoded + 2 of masks per pixel.
        side = int(np.sqrt(2 * capacity / 4))
        image = _zeros_png16(side)
        t0 = time.monotonic()
        r = httpx.post(f"{box.url}/segment", files=segment_files(image), timeout=120)
        answered_s = time.monotonic() - t0
        assert r.status_code == 413, r.text
        assert r.json()["code"] == "too_large"
        assert "cgroup" in r.json()["detail"] and f"{side}x{side}" in r.json()["detail"]
        assert box.inspect("{{.State.Status}}") == "running"
        ok = httpx.post(
            f"{box.url}/segment", files=segment_files(png_bytes(held_out_frame)), timeout=120
        )
        assert ok.status_code == 200, ok.text

    without = [*limit, "--env=SEG_MEMORY_ADMISSION=false"]
    with service_container(cpu_image, "memory-unguarded", without) as box:
        with pytest.raises(httpx.TransportError):
            httpx.post(f"{box.url}/segment", files=segment_files(image), timeout=300)

        def stopped() -> bool | None:
            return box.inspect("{{.State.Status}}") != "running" or None

        _wait_for(stopped, 60, "the unguarded container to be killed")
        state = json.loads(box.inspect("{{json .State}}"))
        assert state["OOMKilled"] or state["ExitCode"] in (137, 9), state
    record(
        "container_memory_limit",
        {
            "memory_limit_mib": MEMORY_LIMIT_MIB,
            "for_requests_mib": round(capacity / 2**20),
            "image": f"{side}x{side} uint16 PNG, {len(image) / 1e6:.1f} MB",
            "with_budget": f"413 in {answered_s:.2f} s, container running, next request 200",
            "without_admission": f"container killed: OOMKilled={state['OOMKilled']}, "
            f"exit code {state['ExitCode']}",
        },
    )


def _uncompressed_tiff(side: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return _tiff(rng.integers(0, 4000, (side, side), dtype=np.uint16))


def _tiff(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr)
    return buf.getvalue()


def _raw_uploads(box: Container, uploads: list[bytes], port: int) -> list[int]:
    """Declare every upload at once (headers only), then send the bodies of those not
    answered already; the statuses, in order."""
    bodies = []
    for data in uploads:
        request = httpx.Request("POST", "http://x/segment", files=segment_files(data))
        bodies.append((request.read(), request.headers["content-type"]))
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in uploads]
    statuses = []
    try:
        for sock, (body, ctype) in zip(socks, bodies, strict=True):
            sock.sendall(http_head(port, len(body), ctype))
            time.sleep(0.3)
        for sock, (body, _) in zip(socks, bodies, strict=True):
            sock.settimeout(1.0)
            try:
                early = sock.recv(65536, socket.MSG_PEEK)
            except TimeoutError:
                early = b""
            if not early:
                sock.sendall(body)
            response = read_response(sock, timeout=180)
            statuses.append(int(response.split(b" ", 2)[1]) if response else 0)
            if statuses[-1] == 503:
                assert b'"code":"spool_full"' in response, response[-500:]
    finally:
        for sock in socks:
            sock.close()
    return statuses


def _tmp_listing(box: Container) -> set[str]:
    out = podman("exec", box.name, "ls", "-A", "/tmp").stdout
    return set(out.split())


def test_a_small_tmpfs_spool_answers_503_not_400_and_the_uploads_that_fit_succeed(
    cpu_image: str,
) -> None:
    """/tmp is an 8 MiB tmpfs (compose's is 4 GiB) and four ~2.9 MB uploads arrive at once:
    two fit the free space and get their masks, two get 503 spool_full with Retry-After, and
    the tmpfs is empty again afterwards."""
    uploads = [_uncompressed_tiff(1200, seed) for seed in range(4)]
    with service_container(cpu_image, "spool", NEWEST, tmp="size=8m,mode=1777") as box:
        port = int(box.url.rsplit(":", 1)[1])
        before = _tmp_listing(box)
        statuses = _raw_uploads(box, uploads, port)
        assert statuses == [200, 200, 503, 503], (statuses, box.logs()[-3000:])
        assert "spool space exhausted" in box.logs()
        time.sleep(0.5)
        assert _tmp_listing(box) == before
        record(
            "container_small_tmpfs",
            {
                "tmpfs": "8 MiB",
                "uploads": f"4 x {len(uploads[0]) / 1e6:.1f} MB declared at once",
                "statuses": statuses,
                "tmp_after": "as before",
            },
        )
        for data in uploads[2:]:
            r = httpx.post(f"{box.url}/segment", files=segment_files(data), timeout=180)
            assert r.status_code == 200, r.text


def test_a_spool_budget_larger_than_the_disk_still_gets_503_not_400(cpu_image: str) -> None:
    """SEG_SPOOL_BUDGET promises 1 GiB on a 2 MiB tmpfs: the upload is admitted, the disk
    fills while it is spooled, and the answer is 503 spool_full, logged at ERROR, not
    FastAPI's 400 "There was an error parsing the body"."""
    upload = _uncompressed_tiff(1200, 9)
    extra = [*NEWEST, "--env=SEG_SPOOL_BUDGET=1GiB"]
    with service_container(cpu_image, "enospc", extra, tmp="size=2m,mode=1777") as box:
        r = httpx.post(f"{box.url}/segment", files=segment_files(upload), timeout=60)
        assert r.status_code == 503, r.text
        assert r.json()["code"] == "spool_full" and r.headers["Retry-After"].isdigit()
        assert "ran out of space" in box.logs() and "ERROR" in box.logs()
        small = png_bytes(np.zeros((64, 64), np.uint8))
        assert httpx.post(f"{box.url}/segment", files=segment_files(small)).status_code == 200
        record(
            "container_enospc",
            {"tmpfs": "2 MiB", "spool_budget": "1GiB", "status": 503, "code": "spool_full"},
        )
