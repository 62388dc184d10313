"""The service on Ray Serve against the standalone service, and how Ray Serve scales, in one run.

    python -m bench.scaling        # ~4 min on 2 cores -> docs/scaling.md (the generated block)

Three cases, one after another on the same machine:

1. **Many small images (256², the screening case), real model**: the standalone service
   (``segment-service``'s uvicorn, its defaults) and the Ray Serve application from
   ``deploy/ray/serve.yaml`` (2 ingress replicas; 1, then 2 model replicas), each under 1 and
   under 8 concurrent clients: latency p50/p95 and requests per second, and the tiles per model
   call the model replicas ran (batching across requests).
2. **Throughput against model replicas, real model**: the same figures read as a scaling curve.
   On a 2-core machine the replicas share two cores, so this cannot show CPU scaling.
3. **Throughput against model replicas, fixed-cost predictor**: the model replica's model call
   replaced by a sleep of a fixed time per call (the same ingress, handles, batching and
   queues), so each replica adds capacity without needing a core: this shows what the engine
   itself does with more replicas, and with batching. It says nothing about model speed.

Every request is checked (200 and a PNG); the load generator runs in this process, on the same
cores. Writes docs/scaling.json and the table block of docs/scaling.md (the text around it is
hand-written).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.images import synthetic, tiff_bytes
from bench.live_server import REPO, live_server
from bench.markdown import replace_generated
from bench.rayserve import ServeApp, load_serve_config, local_config, local_serve

MODEL = "nuclei"
SMALL = 256
ENV = {"SEG_PROVIDERS": '["CPUExecutionProvider"]', "SEG_INTRA_OP_THREADS": "1"}
FIXED_COST_S = 0.2


def small_images(count: int) -> list[bytes]:
    """256² uint16 TIFFs of nucleus-like blobs, all different."""
    return [tiff_bytes(synthetic(SMALL, SMALL, seed=i)) for i in range(count)]


def drive(url: str, bodies: list[bytes], clients: int, requests: int) -> dict[str, Any]:
    """``clients`` threads post ``requests`` images in all, each waiting for its answer before
    sending the next (closed loop); latency per request, throughput over the whole run."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        with httpx.Client(timeout=300) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body = bodies[i % len(bodies)]
                start = time.perf_counter()
                r = http.post(f"{url}/segment", files={"image": ("i.tif", body, "image/tiff")})
                took = time.perf_counter() - start
                with lock:
                    if r.status_code == 200 and r.content.startswith(b"\x89PNG"):
                        latencies.append(took)
                    else:
                        failures.append(f"{r.status_code} {r.text[:120]}")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, e.g. {failures[:3]}")
    ms = sorted(x * 1000 for x in latencies)
    return {
        "clients": clients,
        "requests": requests,
        "seconds": round(seconds, 2),
        "per_s": round(requests / seconds, 2),
        "p50_ms": round(statistics.median(ms), 1),
        "p95_ms": round(ms[min(len(ms) - 1, int(0.95 * len(ms)))], 1),
    }


def batch_totals(app: ServeApp) -> tuple[int, int, int]:
    """(model calls, tiles, calls holding more than one request's tiles) over the replicas."""
    from ray import serve

    handle = serve.get_deployment_handle(f"model-{MODEL}", app_name="segment")
    seen: dict[str, Any] = {}
    replicas = app.replica_actors(f"model-{MODEL}")
    deadline = time.monotonic() + 30
    while len(seen) < len(replicas) and time.monotonic() < deadline:
        stats = handle.batch_stats.remote().result(timeout_s=30)
        seen[stats.replica] = stats
    return (
        sum(s.calls for s in seen.values()),
        sum(s.tiles for s in seen.values()),
        sum(s.merged_calls for s in seen.values()),
    )


def measured(app: ServeApp, bodies: list[bytes], clients: int, requests: int) -> dict[str, Any]:
    """:func:`drive` plus the model replicas' batching during that run."""
    calls0, tiles0, merged0 = batch_totals(app)
    row = drive(app.url, bodies, clients, requests)
    calls, tiles, merged = batch_totals(app)
    row["model_calls"] = calls - calls0
    row["tiles_per_call"] = round((tiles - tiles0) / max(1, calls - calls0), 2)
    row["merged_calls"] = merged - merged0
    return row


