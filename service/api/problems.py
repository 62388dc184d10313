"""Every failure as one JSON error body (a "problem": status, :class:`ErrorCode`, a message a
lab user can act on, and the request ID); no stack traces and no file paths ever reach a client.

The domain's errors (:mod:`service.segmentation.errors`) are mapped to HTTP here and only here;
so are FastAPI's validation errors, Starlette's HTTP errors and anything unexpected (a 500 that
says nothing about the server but the request ID to quote). :class:`ErrorCode` is the one list
of codes: the responses carry them and ``segment_errors_total`` counts by them.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.paths import SEGMENT_PATH
from service.core.codes import ErrorCode
from service.core.logs import request_id_var
from service.core.telemetry import ServiceMetrics
from service.segmentation.errors import (
    ImageTooLargeError,
    InvalidGroundTruthError,
    InvalidImageError,
    InvalidParameterError,
    ModelUnavailableError,
    SegmentationCancelledError,
    SegmentationInputError,
    ServiceBusyError,
    UnsupportedFormatError,
)

log = logging.getLogger("service")


class ErrorBody(BaseModel):
    """Every error answer (4xx and 5xx)."""

    detail: str = Field(description="What went wrong, in plain language, and what to do")
    code: ErrorCode = Field(description="Stable machine-readable reason, e.g. invalid_image")
    request_id: str = Field(description="Also in the X-Request-ID header and the service log")


def error_responses(described: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for error statuses, all with the :class:`ErrorBody` model."""
    return {status: {"model": ErrorBody, "description": text} for status, text in described.items()}


class ApiError(Exception):
    """An error answered with ``status`` and a message meant for the person who sent the request."""

    def __init__(
        self, status: int, code: ErrorCode, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self, request_id: str) -> dict[str, Any]:
        """JSON body of the error response."""
        return {"detail": self.message, "code": self.code.value, "request_id": request_id}


# Starlette's own errors (routing, multipart framing, the upload limit) by status.
_STARLETTE_CODES = {
    400: ErrorCode.BAD_REQUEST,
    401: ErrorCode.UNAUTHORIZED,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
}

# What each domain refusal is answered with; the first class that matches wins.
DOMAIN_ERRORS: dict[type[SegmentationInputError], tuple[int, ErrorCode]] = {
    UnsupportedFormatError: (415, ErrorCode.UNSUPPORTED_MEDIA_TYPE),
    ImageTooLargeError: (413, ErrorCode.TOO_LARGE),
    InvalidImageError: (422, ErrorCode.INVALID_IMAGE),
    InvalidGroundTruthError: (422, ErrorCode.INVALID_GROUND_TRUTH),
    InvalidParameterError: (422, ErrorCode.INVALID_PARAMETER),
    SegmentationInputError: (422, ErrorCode.INVALID_PARAMETER),
}


def api_error(exc: Exception, retry_after: int) -> ApiError:
    """The HTTP answer to what the domain raised (``retry_after``: the service's default
    seconds for a 503): a refusal of the input, a busy service, a model being replaced, a
    cancelled request; anything else is a 500 that says nothing but what to quote."""
    if isinstance(exc, SegmentationInputError):
        status, code = next(v for cls, v in DOMAIN_ERRORS.items() if isinstance(exc, cls))
        return ApiError(status, code, exc.message)
    if isinstance(exc, ServiceBusyError):
        after = str(exc.retry_after or retry_after)
        return ApiError(503, ErrorCode.OVERLOADED, exc.message, {"Retry-After": after})
    if isinstance(exc, ModelUnavailableError):
        if exc.lasting:  # its file does not load: retrying will not help
            message = f"{exc.message}; its file must be replaced (the service's log says why)"
            return ApiError(503, ErrorCode.MODEL_UNAVAILABLE, message)
        # the model's queue is full (a rejection, like the gate's) or its process is replaced
        code = ErrorCode.OVERLOADED if exc.busy else ErrorCode.MODEL_UNAVAILABLE
        message = f"{exc.message}; retry in {retry_after} s"
        return ApiError(503, code, message, {"Retry-After": str(retry_after)})
    if isinstance(exc, SegmentationCancelledError):
        # nginx's "client closed request": nobody reads it, but the access log says why
        return ApiError(499, ErrorCode.CLIENT_CLOSED, "the client went away; the work stopped")
    return ApiError(500, ErrorCode.INTERNAL, "internal error; quote the request ID")


