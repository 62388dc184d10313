"""The ASGI middlewares, outermost first: request IDs, CORS, the upload limit, early overload.

Each works before the route is reached: a request ID for every log line, a 413 before an
oversized body is read, and a 503 before a saturated service reads an upload it will not use.
"""

from __future__ import annotations

import logging
import re
import uuid

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import error_response
from service.api.routes.jobs import JOBS_PATH
from service.api.routes.preview import PREVIEW_PATH
from service.api.routes.segment import SEGMENT_PATH
from service.core.config import Settings
from service.core.errors import ApiError, ErrorCode
from service.core.gate import InferenceGate
from service.core.logs import request_id_var, start_request

log = logging.getLogger("service")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestIdMiddleware:
    """Gives every request an ID (the client's ``X-Request-ID`` if sane), puts it on every log
    line and on the response, and starts the record of fields its access line reports."""

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
        start_request()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


class EarlyOverloadMiddleware:
    """Refuses ``POST /segment``, ``/jobs`` and ``/preview`` with 503 before the upload is read
    when no place is free, so a saturated service answers in milliseconds instead of receiving
    gigabytes it will not use."""

    def __init__(self, app: ASGIApp, gate: InferenceGate, retry_after: int) -> None:
        self.app = app
        self.gate = gate
        self.retry_after = retry_after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"].rstrip("/") in (SEGMENT_PATH, JOBS_PATH, PREVIEW_PATH)
            and self.gate.saturated
        ):
            app_state = scope.get("app").state  # type: ignore[union-attr]
            app_state.metrics.rejected.inc()
            rid = scope.get("state", {}).get("request_id", "-")
            err = ApiError(
                503, ErrorCode.OVERLOADED, f"the service is busy; retry in {self.retry_after} s"
            )
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
            err = ApiError(413, ErrorCode.TOO_LARGE, _upload_too_large(self.limit))
            response = error_response(Request(scope, receive), err)
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:  # answered by api.errors' HTTPException handler
                    raise StarletteHTTPException(413, _upload_too_large(self.limit))
            return message

        await self.app(scope, limited_receive, send)


def add_middlewares(app: FastAPI, settings: Settings, gate: InferenceGate) -> None:
    """Install the middlewares; the last added runs first, so request IDs wrap everything."""
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
