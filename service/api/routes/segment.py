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

from service.api.deps import ApiKeyDep, GateDep, MetricsDep, ModelDep, SettingsDep
from service.core.errors import ApiError, ErrorCode, error_responses
from service.core.gate import OverloadedError
from service.core.logs import log_fields
from service.inference.tiling import BlendMode
from service.responses import Answer, SegmentResponse, render_answer
from service.segmenter import SegmentParams, segment

SEGMENT_PATH = "/segment"

router = APIRouter(tags=["segment"], dependencies=[ApiKeyDep])


class OutputFormat(StrEnum):
    """Response body: the mask PNG alone, or JSON with the mask, scores and timings."""

    PNG = "png"
    JSON = "json"


def _wants_json(request: Request, fmt: OutputFormat | None) -> bool:
    if fmt is not None:
        return fmt is OutputFormat.JSON
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "image/png" not in accept


def _upload_bytes(*files: UploadFile | None) -> int:
    return sum(f.size or 0 for f in files if f is not None)


@router.post(
    SEGMENT_PATH,
    response_model=SegmentResponse,
    responses={
        200: {
            "content": {"image/png": {}},
            "description": "The mask as PNG (default), or JSON with `Accept: application/json`.",
        },
        **error_responses(
            {
                400: "Malformed request body (e.g. broken multipart framing)",
                401: "API key required",
                404: "Unknown model",
                413: "Upload or image over the size limit",
                415: "Not a PNG, JPEG or TIFF",
                422: "Unusable image, ground truth or parameter",
                500: "Unexpected error; quote the request ID",
                503: "Saturated, still loading, or (Ray Serve) a model replica being "
                "replaced; retry after `Retry-After` seconds",
            }
        ),
    },
)
async def segment_image(
    request: Request,
    model: ModelDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    gate: GateDep,
    image: Annotated[UploadFile, File(description="PNG, JPEG or TIFF; 8/16-bit; grey or RGB")],
    ground_truth: Annotated[
        UploadFile | None,
        File(description="Optional mask, same size: 0/1, 0/255, class indices or instance labels"),
    ] = None,
    threshold: Annotated[
        float | None, Query(gt=0.0, lt=1.0, description="Binary models: probability cut-off")
    ] = None,
    overlap: Annotated[
        float | None,
        Query(ge=0.0, le=0.75, description="Fraction of the tile shared by neighbours"),
    ] = None,
    blend: Annotated[
        BlendMode, Query(description="Weight window for stitching")
    ] = BlendMode.GAUSSIAN,
    format: Annotated[
        OutputFormat | None, Query(description="png or json; default from the Accept header")
    ] = None,
    class_name: Annotated[
        str | None, Query(max_length=64, description="Return this class's 0/255 mask only")
    ] = None,
    per_class: Annotated[bool, Query(description="JSON only: add one 0/255 PNG per class")] = False,
) -> Response:
    """Segment an image with a U-Net; score it when a ground truth is sent."""
    params = SegmentParams(
        threshold=threshold,
        overlap=settings.default_overlap if overlap is None else overlap,
        blend=blend,
        batch_size=settings.tile_batch_size,
        class_name=class_name,
    )
    params.check(model.name, model.meta)
    as_json = _wants_json(request, format)
    truth_file = ground_truth.file if ground_truth is not None else None

    def work() -> Answer:
        result = segment(
            model, image.file, params, max_pixels=settings.max_image_pixels, truth_file=truth_file
        )
        return render_answer(model, params, result, per_class=as_json and per_class)

    try:
        answer = await gate.run(work)
    except OverloadedError:
        metrics.rejected.inc()
        raise ApiError(
            503,
            ErrorCode.OVERLOADED,
            f"the service is busy ({gate.limit} requests admitted); retry in "
            f"{settings.retry_after_seconds} s",
            headers={"Retry-After": str(settings.retry_after_seconds)},
        ) from None
    upload_bytes = _upload_bytes(image, ground_truth)
    metrics.record_segmentation(model.name, answer.result, upload_bytes)
    log_fields(model=model.name, tiles=answer.result.tiles, bytes=upload_bytes)
    if not as_json:
        return Response(content=answer.png, media_type="image/png", headers=answer.headers())
    document = answer.document(request.state.request_id)
    return Response(
        content=document.model_dump_json(),
        media_type="application/json",
        headers=answer.headers(),
    )