def median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs of one setup and load: median latency and throughput, summed batching."""
    row = dict(runs[0])
    for key in ("per_s", "p50_ms", "p95_ms"):
        row[key] = round(statistics.median(r[key] for r in runs), 2 if key == "per_s" else 1)
    row["requests"] = sum(r["requests"] for r in runs)
    row["runs"] = len(runs)
    del row["seconds"]
    if "model_calls" in runs[0]:
        calls = sum(r["model_calls"] for r in runs)
        tiles = sum(r["tiles_per_call"] * r["model_calls"] for r in runs)
        row["model_calls"] = calls
        row["tiles_per_call"] = round(tiles / max(1, calls), 2)
        row["merged_calls"] = sum(r["merged_calls"] for r in runs)
    return row


# The standalone service twice: with its defaults (1 inference worker, ONNX Runtime on all
# cores), and with one ONNX Runtime thread like each Ray model replica here, which separates
# Ray's path (proxy, handle, object store) from the thread count.
STANDALONE = {
    "standalone (defaults)": {},
    "standalone, 1 ONNX Runtime thread": {"intra_op_threads": "1"},
}


def run_small_images(
    app: ServeApp,
    bodies: list[bytes],
    replicas: list[int | None],
    loads: list[tuple[int, int]],
    rounds: int,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The standalone service (:data:`STANDALONE`) and Ray Serve with the real model, measured
    in turns (each standalone setup, then Ray, for each load, ``rounds`` times per replica
    count) so that all see the same machine. A replica count of None: ``app`` as it runs."""
    standalone: dict[tuple[str, int], list[dict[str, Any]]] = {}
    on_ray: dict[tuple[int, int], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as servers:
        models = Path(tmp) / "models"  # the one model measured (the service loads all it finds)
        models.mkdir()
        (models / MODEL).symlink_to(REPO / "models" / MODEL)
        urls = {
            name: servers.enter_context(
                live_server(
                    models,
                    Path(tmp) / str(i),
                    {"default_model": MODEL, "log_level": "WARNING", **settings},
                    uvicorn_args=("--log-level", "warning"),
                )
            ).url
            for i, (name, settings) in enumerate(STANDALONE.items())
        }
        for wanted in replicas:
            if wanted is None:
                n = app.running_replicas(f"model-{MODEL}")
            else:
                n = wanted
                config = local_config([MODEL], ingress_replicas=2, model_replicas=n, env=ENV)
                config["http_options"] = app.config["http_options"]
                app.redeploy(config)
                app.wait_replicas(f"model-{MODEL}", n)
            for url in [*urls.values(), app.url]:
                drive(url, bodies, 2, 8)  # warm
            for _ in range(rounds):
                for clients, requests in loads:
                    turn: dict[str, Any] = {"replicas": n}
                    for name, url in urls.items():
                        run = drive(url, bodies, clients, requests)
                        standalone.setdefault((name, clients), []).append(run)
                        turn[name] = run
                    turn["ray"] = measured(app, bodies, clients, requests)
                    on_ray.setdefault((n, clients), []).append(turn["ray"])
                    print(json.dumps(turn), flush=True)
    rows_alone = [{"setup": name} | median_row(runs) for (name, _), runs in standalone.items()]
    rows_ray = [
        {"setup": f"ray serve, {n} model replica(s)", "replicas": n} | median_row(runs)
        for (n, _), runs in on_ray.items()
    ]
    return rows_alone, rows_ray


def fixed_cost_app(replicas: int, max_batch_tiles: int) -> Any:
    """The application with the model call replaced by a sleep of FIXED_COST_S per call."""
    from ray import serve

    from service.rayserve.app import INGRESS, MetricsHub, ModelDeployment, SegmentIngress
    from service.segmentation.registry import find_model_files

    base: Any = ModelDeployment.func_or_class  # type: ignore[attr-defined]

    class FixedCostModel(base):
        """The real model replica (metadata, batching, queues) with a fixed-cost model call."""

        def run_model(self, tiles: np.ndarray, precision: Any) -> np.ndarray:
            time.sleep(FIXED_COST_S)
            k = self.variants[precision].meta.output_channels
            return np.repeat(np.clip(tiles[..., :1], 0.0, 1.0), k, axis=-1)

    # The config file's settings for the replicas (e.g. the ingress's worker threads), as in
    # the real-model runs.
    env = load_serve_config()["applications"][0]["runtime_env"]["env_vars"] | ENV
    options = {"ray_actor_options": {"num_cpus": 0.1, "runtime_env": {"env_vars": env}}}
    deployment: Any = serve.deployment(FixedCostModel)
    model = deployment.options(
        name=f"model-{MODEL}", num_replicas=replicas, max_ongoing_requests=64, **options
    )
    path = find_model_files(REPO / "models")[MODEL]
    handles = {MODEL: model.bind(MODEL, str(path), str(REPO / "models"), max_batch_tiles, 0.01)}
    ingress: Any = SegmentIngress
    hub: Any = MetricsHub
    return ingress.options(name=INGRESS, num_replicas=2, **options).bind(
        handles,
        {"model_dir": str(REPO / "models"), "max_batch_tiles": max_batch_tiles},
        hub.bind(),
    )


def run_fixed_cost(
    app: ServeApp, bodies: list[bytes], replicas: list[int], clients: int, requests: int
) -> list[dict[str, Any]]:
    """Throughput with the fixed-cost predictor: no batching (one tile per call) for each
    replica count, then batching (up to 16 tiles per call) on one replica."""
    rows = []
    for n, tiles in [*((n, 1) for n in replicas), (1, 16)]:
        app.run_application(fixed_cost_app(n, tiles))
        app.wait_replicas(f"model-{MODEL}", n)
        drive(app.url, bodies, 2, 4)  # warm
        row = {"setup": f"fixed cost, {n} replica(s), batch <= {tiles}", "replicas": n}
        rows.append(row | {"max_batch_tiles": tiles} | measured(app, bodies, clients, requests))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def write_doc(data: dict[str, Any], path: Path) -> None:
    """The tables of docs/scaling.md's generated block."""
    head = (
        "| setup | clients | requests | p50 ms | p95 ms | requests/s | model calls "
        "| tiles per call | calls merging requests |"
    )
    sep = "|---|---|---|---|---|---|---|---|---|"

    def row(r: dict[str, Any]) -> str:
        return (
            f"| {r['setup']} | {r['clients']} | {r['requests']} | {r['p50_ms']} | {r['p95_ms']} "
            f"| {r['per_s']} | {r.get('model_calls', '')} | {r.get('tiles_per_call', '')} "
            f"| {r.get('merged_calls', '')} |"
        )

    small = data["standalone"] + data["ray_real"]
    lines = [
        f"Run: `{data['command']}` on {data['machine']}, {data['started']}; Ray {data['ray']}. "
        f"Images: {SMALL}² uint16 TIFFs (one tile each), checked to come back as PNG masks. "
        "Standalone: `segment-service` (uvicorn) with its defaults (1 inference worker, ONNX "
        "Runtime on all cores), and the same with one ONNX Runtime thread. Ray Serve: "
        "`deploy/ray/serve.yaml` on a local Ray, 2 ingress replicas, model replicas as listed, "
        "one ONNX Runtime thread each. Clients are threads "
        "of the benchmark process, each sending its next image when the last one is answered.",
        "",
        "**1. Many small images, real model (`nuclei`): standalone vs Ray Serve.** Measured "
        f"in turns (each standalone, then Ray Serve, for each load; {data['rounds']} turns per "
        "model replica count, Ray running throughout), medians over the turns; requests and "
        "model calls are totals. The 2 cores are shared by everything here (the load "
        "generator, both services, Ray's proxy and replicas), so compare within this table.",
        "",
        head,
        sep,
        *(row(r) for r in small),
        "",
        "**2. Throughput against model replicas, real model.** From table 1 (8 clients):",
        "",
        "| model replicas | requests/s | tiles per call |",
        "|---|---|---|",
        *(
            f"| {r['replicas']} | {r['per_s']} | {r['tiles_per_call']} |"
            for r in data["ray_real"]
            if r["clients"] == max(c for c, _ in data["loads"])
        ),
        "",
        f"**3. Throughput against model replicas, fixed-cost predictor** (each model call "
        f"sleeps {FIXED_COST_S} s whatever its size; {data['fixed_clients']} clients). This is "
        "the engine's scaling, not the model's: the replicas need no core to sleep.",
        "",
        head,
        sep,
        *(row(r) for r in data["fixed_cost"]),
    ]
    replace_generated(path, "bench.scaling", lines, "Scaling: Ray Serve")


def measure(
    app: ServeApp, *, requests: int = 96, rounds: int = 3, quick: bool = False
) -> dict[str, Any]:
    """Every case on ``app`` (a running Serve application of the real model; its fixed-cost
    applications replace it). ``quick``: a few requests of each case, one turn, the real model
    measured on ``app`` as it runs (no redeploy: tests/test_rayserve.py runs it on the tests'
    application) and one deployment of each fixed-cost kind."""
    import ray

    bodies = small_images(32)
    if quick:
        requests, rounds = 8, 1
    loads = [(1, max(8, requests // 4)), (8, requests)]
    fixed_clients = 4 if quick else 16
    real_replicas: list[int | None] = [None] if quick else [1, 2]
    fixed_replicas = [1] if quick else [1, 2, 4]
    data: dict[str, Any] = {
        "command": "python -m bench.scaling" + (" --quick" if quick else ""),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "ray": ray.__version__,
        "loads": loads,
        "fixed_clients": fixed_clients,
        "rounds": rounds,
    }
    data["standalone"], data["ray_real"] = run_small_images(
        app, bodies, real_replicas, loads, rounds
    )
    data["fixed_cost"] = run_fixed_cost(
        app, bodies, fixed_replicas, fixed_clients, 8 if quick else 80
    )
    return data


def write(data: dict[str, Any], doc: Path) -> None:
    """The generated block of ``doc`` and the JSON beside it."""
    write_doc(data, doc)
    doc.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.scaling``."""
    parser = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__)
    parser.add_argument("--requests", type=int, default=96, help="per run at 8 clients")
    parser.add_argument("--rounds", type=int, default=3, help="turns per replica count")
    parser.add_argument("--quick", action="store_true", help="a few requests of each case")
    parser.add_argument("--doc", default="docs/scaling.md")
    args = parser.parse_args(argv)
    config = local_config([MODEL], ingress_replicas=2, model_replicas=1, env=ENV)
    with local_serve(config, num_cpus=8) as app:
        data = measure(app, requests=args.requests, rounds=args.rounds, quick=args.quick)
    data["command"] = " ".join(
        ["python -m bench.scaling", *(sys.argv[1:] if argv is None else argv)]
    )
    write(data, Path(args.doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
