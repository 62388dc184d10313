"""Errors a lab user can act on: a status, a stable code and a plain-language message.

Every error body is ``{"detail": ..., "code": ..., "request_id": ...}``; no stack traces and no
file paths ever reach a client.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    """Every error answer (4xx and 5xx)."""

    detail: str = Field(description="What went wrong, in plain language, and what to do")
    code: str = Field(description="Stable machine-readable reason, e.g. invalid_image")
    request_id: str = Field(description="Also in the X-Request-ID header and the service log")


def error_responses(described: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for error statuses, all with the :class:`ErrorBody` model."""
    return {status: {"model": ErrorBody, "description": text} for status, text in described.items()}


class ApiError(Exception):
    """An error answered with ``status`` and a message meant for the person who sent the request."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self, request_id: str) -> dict[str, Any]:
        """JSON body of the error response."""
        return {"detail": self.message, "code": self.code, "request_id": request_id}


def unsupported_media(message: str) -> ApiError:
    """415: the bytes are not an image format the service reads."""
    return ApiError(415, "unsupported_media_type", message)


def invalid_image(message: str) -> ApiError:
    """422 (400-class): the file is an image format we read, but this file cannot be used."""
    return ApiError(422, "invalid_image", message)


def too_large(message: str) -> ApiError:
    """413: over the upload or pixel limit."""
    return ApiError(413, "too_large", message)