def error_response(request: Request, err: ApiError) -> JSONResponse:
    """Log the error, count it (a refusal to queue as a rejection, else by code when it answers
    ``/segment``), and build its JSON response."""
    rid = getattr(request.state, "request_id", "-")
    if err.status >= 500 and err.code is not ErrorCode.OVERLOADED:
        log.warning("%s %s -> %d %s", request.method, request.url.path, err.status, err.message)
    else:
        log.info("%s %s -> %d %s", request.method, request.url.path, err.status, err.message)
    metrics: ServiceMetrics | None = getattr(request.app.state, "metrics", None)
    if metrics is not None and err.code is ErrorCode.OVERLOADED:
        metrics.rejected.inc()
    elif metrics is not None and request.url.path.rstrip("/") == SEGMENT_PATH:
        metrics.record_error(err.code)
    return JSONResponse(err.body(rid), status_code=err.status, headers=err.headers)


def describe_validation(exc: RequestValidationError) -> tuple[str, ErrorCode]:
    """A one-line message naming the field, and the error code."""
    parts = []
    for e in exc.errors():
        loc = [str(x) for x in e.get("loc", ()) if x not in ("body", "query")]
        field = ".".join(loc) or "request"
        if e.get("type") == "missing" and field == "image":
            return (
                "no image uploaded: send it as the multipart form field 'image', e.g. "
                "curl -F image=@cells.tif http://localhost:8000/segment -o mask.png"
            ), ErrorCode.INVALID_IMAGE
        parts.append(f"{field}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request", ErrorCode.INVALID_PARAMETER


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(request, exc)


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    retry_after = request.app.state.settings.retry_after_seconds
    return error_response(request, api_error(exc, retry_after))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, code = describe_validation(exc)
    return error_response(request, ApiError(422, code, message))


def _out_of_space(exc: BaseException) -> bool:
    """Whether ``exc`` was caused, somewhere down its chain, by a full disk (ENOSPC)."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and _out_of_space(exc):
        # FastAPI reports any failure while parsing the form as 400 "There was an error parsing
        # the body": when it was the spool folder filling up, it is the service's problem.
        settings = request.app.state.settings
        log.error(
            "%s %s: the spool folder (TMPDIR) ran out of space while receiving the upload; "
            "answered 503. Give it more space, or set SEG_SPOOL_BUDGET below its size",
            request.method,
            request.url.path,
        )
        return error_response(
            request,
            ApiError(
                503,
                ErrorCode.SPOOL_FULL,
                "the service ran out of space to receive the upload; retry in "
                f"{settings.retry_after_seconds} s",
                {"Retry-After": str(settings.retry_after_seconds)},
            ),
        )
    code = getattr(exc, "code", None) or _STARLETTE_CODES.get(
        exc.status_code, ErrorCode.BAD_REQUEST
    )
    return error_response(
        request, ApiError(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Starlette answers these outside the middleware stack, after RequestIdMiddleware is
    # done: put the request ID back on the log lines and on the response here.
    rid = getattr(request.state, "request_id", "-")
    token = request_id_var.set(rid)
    try:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        response = error_response(
            request, ApiError(500, ErrorCode.INTERNAL, "internal error; quote the request ID")
        )
    finally:
        request_id_var.reset(token)
    response.headers["X-Request-ID"] = rid
    return response


def register_exception_handlers(app: FastAPI) -> None:
    """Answer every kind of failure with the service's error body."""
    app.add_exception_handler(ApiError, _api_error)
    for domain in (
        SegmentationInputError,
        ServiceBusyError,
        ModelUnavailableError,
        SegmentationCancelledError,
    ):
        app.add_exception_handler(domain, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
