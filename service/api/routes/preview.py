"""``POST /preview``: an 8-bit, contrast-stretched PNG of an uploaded image, for people to look
at (the page at ``/`` shows it beside the mask overlay; browsers read neither TIFF nor the
range of 16-bit images). Same decoder, limits and admission as ``/segment``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Query, UploadFile
from fastapi.responses import Response

from service.api.deps import ApiKeyDep, GateDep, MetricsDep, SettingsDep
from service.core.errors import ApiError, ErrorCode, error_responses
from service.core.gate import OverloadedError
from service.preview import preview_png

PREVIEW_PATH = "/preview"

router = APIRouter(tags=["preview"], dependencies=[ApiKeyDep])


@router.post(
    PREVIEW_PATH,
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "8-bit preview PNG"},
        **error_responses(
            {
                401: "API key required",
                413: "Upload or image over the size limit",
                415: "Not a PNG, JPEG or TIFF",
                422: "Unusable image or parameter",
                503: "Saturated; retry after `Retry-After` seconds",
            }
        ),
    },
)
async def preview_image(
    settings: SettingsDep,
    metrics: MetricsDep,
    gate: GateDep,
    image: Annotated[UploadFile, File(description="PNG, JPEG or TIFF")],
    max_side: Annotated[int, Query(ge=16, le=4096, description="Longest side, pixels")] = 1024,
    channel: Annotated[
        str | None, Query(max_length=64, description="Multi-channel TIFF: index or OME name")
    ] = None,
) -> Response:
    """Preview an image: contrast-stretched to 8 bits, at most ``max_side`` pixels a side."""
    try:
        png, width, height = await gate.run(
            lambda: preview_png(
                image.file,
                max_pixels=settings.max_image_pixels,
                max_side=max_side,
                channel=channel,
            )
        )
    except OverloadedError:
        metrics.rejected.inc()
        raise ApiError(
            503,
            ErrorCode.OVERLOADED,
            f"the service is busy; retry in {settings.retry_after_seconds} s",
            headers={"Retry-After": str(settings.retry_after_seconds)},
        ) from None
    headers = {"X-Image-Width": str(width), "X-Image-Height": str(height)}
    return Response(content=png, media_type="image/png", headers=headers)
