"""``POST /segment``: an image in, a thresholded mask out, with IoU and Dice when a ground truth
comes along.

``curl -F image=@cells.tif http://host:8000/segment -o mask.png`` gets the PNG alone; adding
``Accept: application/json`` (or ``?format=json``) gets one JSON document with the mask (base64
PNG), per-class masks on request, per-class IoU/Dice and timings.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from fastapi import APIRouter, File, Query, Request, UploadFile
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from service.api.admission import reserve_memory
from service.api.deps import (
    ApiKeyDep,
    GateDep,
    MemoryBudgetDep,
    MetricsDep,
    ModelDep,
    SettingsDep,
)
from service.api.params import SegmentOptionsDep
from service.core.errors import ApiError, ErrorCode, error_responses
from service.core.gate import OverloadedError
from service.core.logs import log_fields
from service.responses import Answer, Reply, SegmentResponse
from service.stacks import (
    StackAnswer,
    StackResponse,
    encode_mask_tiff,
    segment_upload,
    stack_layout,
)

SEGMENT_PATH = "/segment"

router = APIRouter(tags=["segment"], dependencies=[ApiKeyDep])


class OutputFormat(StrEnum):
    """Response body: the mask PNG alone, the mask as TIFF (multi-page for a stack), or JSON
    with the mask, scores and timings."""

    PNG = "png"
    TIFF = "tiff"
    JSON = "json"


def _wants_json(request: Request, fmt: OutputFormat | None) -> bool:
    if fmt is not None:
        return fmt is OutputFormat.JSON
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "image/png" not in accept


def response_format(request: Request, fmt: OutputFormat | None, stack: bool) -> OutputFormat:
    """The format asked for (``?format=``, else ``Accept``); a stack's mask cannot be one PNG,
    so a stack answered as PNG is a 422 that says what to ask for instead."""
    accept = request.headers.get("accept", "")
    if fmt is None and "image/tiff" in accept:
        fmt = OutputFormat.TIFF
    chosen = OutputFormat.JSON if _wants_json(request, fmt) else (fmt or OutputFormat.PNG)
    if stack and chosen is OutputFormat.PNG:
        raise ApiError(
            422,
            ErrorCode.INVALID_PARAMETER,
            "the image is a stack of planes: its mask is a multi-page TIFF with the same axes; "
            "ask for it with ?format=tiff (or ?format=json for the mask and per-plane scores)",
        )
    return chosen


def render_reply(answer: Answer | StackAnswer, fmt: OutputFormat, request_id: str) -> Reply:
    """The body and headers of an answer, in the format chosen: bytes that hold nothing of the
    image, so the worker can free the request's arrays before the response is sent."""
    if fmt is OutputFormat.JSON:
        document = answer.document(request_id)
        return Reply(document.model_dump_json().encode(), "application/json", answer.headers())
    if isinstance(answer, StackAnswer):
        return Reply(answer.tiff, "image/tiff", answer.headers())
    if fmt is OutputFormat.TIFF:
        meta = answer.model.meta
        tiff = encode_mask_tiff(answer.result.mask, None, meta, answer.params.class_index(meta))
        return Reply(tiff, "image/tiff", answer.headers())
    return Reply(answer.png, "image/png", answer.headers())


def _upload_bytes(*files: UploadFile | None) -> int:
    return sum(f.size or 0 for f in files if f is not None)


@router.post(
    SEGMENT_PATH,
    response_model=SegmentResponse | StackResponse,
    responses={
        200: {
            "content": {"image/png": {}, "image/tiff": {}},
            "description": "The mask as PNG (default), TIFF (`format=tiff`; multi-page for a "
            "stack), or JSON with `Accept: application/json`.",
        },
        **error_responses(
            {
                400: "Malformed request body (e.g. broken multipart framing)",
                401: "API key required",
                404: "Unknown model",
                408: "The upload arrived too slowly (SEG_MIN_UPLOAD_RATE, SEG_UPLOAD_TIMEOUT_S)",
                413: "Upload or image over the size limit, or more memory than the service has",
                415: "Not a PNG, JPEG or TIFF",
                422: "Unusable image, ground truth or parameter",
                500: "Unexpected error; quote the request ID",
                503: "Saturated (requests, memory or spool space), still loading, or (Ray Serve) a "
                "model replica being replaced; retry after `Retry-After` seconds",
            }
        ),
    },
)
async def segment_image(
    request: Request,
    model: ModelDep,
    options: SegmentOptionsDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    gate: GateDep,
    memory: MemoryBudgetDep,
    image: Annotated[UploadFile, File(description="PNG, JPEG or TIFF; 8/16-bit; grey or RGB")],
    ground_truth: Annotated[
        UploadFile | None,
        File(description="Optional mask, same size: 0/1, 0/255, class indices or instance labels"),
    ] = None,
    format: Annotated[
        OutputFormat | None, Query(description="png or json; default from the Accept header")
    ] = None,
) -> Response:
    """Segment an image with a U-Net; score it when a ground truth is sent."""
    params, per_class, channel = options.params, options.per_class, options.channel
    # Off the event loop: a stack's header lists every page.
    layout = await run_in_threadpool(stack_layout, image.file)
    fmt = response_format(request, format, stack=layout is not None)
    truth_file = ground_truth.file if ground_truth is not None else None
    upload_bytes = _upload_bytes(image, ground_truth)
    request_id = request.state.request_id
    try:
        reservation = reserve_memory(
            memory,
            model,
            image.file,
            truth_file,
            params,
            settings.retry_after_seconds,
            settings.max_image_pixels,
        )
    except ApiError as exc:
        if exc.code is ErrorCode.OVERLOADED:
            metrics.rejected.inc()
        raise

    def respond() -> Reply:
        answer = segment_upload(
            model,
            image.file,
            params,
            max_pixels=settings.max_image_pixels,
            layout=layout,
            channel=channel,
            per_class=fmt is OutputFormat.JSON and per_class,
            truth_file=truth_file,
        )
        metrics.record_segmentation(model.name, answer.result, upload_bytes)
        log_fields(model=model.name, tiles=answer.result.tiles, bytes=upload_bytes)
        return render_reply(answer, fmt, request_id)

    def work() -> Reply:
        try:
            return respond()
        finally:
            # After respond() has returned, its image, probabilities and mask are freed: only
            # now can SEG_CPU_MEMORY_ARENA=shrink give the request's memory back, whether or
            # not the client is still there to receive the answer.
            model.release_memory()
            if reservation is not None:
                reservation.release()

    try:
        reply = await gate.run(work)
    except OverloadedError:
        if reservation is not None:
            reservation.release()
        metrics.rejected.inc()
        raise ApiError(
            503,
            ErrorCode.OVERLOADED,
            f"the service is busy ({gate.limit} requests admitted); retry in "
            f"{settings.retry_after_seconds} s",
            headers={"Retry-After": str(settings.retry_after_seconds)},
        ) from None
    return Response(content=reply.body, media_type=reply.media_type, headers=reply.headers)
