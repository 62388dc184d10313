"""Builds the FastAPI app; nothing else happens at import (models load in the lifespan)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from prometheus_client import CollectorRegistry
from prometheus_fastapi_instrumentator import Instrumentator

from service.api.middleware import add_middlewares
from service.api.problems import register_exception_handlers
from service.api.routes import health, jobs, models, page, preview, prometheus, segment
from service.api.serverkit import mount_serverkit
from service.core.config import Settings, settings_from_env
from service.core.gate import InferenceGate
from service.core.logs import configure_logging
from service.core.resources import MemoryBudget, memory_budget_from, mib, rss_bytes
from service.core.telemetry import INFERENCE_BUCKETS, ServiceMetrics
from service.segmentation.jobs import JobStore
from service.segmentation.memory import smallest_request_memory
from service.segmentation.registry import ModelRegistry, load_local_models
from service.segmentation.runner import Runner

log = logging.getLogger("service")

DOCS_ASSETS_PATH = "/docs-assets"


async def purge_jobs(store: JobStore) -> None:
    """Free expired job results every few seconds (at most a tenth of their TTL late)."""
    period = min(60.0, max(0.5, store.ttl_seconds / 10))
    while True:
        await asyncio.sleep(period)
        store.purge()


ModelLoader = Callable[[ModelRegistry, Settings], None]


def create_app(
    settings: Settings | None = None, *, load_models: ModelLoader = load_local_models
) -> FastAPI:
    """The service, configured by ``settings`` (default: from ``SEG_*`` environment variables).

    ``load_models`` fills the registry (in a thread beside the server, so ``/healthz`` answers
    at once) and sets its ``ready`` event: by default ONNX Runtime sessions in this process;
    the Ray Serve ingress passes one that reaches its model deployments instead. Everything
    else (routes, errors, metrics, admission) is the same app either way.
    """
    settings = settings or settings_from_env()
    # Before the server logs anything of its own: in JSON mode uvicorn's lines are JSON too.
    configure_logging(settings.log_level, settings.log_format)
    service_metrics = ServiceMetrics(CollectorRegistry())
    gate = InferenceGate(settings.inference_workers, settings.max_queue)
    gate.on_change = lambda admitted: service_metrics.record_admitted(admitted, gate.workers)

    budget_total, budget_source = memory_budget_from(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        models_registry: ModelRegistry = app.state.registry

        def load() -> None:
            try:
                load_models(models_registry, settings)
            except Exception as exc:  # never leave /readyz saying "loading" for ever
                log.exception("loading the models failed")
                models_registry.failed["*"] = f"loading failed: {type(exc).__name__}: {exc}"
                models_registry.ready.set()
            if budget_total is not None and settings.memory_admission:
                budget = start_memory_budget(models_registry, budget_total, budget_source, settings)
                service_metrics.record_memory_budget(budget)
                app.state.memory_budget = budget
                models_registry.on_demand_growth = partial(held_more, budget, service_metrics)
            service_metrics.record_models(
                ((m.name, m.meta.version, m.provider) for m in models_registry.models.values()),
                all_loaded=not models_registry.failed,
            )
            log.info(
                "ready: %s; failed: %s",
                sorted(models_registry.models),
                models_registry.failed or "none",
            )

        # Loading (and the CUDA warm-up) runs beside the server: /healthz answers at once and
        # /readyz says 503 until every model is warm.
        loader = threading.Thread(target=load, name="model-loader", daemon=True)
        loader.start()
        # Expired job results are freed on time, not only at the next /jobs request.
        purger = asyncio.create_task(purge_jobs(app.state.jobs))
        try:
            yield
        finally:
            purger.cancel()
            app.state.jobs.cancel_all()  # background jobs stop at their next tile batch
            gate.shutdown()
            loader.join(timeout=5)

    # /docs and /redoc with Swagger UI's and ReDoc's files served by the service itself (from
    # the fastapi-offline package), not a CDN: lab networks are often cut off from the internet.
    app = FastAPIOffline(
        title="U-Net segmentation service",
        version="0.1.0",
        description="POST an image, get a PNG mask (and per-class IoU/Dice with a ground truth).",
        lifespan=lifespan,
        static_url=DOCS_ASSETS_PATH,
        # No badge from validator.swagger.io: the page must not reach out anywhere.
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.state.settings = settings
    app.state.registry = ModelRegistry()
    app.state.metrics = service_metrics
    app.state.gate = gate
    app.state.runner = Runner(
        gate, service_metrics, lambda: app.state.memory_budget, settings.retry_after_seconds
    )
    app.state.memory_budget = None  # set once the models are loaded, when a budget is known
    app.state.jobs = jobs_store = JobStore(
        settings.max_jobs, settings.max_job_result_bytes, settings.job_ttl_seconds
    )
    service_metrics.watch_jobs(lambda: len(jobs_store), lambda: jobs_store.held_bytes)

    for router in (
        page.router,
        health.router,
        models.router,
        segment.router,
        jobs.router,
        preview.router,
        prometheus.router,
    ):
        app.include_router(router)
    mount_serverkit(app, settings)  # napari and QuPath, when the serverkit extra is installed
    register_exception_handlers(app)
    Instrumentator(registry=service_metrics.registry, excluded_handlers=["/metrics"]).instrument(
        app, latency_highr_buckets=INFERENCE_BUCKETS, latency_lowr_buckets=(0.1, 1.0, 10.0, 60.0)
    )
    add_middlewares(app, settings, gate)
    return app


def held_more(budget: MemoryBudget, service_metrics: ServiceMetrics, nbytes: int) -> None:
    """A file loaded on its first request left the process ``nbytes`` larger: that much less
    for requests from now on."""
    budget.hold(nbytes)
    service_metrics.record_memory_budget(budget)


def start_memory_budget(
    registry: ModelRegistry, total: int, source: str, settings: Settings
) -> MemoryBudget:
    """The budget requests are admitted against, from what the process holds with its models
    loaded; an ERROR when it leaves too little for even the smallest request of a model."""
    budget = MemoryBudget(total, rss_bytes() or 0, settings.inference_workers, source)
    log.info(
        "memory budget %s (%s): the loaded models hold %s, %s left for requests",
        mib(total),
        source,
        mib(budget.baseline),
        mib(budget.capacity),
    )
    for model in registry.models.values():
        smallest = smallest_request_memory(
            model.meta, settings.tile_batch_size, model.request_bytes
        )
        if smallest > budget.capacity:
            log.error(
                "model %s cannot serve any request: even a one-tile image needs about %s and "
                "the memory budget leaves %s; raise the memory limit or remove models",
                model.name,
                mib(smallest),
                mib(budget.capacity),
            )
    return budget


def run() -> None:
    """``segment-service``: serve on ``SEG_HOST``:``SEG_PORT`` (default 0.0.0.0:8000)."""
    import signal
    import sys

    import uvicorn

    from service.api.server import ServiceH11Protocol

    # uvicorn re-raises the SIGTERM it handled once its graceful shutdown is over; by default
    # that kills the process (exit 143 under an init such as compose's `init: true`). A SIGTERM
    # is an orderly stop: exit 0 instead.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    settings = settings_from_env()
    uvicorn.run(
        "service.main:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        # The same loop and HTTP parser whatever is installed: uvicorn[standard] (which the
        # serverkit extra pulls in) would otherwise switch to uvloop and httptools. The parser
        # is uvicorn's h11 with a request-head timeout and JSON 400s (service/api/server.py).
        loop="asyncio",
        http=ServiceH11Protocol,
        timeout_graceful_shutdown=60,
    )
