"""The service's Grafana dashboard, built with grafana-foundation-sdk (Grafana's own typed
builders): ``deploy/grafana/dashboards/segment-service.json`` is this script's output.

    python deploy/grafana/dashboard.py           # write the JSON
    python deploy/grafana/dashboard.py --check   # exit 1 if the JSON is not what this builds

Each panel answers one operator's question (see docs/operations.md, "Grafana"). Every query is run
against a real Prometheus scraping the real service in tests/test_deploy.py, so a panel whose
query returns nothing fails CI.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, GridPos
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

OUT = Path(__file__).resolve().parent / "dashboards" / "segment-service.json"
UID = "segment-service"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="prometheus")  # provisioning/datasources
JOB = 'job="segment-service"'  # the scrape job of deploy/prometheus/prometheus.yml
RATE = "$__rate_interval"  # Grafana's window for rate(): at least four scrape intervals


def query(expr: str, legend: str = "", ref: str = "A") -> prometheus.Dataquery:
    """A PromQL query of the provisioned Prometheus."""
    q = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DATASOURCE)
    return q.legend_format(legend) if legend else q


def graph(
    title: str,
    description: str,
    unit: str,
    pos: tuple[int, int, int, int],
    *queries: tuple[str, str],
) -> timeseries.Panel:
    """A time series panel at grid position ``(x, y, w, h)`` with ``(expr, legend)`` queries."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .grid_pos(GridPos(x=pos[0], y=pos[1], w=pos[2], h=pos[3]))
    )
    for i, (expr, legend) in enumerate(queries):
        panel = panel.with_target(query(expr, legend, ref=chr(ord("A") + i)))
    return panel


