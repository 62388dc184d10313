"""Builds the FastAPI app; nothing else happens at import (models load in the lifespan)."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from prometheus_client import CollectorRegistry
from prometheus_fastapi_instrumentator import Instrumentator

from service.api.errors import register_exception_handlers
from service.api.middleware import add_middlewares
from service.api.routes import health, metrics, models, segment
from service.core.config import Settings, settings_from_env
from service.core.gate import InferenceGate
from service.core.logs import configure_logging
from service.core.metrics import INFERENCE_BUCKETS, ServiceMetrics
from service.registry import ModelRegistry, load_local_models

log = logging.getLogger("service")

DOCS_ASSETS_PATH = "/docs-assets"


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
            service_metrics.record_models(models_registry)
            log.info(
                "ready: %s; failed: %s",
                sorted(models_registry.models),
                models_registry.failed or "none",
            )

        # Loading (and the CUDA warm-up) runs beside the server: /healthz answers at once and
        # /readyz says 503 until every model is warm.
        loader = threading.Thread(target=load, name="model-loader", daemon=True)
        loader.start()
        try:
            yield
        finally:
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

    for router in (health.router, models.router, segment.router, metrics.router):
        app.include_router(router)
    register_exception_handlers(app)
    Instrumentator(registry=service_metrics.registry, excluded_handlers=["/metrics"]).instrument(
        app, latency_highr_buckets=INFERENCE_BUCKETS, latency_lowr_buckets=(0.1, 1.0, 10.0, 60.0)
    )
    add_middlewares(app, settings, gate)
    return app


def run() -> None:
    """``segment-service``: serve on ``SEG_HOST``:``SEG_PORT`` (default 0.0.0.0:8000)."""
    import signal
    import sys

    import uvicorn

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
        timeout_graceful_shutdown=60,
    )
