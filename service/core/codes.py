"""The stable, machine-readable reasons of error answers.

One list, in the lowest layer, because two layers say them: the API puts them in every error body
and telemetry counts failed requests by them (``segment_errors_total{reason}``).
"""

from enum import StrEnum


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
    CLIENT_CLOSED = "client_closed"
    INTERNAL = "internal"
