"""Errors a lab user can act on: a status, a stable code and a plain-language message.

Every error body is ``{"detail": ..., "code": ..., "request_id": ...}``; no stack traces and no
file paths ever reach a client. :class:`ErrorCode` is the one list of codes: the responses carry
them and ``segment_errors_total`` counts by them.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field


class ErrorCode(StrEnum):
    """The stable, machine-readable reason of an error answer."""

    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    TOO_LARGE = "too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    INVALID_IMAGE = "invalid_image"
    INVALID_GROUND_TRUTH = "invalid_ground_truth"
    INVALID_PARAMETER = "invalid_parameter"
    UNKNOWN_MODEL = "unknown_model"
    NOT_READY = "not_ready"
    OVERLOADED = "overloaded"
    SPOOL_FULL = "spool_full"
    UPLOAD_TIMEOUT = "upload_timeout"
    JOB_NOT_FINISHED = "job_not_finished"
    JOB_CANCELLED = "job_cancelled"
    MODEL_UNAVAILABLE = "model_unavailable"
    INTERNAL = "internal"


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