def build() -> dashboard.Dashboard:
    """The dashboard: traffic and latency, the models' work, the admission gate, health."""
    seg = f'{JOB}, handler="/segment"'
    traffic = graph(
        "Requests/s by status",
        "Answered HTTP requests per second, by status class (2xx, 4xx, 5xx) and route.",
        "reqps",
        (0, 0, 12, 8),
        (
            f"sum by (status, handler) (rate(http_requests_total{{{JOB}}}[{RATE}]))",
            "{{handler}} {{status}}",
        ),
    )
    latency = graph(
        "Latency p50 / p95",
        "Time to answer a request (all routes, fine buckets), and p95 of /segment alone.",
        "s",
        (12, 0, 12, 8),
        (
            "histogram_quantile(0.5, sum by (le) "
            f"(rate(http_request_duration_highr_seconds_bucket{{{JOB}}}[{RATE}])))",
            "p50",
        ),
        (
            "histogram_quantile(0.95, sum by (le) "
            f"(rate(http_request_duration_highr_seconds_bucket{{{JOB}}}[{RATE}])))",
            "p95",
        ),
        (
            "histogram_quantile(0.95, sum by (le) "
            f"(rate(http_request_duration_seconds_bucket{{{seg}}}[{RATE}])))",
            "p95 /segment",
        ),
    )
    inference = graph(
        "Inference seconds per request, by model",
        "Mean time in the model per /segment request (all tile batches), by model.",
        "s",
        (0, 8, 8, 8),
        (
            f"sum by (model) (rate(segment_inference_seconds_sum{{{JOB}}}[{RATE}])) / "
            f"sum by (model) (rate(segment_inference_seconds_count{{{JOB}}}[{RATE}]))",
            "{{model}}",
        ),
    )
    tiles = graph(
        "Tiles/s by model",
        "Tiles run through each model per second: the throughput the GPU or CPU delivers.",
        "ops",
        (8, 8, 8, 8),
        (f"sum by (model) (rate(segment_tiles_total{{{JOB}}}[{RATE}]))", "{{model}}"),
    )
    batches = graph(
        "Tiles per model call",
        "Batch sizes sent to ONNX Runtime (median and p95); small batches waste a GPU.",
        "none",
        (16, 8, 8, 8),
        (
            "histogram_quantile(0.5, sum by (le, model) "
            f"(rate(segment_tile_batch_size_bucket{{{JOB}}}[{RATE}])))",
            "median {{model}}",
        ),
        (
            "histogram_quantile(0.95, sum by (le, model) "
            f"(rate(segment_tile_batch_size_bucket{{{JOB}}}[{RATE}])))",
            "p95 {{model}}",
        ),
    )
    gate = graph(
        "In flight and queued",
        "Requests admitted (running or waiting) and those waiting for a worker. Beyond "
        "workers + SEG_MAX_QUEUE, requests are refused with 503.",
        "none",
        (0, 16, 8, 8),
        (f"sum(segment_requests_in_flight{{{JOB}}})", "in flight"),
        (f"sum(segment_requests_queued{{{JOB}}})", "queued"),
    )
    rejected = graph(
        "503 rejections/s",
        "Requests refused because the service was saturated (the client retries after "
        "Retry-After). Sustained: add workers or replicas.",
        "reqps",
        (8, 16, 8, 8),
        (f"sum(rate(segment_requests_rejected_total{{{JOB}}}[{RATE}]))", "rejected"),
    )
    errors = graph(
        "Errors/s by reason",
        "Failed /segment requests by error code (invalid_image, too_large, internal, ...).",
        "reqps",
        (16, 16, 8, 8),
        (f"sum by (reason) (rate(segment_errors_total{{{JOB}}}[{RATE}]))", "{{reason}}"),
    )
    ready = (
        stat.Panel()
        .title("Models ready")
        .description("1 when every model in the model directory is loaded and warm.")
        .datasource(DATASOURCE)
        .grid_pos(GridPos(x=0, y=24, w=6, h=6))
        .with_target(query(f"min(segment_models_ready{{{JOB}}})", "ready"))
    )
    providers = (
        table.Panel()
        .title("Models and the provider each runs on")
        .description(
            "CPUExecutionProvider on a GPU host means the model silently runs 10-100x slower "
            "(alert SegmentModelNotOnGPU)."
        )
        .datasource(DATASOURCE)
        .grid_pos(GridPos(x=6, y=24, w=10, h=6))
        .with_target(
            query(f"max by (instance, model, version, provider) (segment_model_info{{{JOB}}})")
            .instant()
            .format(PromQueryFormat.TABLE)
        )
    )
    memory = graph(
        "Process memory and its budget",
        "Resident memory of each service process (model sessions, arenas and requests); its "
        "memory budget (SEG_MEMORY_BUDGET or the cgroup limit); and what is admitted against "
        "it: the models plus the estimated cost of the requests admitted. Requests that do "
        "not fit get 503 (for now) or 413 (never).",
        "bytes",
        (16, 24, 8, 6),
        (f"process_resident_memory_bytes{{{JOB}}}", "resident {{instance}}"),
        (f'segment_memory_budget_bytes{{{JOB}, part="total"}}', "budget {{instance}}"),
        (
            f'segment_memory_budget_bytes{{{JOB}, part="models"}} + ignoring(part) '
            f"segment_memory_reserved_bytes{{{JOB}}}",
            "admitted {{instance}}",
        ),
    )
    board = (
        dashboard.Dashboard("U-Net segmentation service")
        .uid(UID)
        .tags(["segmentation", "onnxruntime"])
        .refresh("30s")
        .time("now-3h", "now")
        .timezone("browser")
    )
    for panel in (
        traffic,
        latency,
        inference,
        tiles,
        batches,
        gate,
        rejected,
        errors,
        ready,
        providers,
        memory,
    ):
        board = board.with_panel(panel)
    return board


def _without_nulls(value: Any) -> Any:
    """``value`` without the keys the SDK leaves ``null`` (Grafana wants them absent, e.g. a
    panel's ``options``, which it then fills with the panel type's defaults)."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def render() -> str:
    """The dashboard as the JSON file Grafana's provisioning loads."""
    encoded = json.loads(JSONEncoder().encode(build().build()))
    return json.dumps(_without_nulls(encoded), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the dashboard JSON, or with ``--check`` compare it with what is committed."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is not what {Path(__file__).name} builds: run it", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
