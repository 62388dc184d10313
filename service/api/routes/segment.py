"""``POST /segment``: an image in, a thresholded mask out, with IoU and Dice when a ground truth
comes along.

``curl -F image=@cells.tif http://host:8000/segment -o mask.png`` gets the PNG alone; adding
``Accept: application/json`` (or ``?format=json``) gets one JSON document with the mask (base64
PNG), per-class masks on request, per-class IoU/Dice and timings.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Query, Request, UploadFile
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from service.api.deps import ApiKeyDep, ClientGoneDep, ModelDep, RunnerDep, SettingsDep
from service.api.params import SegmentOptionsDep
from service.api.paths import SEGMENT_PATH
from service.api.problems import error_responses
from service.api.replies import OutputFormat, reply, response_format
from service.api.schemas import SegmentResponse, StackResponse
from service.core.logs import log_fields
from service.segmentation import usecase

router = APIRouter(tags=["segment"], dependencies=[ApiKeyDep])

ImageUpload = Annotated[UploadFile, File(description="PNG, JPEG or TIFF; 8/16-bit; grey or RGB")]
TruthUpload = Annotated[
    UploadFile | None,
    File(description="Optional mask, same size: 0/1, 0/255, class indices or instance labels"),
]
FormatQuery = Annotated[
    OutputFormat | None, Query(description="png, tiff or json; default from the Accept header")
]

SEGMENT_ERRORS = {
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


def upload_of(image: UploadFile, truth: UploadFile | None, channel: str | None) -> usecase.Upload:
    """The domain's view of a request's files."""
    return usecase.Upload(image.file, truth.file if truth is not None else None, channel)


@router.post(
    SEGMENT_PATH,
    response_model=SegmentResponse | StackResponse,
    responses={
        200: {
            "content": {"image/png": {}, "image/tiff": {}},
            "description": "The mask as PNG (default), TIFF (`format=tiff`; multi-page for a "
            "stack), or JSON with `Accept: application/json`.",
        },
        **error_responses(SEGMENT_ERRORS),
    },
)
async def segment_image(
    request: Request,
    model: ModelDep,
    options: SegmentOptionsDep,
    settings: SettingsDep,
    runner: RunnerDep,
    gone: ClientGoneDep,
    image: ImageUpload,
    ground_truth: TruthUpload = None,
    format: FormatQuery = None,
) -> Response:
    """Segment an image with a U-Net; score it when a ground truth is sent."""
    upload = upload_of(image, ground_truth, options.channel)
    # Headers only, off the event loop (a stack's header lists every page): 4xx before 503.
    plan = await run_in_threadpool(
        usecase.plan, model, upload, options.params, max_pixels=settings.max_image_pixels
    )
    fmt = response_format(request, format, stack=plan.stack)
    rid, per_class = request.state.request_id, options.per_class
    answer = await runner.segment(
        plan, upload, lambda s: reply(s, fmt, rid, per_class=per_class), cancel=gone
    )
    log_fields(model=model.name, tiles=plan.tiles, bytes=plan.upload_bytes)
    return Response(content=answer.body, media_type=answer.media_type, headers=answer.headers)
