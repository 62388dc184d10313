"""Builds the FastAPI app; nothing else happens at import (models load in the lifespan)."""

from __future__ import annotations

import logging
import re
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_fastapi_instrumentator import Instrumentator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.deps import require_api_key
from service.api.routes import health, models, segment
from service.core.config import Settings, get_settings
from service.core.errors import ApiError
from service.core.gate import InferenceGate
from service.core.logs import configure_logging, request_id_var
from service.core.metrics import ERROR_REASONS, INFERENCE_BUCKETS, ServiceMetrics
from service.registry import ModelRegistry, load_registry

log = logging.getLogger("service")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
}


class RequestIdMiddleware:
    """Gives every request an ID (the client's ``X-Request-ID`` if sane), puts it on every log
    line and on the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _REQUEST_ID_RE.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        token = request_id_var.set(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


class EarlyOverloadMiddleware:
    """Refuses ``POST /segment`` with 503 before its upload is read when no place is free, so a
    saturated service answers in milliseconds instead of receiving gigabytes it will not use."""

    def __init__(self, app: ASGIApp, gate: InferenceGate, retry_after: int) -> None:
        self.app = app
        self.gate = gate
        self.retry_after = retry_after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"].rstrip("/") == "/segment"
            and self.gate.saturated
        ):
            app_state = scope.get("app").state  # type: ignore[union-attr]
            app_state.metrics.rejected.inc()
            rid = scope.get("state", {}).get("request_id", "-")
            err = ApiError(503, "overloaded", f"the service is busy; retry in {self.retry_after} s")
            log.info("POST %s -> 503 %s", scope["path"], err.message)
            response = JSONResponse(
                err.body(rid), status_code=503, headers={"Retry-After": str(self.retry_after)}
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _upload_too_large(limit: int) -> str:
    """The 413 message for an upload over ``limit`` bytes."""
    return (
        f"the upload is larger than this service accepts ({limit:,} bytes, setting "
        "SEG_MAX_UPLOAD_BYTES)"
    )


class UploadLimitMiddleware:
    """413 for a request body over ``limit`` bytes, with the service's JSON error body: at once
    when ``Content-Length`` declares it, otherwise as soon as the streamed body passes the limit.

    (Starlette's own body limit answers a plain-text 413 in place of any response to a request
    whose ``Content-Length`` is over the limit, so the service does not use it.)
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            err = ApiError(413, "too_large", _upload_too_large(self.limit))
            response = _error_response(Request(scope, receive), err)
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:  # answered by create_app's HTTPException handler
                    raise StarletteHTTPException(413, _upload_too_large(self.limit))
            return message

        await self.app(scope, limited_receive, send)


def _error_response(request: Request, err: ApiError) -> JSONResponse:
    rid = getattr(request.state, "request_id", "-")
    if err.status >= 500 and err.code != "overloaded":
        log.warning("%s %s -> %d %s", request.method, request.url.path, err.status, err.message)
    else:
        log.info("%s %s -> %d %s", request.method, request.url.path, err.status, err.message)
    metrics: ServiceMetrics | None = getattr(request.app.state, "metrics", None)
    if metrics is not None and request.url.path.rstrip("/") == "/segment":
        reason = err.code if err.code in ERROR_REASONS else None
        if reason:
            metrics.errors.labels(reason).inc()
    return JSONResponse(err.body(rid), status_code=err.status, headers=err.headers)


def _describe_validation(exc: RequestValidationError) -> tuple[str, str]:
    """A one-line message naming the field, and the error code."""
    parts = []
    for e in exc.errors():
        loc = [str(x) for x in e.get("loc", ()) if x not in ("body", "query")]
        field = ".".join(loc) or "request"
        if e.get("type") == "missing" and field == "image":
            return (
                "no image uploaded: send it as the multipart form field 'image', e.g. "
                "curl -F image=@cells.tif http://localhost:8000/segment -o mask.png"
            ), "invalid_image"
        parts.append(f"{field}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request", "invalid_parameter"


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service, configured by ``settings`` (default: from ``SEG_*`` environment variables)."""
    settings = settings or get_settings()
    registry = CollectorRegistry()
    metrics = ServiceMetrics(registry)
    gate = InferenceGate(settings.inference_workers, settings.max_queue)
    gate.on_change = metrics.in_flight.set

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_level)
        models_registry: ModelRegistry = app.state.registry

        def load() -> None:
            load_registry(
                models_registry,
                settings.model_dir,
                settings.providers,
                settings.intra_op_threads,
                settings.tile_batch_size,
            )
            for m in models_registry.models.values():
                metrics.model_info.labels(m.name, m.meta.version, m.provider).set(1)
            metrics.models_ready.set(0 if models_registry.failed else 1)
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

    app = FastAPI(
        title="U-Net segmentation service",
        version="0.1.0",
        description="POST an image, get a PNG mask (and per-class IoU/Dice with a ground truth).",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.registry = ModelRegistry()
    app.state.metrics = metrics
    app.state.gate = gate

    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(segment.router)

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics(request: Request) -> Response:
        if settings.metrics_require_key:
            require_api_key(request)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, code = _describe_validation(exc)
        return _error_response(request, ApiError(422, code, message))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "bad_request")
        return _error_response(
            request, ApiError(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette answers these outside the middleware stack, after RequestIdMiddleware is
        # done: put the request ID back on the log lines and on the response here.
        rid = getattr(request.state, "request_id", "-")
        token = request_id_var.set(rid)
        try:
            log.exception("unexpected error on %s %s", request.method, request.url.path)
            response = _error_response(
                request, ApiError(500, "internal", "internal error; quote the request ID")
            )
        finally:
            request_id_var.reset(token)
        response.headers["X-Request-ID"] = rid
        return response

    Instrumentator(registry=registry, excluded_handlers=["/metrics"]).instrument(
        app, latency_highr_buckets=INFERENCE_BUCKETS, latency_lowr_buckets=(0.1, 1.0, 10.0, 60.0)
    )
    app.add_middleware(EarlyOverloadMiddleware, gate=gate, retry_after=settings.retry_after_seconds)
    app.add_middleware(UploadLimitMiddleware, limit=settings.max_upload_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
        )
    app.add_middleware(RequestIdMiddleware)
    return app


def run() -> None:
    """``segment-service``: serve on 0.0.0.0:8000 (``SEG_HOST``/``SEG_PORT`` to change)."""
    import os
    import signal
    import sys

    import uvicorn

    # uvicorn re-raises the SIGTERM it handled once its graceful shutdown is over; by default
    # that kills the process (exit 143 under an init such as compose's `init: true`). A SIGTERM
    # is an orderly stop: exit 0 instead.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(
        "service.main:create_app",
        factory=True,
        host=os.environ.get("SEG_HOST", "0.0.0.0"),
        port=int(os.environ.get("SEG_PORT", "8000")),
        timeout_graceful_shutdown=60,
    )
