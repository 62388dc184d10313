"""Why a request's content cannot be segmented, said without HTTP.

Decoding, channel matching, ground-truth reading and parameter checks raise these; the API maps
each to a status and an error code (``service.api.problems``), and in-process callers (benchmarks,
scripts) get a plain exception with the same message meant for the person who sent the image.
"""

from __future__ import annotations

from typing import Any


class SegmentationInputError(ValueError):
    """The upload or a parameter cannot be used; ``message`` says what was expected and what
    arrived."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnsupportedFormatError(SegmentationInputError):
    """The bytes are not an image format the service reads (e.g. GIF, PDF)."""


class InvalidImageError(SegmentationInputError):
    """A format the service reads, but this file cannot be used (damaged, a stack, wrong type)."""


class ImageTooLargeError(SegmentationInputError):
    """Over the pixel limit (checked from the header, before any pixel is decoded)."""


class InvalidGroundTruthError(SegmentationInputError):
    """The ground truth does not fit the image or the model's classes."""


class InvalidParameterError(SegmentationInputError):
    """A request parameter does not apply to the chosen model."""


class ModelUnavailableError(Exception):
    """The model cannot run this request, though the request itself is fine: with ``busy`` its
    queue is full (backpressure) or its file does not fit in memory now; otherwise the process
    running it is gone or being replaced. Retrying later works there (the API answers 503 with
    ``Retry-After``), except with ``lasting``: the file itself does not load, which only
    replacing it fixes (503 without ``Retry-After``).

    Raised by predictors that run the model elsewhere (the Ray Serve ingress's model
    deployments) and by files loaded on their first request.
    """

    def __init__(self, message: str, *, busy: bool, lasting: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.busy = busy
        self.lasting = lasting

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled with its flags (a Ray model replica raises it to the ingress)."""
        return _model_unavailable, (self.message, self.busy, self.lasting)


def _model_unavailable(message: str, busy: bool, lasting: bool) -> ModelUnavailableError:
    return ModelUnavailableError(message, busy=busy, lasting=lasting)


class ServiceBusyError(Exception):
    """The request is fine but cannot be taken now (workers, memory or result space are held by
    other requests): the API answers 503 with ``Retry-After`` (``retry_after`` seconds when the
    domain knows better than the service's default)."""

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class SegmentationCancelledError(Exception):
    """Raised between two tile batches into a request that was cancelled (a job deleted, or a
    client that went away): the work stops there and its worker is free again."""
