"""Admission by memory: a request's estimated cost, from its headers, against the budget.

Shared by every route that runs the pipeline, so each answers the same 413 (can never fit, with
the numbers) and 503 (cannot fit now, retry) before any pixel is decoded.
"""

from __future__ import annotations

from typing import BinaryIO

from service.core.errors import ApiError, ErrorCode
from service.core.resources import (
    BudgetBusyError,
    MemoryBudget,
    OverBudgetError,
    Reservation,
    mib,
)
from service.images import read_header
from service.registry import SegmentationModel
from service.segmenter import SegmentParams, request_memory


def _rescaled(params: SegmentParams) -> str:
    return "" if params.diameter is None else f" rescaled for diameter={params.diameter:g}"


def reserve_memory(
    budget: MemoryBudget | None,
    model: SegmentationModel,
    image: BinaryIO,
    truth: BinaryIO | None,
    params: SegmentParams,
    retry_after: int,
    max_pixels: int,
) -> Reservation | None:
    """Reserve what segmenting ``image`` with ``model`` and ``params`` will hold (None without
    a budget).

    Raises the image's own 4xx for a file that is not an image, 413 when the image rescaled
    for ``params.diameter`` is over the pixel limit (``max_pixels``) or the request needs more
    than the whole budget leaves for requests, 503 + ``Retry-After`` when it needs more than
    the requests admitted now leave free.
    """
    if budget is None:
        return None
    header = read_header(image, what="image")
    params.scale_plan(model.name, model.meta, header.height, header.width, max_pixels)
    truth_header = read_header(truth, what="ground truth") if truth is not None else None
    cost = request_memory(
        model.meta,
        header,
        params.batch_size,
        truth_header,
        batch_bytes=model.request_bytes,
        diameter=params.diameter,
    )
    try:
        return budget.admit(cost)
    except OverBudgetError:
        raise ApiError(
            413,
            ErrorCode.TOO_LARGE,
            f"segmenting this {header.width}x{header.height} image ({mib(header.nbytes)} "
            f"decoded){_rescaled(params)} with model {model.name!r} needs about {mib(cost)} "
            "of memory; this "
            f"service has {mib(budget.capacity)} for a request ({budget.source} "
            f"{mib(budget.total)}, of which the loaded models hold {mib(budget.baseline)}). "
            "Send a smaller image or a crop, or give the service more memory",
        ) from None
    except BudgetBusyError as exc:
        raise ApiError(
            503,
            ErrorCode.OVERLOADED,
            f"the service's memory is taken by the requests in progress (this one needs about "
            f"{mib(cost)}, {mib(max(exc.free, 0))} is free); retry in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        ) from None
