"""The ASGI middlewares, outermost first: request IDs, CORS, the upload guard, early overload.

Each works before the route is reached: a request ID for every log line; a 413, 503 or 408
before or while an upload streams in that is too large, has no room, or arrives too slowly; and
a 503 before a saturated service reads an upload it will not use.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.paths import JOBS_PATH, PREVIEW_PATH, SEGMENT_PATH
from service.api.problems import ApiError, ErrorCode, error_response
from service.core.config import Settings
from service.core.gate import InferenceGate
from service.core.logs import request_id_var, start_request
from service.core.resources import (
    BudgetBusyError,
    OverBudgetError,
    SpoolBudget,
    mib,
    spool_directory,
)

log = logging.getLogger("service")


class HttpMiddleware:
    """An ASGI middleware for HTTP requests (:meth:`handle`); anything else, the lifespan,
    passes straight through."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.handle(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer, or pass on to ``self.app``, one HTTP request."""
        await self.app(scope, receive, send)


_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestIdMiddleware(HttpMiddleware):
    """Gives every request an ID (the client's ``X-Request-ID`` if sane), puts it on every log
    line and on the response, and starts the record of fields its access line reports."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
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


class EarlyOverloadMiddleware(HttpMiddleware):
    """Refuses the uploads that run a model (``POST /segment``, ``/jobs``, ``/preview`` and
    Server Kit's ``{prefix}/{model}/process``) with 503 before they are read when no place is
    free, so a saturated service answers in milliseconds instead of receiving gigabytes it
    will not use."""

    def __init__(
        self, app: ASGIApp, gate: InferenceGate, retry_after: int, serverkit_prefix: str = ""
    ) -> None:
        super().__init__(app)
        self.gate = gate
        self.retry_after = retry_after
        self.serverkit_prefix = serverkit_prefix

    def runs_a_model(self, path: str) -> bool:
        """Whether a POST to ``path`` is work for the gate."""
        path = path.rstrip("/")
        if path in (SEGMENT_PATH, JOBS_PATH, PREVIEW_PATH):
            return True
        prefix = self.serverkit_prefix
        return bool(prefix) and path.startswith(f"{prefix}/") and path.endswith("/process")

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "POST" and self.gate.saturated and self.runs_a_model(scope["path"]):
            err = ApiError(
                503,
                ErrorCode.OVERLOADED,
                f"the service is busy; retry in {self.retry_after} s",
                headers={"Retry-After": str(self.retry_after)},
            )
            await error_response(Request(scope, receive), err)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _upload_too_large(limit: int) -> str:
    """The 413 message for an upload over ``limit`` bytes."""
    return (
        f"the upload is larger than this service accepts ({limit:,} bytes, setting "
        "SEG_MAX_UPLOAD_BYTES)"
    )


class UploadRefused(StarletteHTTPException):
    """A refusal raised from inside ``receive`` while the body streams in. FastAPI passes
    HTTP exceptions through its form parsing (anything else becomes a 400), and
    :mod:`service.api.problems` answers it with ``code``."""

    def __init__(
        self, status: int, code: ErrorCode, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(status, detail, headers)
        self.code = code


@dataclass(frozen=True)
class UploadPolicy:
    """What an upload may take: bytes, spool space, time, and places among those in progress."""

    max_bytes: int
    max_uploads: int
    timeout_s: float
    min_rate: float  # bytes per second, averaged, once grace_s has passed
    grace_s: float
    retry_after: int

    @classmethod
    def from_settings(cls, settings: Settings) -> UploadPolicy:
        """The policy the ``SEG_*`` settings describe."""
        return cls(
            max_bytes=settings.max_upload_bytes,
            max_uploads=settings.max_uploads,
            timeout_s=settings.upload_timeout_s,
            min_rate=float(settings.min_upload_rate),
            grace_s=settings.upload_grace_s,
            retry_after=settings.retry_after_seconds,
        )

    def deadline(self, start: float, received: int) -> float:
        """When an upload that began at ``start`` and has ``received`` bytes is too slow:
        after the grace period it must keep an average of ``min_rate``, and it may never take
        longer than ``timeout_s``."""
        allowed = self.grace_s + (received / self.min_rate if self.min_rate > 0 else float("inf"))
        return start + min(allowed, self.timeout_s)

    def too_slow(self, received: int, elapsed: float) -> str:
        """The 408 message."""
        return (
            f"the upload arrived too slowly: {received:,} bytes in {elapsed:.0f} s; this service "
            f"needs at least {self.min_rate:,.0f} bytes/s after the first {self.grace_s:g} s "
            f"(SEG_MIN_UPLOAD_RATE) and at most {self.timeout_s:g} s per upload "
            "(SEG_UPLOAD_TIMEOUT_S)"
        )


def _has_body(headers: dict[bytes, bytes]) -> tuple[bool, int | None]:
    """(whether the request has a body, its declared length if any)."""
    declared = headers.get(b"content-length", b"")
    if declared.isdigit():
        return int(declared) > 0, int(declared)
    return b"chunked" in headers.get(b"transfer-encoding", b"").lower(), None


class UploadGuardMiddleware(HttpMiddleware):
    """Bounds every request body before and while it streams in, so that uploads are budgets
    the service admits against rather than surprises:

    - 413 when it is over ``SEG_MAX_UPLOAD_BYTES``: at once when ``Content-Length`` says so,
      otherwise as soon as the streamed body passes the limit;
    - 503 + ``Retry-After`` when ``SEG_MAX_UPLOADS`` uploads are already arriving;
    - spool space reserved before the body is read (``Content-Length``, or what a chunked
      body has brought): an upload that can never fit gets 413, one that does not fit now 503
      + ``Retry-After``, logged at ERROR; the spool filling up is never a parse error;
    - 408 when it arrives slower than ``SEG_MIN_UPLOAD_RATE`` (after ``SEG_UPLOAD_GRACE_S``)
      or takes longer than ``SEG_UPLOAD_TIMEOUT_S``; the connection is closed.

    (Starlette's own body limit answers a plain-text 413 in place of any response to a request
    whose ``Content-Length`` is over the limit, so the service does not use it.)
    """

    def __init__(self, app: ASGIApp, policy: UploadPolicy, spool: SpoolBudget) -> None:
        super().__init__(app)
        self.policy = policy
        self.spool = spool
        self.arriving = 0  # uploads whose bodies are still coming in

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, err: ApiError) -> None:
        response = error_response(Request(scope, receive), err)
        await response(scope, receive, send)

    def _spool_error(self, exc: Exception) -> ApiError:
        where = (
            "SEG_SPOOL_BUDGET"
            if self.spool.total is not None
            else f"the free space of {self.spool.directory}"
        )
        if isinstance(exc, OverBudgetError):
            return ApiError(
                413,
                ErrorCode.TOO_LARGE,
                f"the upload ({mib(exc.needed)}) is larger than the space this service has to "
                f"receive uploads ({mib(exc.capacity)}, {where})",
            )
        assert isinstance(exc, BudgetBusyError)
        log.error(
            "spool space exhausted: an upload of %s does not fit (%s free in %s); refused "
            "with 503. Give the spool folder (TMPDIR) more space or set SEG_MAX_UPLOADS lower",
            mib(exc.needed),
            mib(exc.free),
            where,
        )
        return ApiError(
            503,
            ErrorCode.SPOOL_FULL,
            f"the service has no room to receive this upload now ({mib(exc.needed)} needed, "
            f"{mib(exc.free)} free); retry in {self.policy.retry_after} s",
            headers={"Retry-After": str(self.policy.retry_after)},
        )

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        has_body, declared = _has_body(dict(scope["headers"]))
        if not has_body:
            await self.app(scope, receive, send)
            return
        policy = self.policy
        if declared is not None and declared > policy.max_bytes:
            err = ApiError(413, ErrorCode.TOO_LARGE, _upload_too_large(policy.max_bytes))
            await self._refuse(scope, receive, send, err)
            return
        if self.arriving >= policy.max_uploads:
            err = ApiError(
                503,
                ErrorCode.OVERLOADED,
                f"{self.arriving} uploads are arriving already (SEG_MAX_UPLOADS); retry in "
                f"{policy.retry_after} s",
                headers={"Retry-After": str(policy.retry_after)},
            )
            await self._refuse(scope, receive, send, err)
            return
        try:
            reservation = self.spool.admit(declared or 0)
        except (OverBudgetError, BudgetBusyError) as exc:
            await self._refuse(scope, receive, send, self._spool_error(exc))
            return

        loop = asyncio.get_running_loop()
        start = loop.time()
        received = 0
        arriving = True
        self.arriving += 1

        def arrived() -> None:
            nonlocal arriving
            if arriving:
                arriving = False
                self.arriving -= 1

        async def guarded_receive() -> Message:
            nonlocal received
            if not arriving:  # the body is in: what follows is a wait for the disconnect
                return await receive()
            timeout = policy.deadline(start, received) - loop.time()
            try:
                message = await asyncio.wait_for(receive(), max(timeout, 0.0))
            except TimeoutError:
                arrived()
                raise UploadRefused(
                    408,
                    ErrorCode.UPLOAD_TIMEOUT,
                    policy.too_slow(received, loop.time() - start),
                    headers={"Connection": "close"},
                ) from None
            if message["type"] != "http.request":
                arrived()
                return message
            received += len(message.get("body", b""))
            if not message.get("more_body", False):
                arrived()
            if received > policy.max_bytes:
                raise UploadRefused(413, ErrorCode.TOO_LARGE, _upload_too_large(policy.max_bytes))
            try:
                self.spool.track(reservation, received)
            except (OverBudgetError, BudgetBusyError) as exc:
                err = self._spool_error(exc)
                raise UploadRefused(err.status, err.code, err.message, err.headers) from None
            return message

        try:
            await self.app(scope, guarded_receive, send)
        finally:
            arrived()
            reservation.release()


def add_middlewares(app: FastAPI, settings: Settings, gate: InferenceGate) -> None:
    """Install the middlewares; the last added runs first, so request IDs wrap everything."""
    app.add_middleware(
        EarlyOverloadMiddleware,
        gate=gate,
        retry_after=settings.retry_after_seconds,
        serverkit_prefix=settings.serverkit_prefix,
    )
    app.add_middleware(
        UploadGuardMiddleware,
        policy=UploadPolicy.from_settings(settings),
        spool=SpoolBudget(
            spool_directory(),
            None if settings.spool_budget is None else int(settings.spool_budget),
        ),
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
        )
    app.add_middleware(RequestIdMiddleware)
