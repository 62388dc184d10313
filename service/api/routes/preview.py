"""``POST /preview``: an 8-bit, contrast-stretched PNG of an uploaded image, for people to look
at (the page at ``/`` shows it beside the mask overlay; browsers read neither TIFF nor the
range of 16-bit images). Same decoder, limits and admission (workers and memory) as
``/segment``."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, File, Query, UploadFile
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from service.api.deps import ApiKeyDep, RunnerDep, SettingsDep
from service.api.paths import PREVIEW_PATH
from service.api.problems import error_responses
from service.core.resources import mib
from service.segmentation.preview import plan_preview, preview_png

router = APIRouter(tags=["preview"], dependencies=[ApiKeyDep])


@router.post(
    PREVIEW_PATH,
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "8-bit preview PNG"},
        **error_responses(
            {
                401: "API key required",
                413: "Upload or image over the size limit, or more memory than the service has",
                415: "Not a PNG, JPEG or TIFF",
                422: "Unusable image or parameter",
                503: "Saturated; retry after `Retry-After` seconds",
            }
        ),
    },
)
async def preview_image(
    settings: SettingsDep,
    runner: RunnerDep,
    image: Annotated[UploadFile, File(description="PNG, JPEG or TIFF")],
    max_side: Annotated[int, Query(ge=16, le=4096, description="Longest side, pixels")] = 1024,
    plane: Annotated[int, Query(ge=0, description="A stack's plane, in file order")] = 0,
    channel: Annotated[
        str | None, Query(max_length=64, description="Multi-channel TIFF: index or OME name")
    ] = None,
) -> Response:
    """Preview an image (one plane of a stack): contrast-stretched to 8 bits, at most
    ``max_side`` pixels a side. The headers say what a page needs to offer the choices:
    ``X-Image-Planes``, and for a multi-channel image ``X-Image-Channels`` (JSON: the OME
    names, else the indices)."""
    plan = await run_in_threadpool(
        plan_preview, image.file, max_pixels=settings.max_image_pixels, channel=channel
    )
    header = plan.header
    what = f"previewing this {header.width}x{header.height} image ({mib(header.nbytes)} decoded)"
    png, width, height = await runner.call(
        lambda: preview_png(image.file, plan, max_side=max_side, plane=plane),
        memory=plan.memory,
        what=what,
    )
    headers = {
        "X-Image-Width": str(width),
        "X-Image-Height": str(height),
        "X-Image-Planes": str(header.planes),
    }
    layout = header.layout
    if layout is not None and layout.channel_axis == "C" and len(layout.channels) > 1:
        headers["X-Image-Channels"] = json.dumps(layout.channels)
    return Response(content=png, media_type="image/png", headers=headers)
