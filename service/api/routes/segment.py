"""``POST /segment``: an image in, a thresholded mask out, with IoU and Dice when a ground truth
comes along.

``curl -F image=@cells.tif http://host:8000/segment -o mask.png`` gets the PNG alone; adding
``Accept: application/json`` (or ``?format=json``) gets one JSON document with the mask (base64
PNG), per-class masks on request, per-class IoU/Dice and timings.
"""

from __future__ import annotations

import base64
import time
from enum import StrEnum
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Query, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel

from service.api.deps import ApiKeyDep, GateDep, MetricsDep, RegistryDep, SettingsDep
from service.core.errors import ApiError, error_responses
from service.core.gate import OverloadedError
from service.core.metrics import ServiceMetrics
from service.inference.modelmeta import Task
from service.inference.tiling import BlendMode
from service.registry import LoadedModel
from service.segmenter import SegmentParams, SegmentResult, render_mask, segment

router = APIRouter(tags=["segment"], dependencies=[ApiKeyDep])

MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"


class OutputFormat(StrEnum):
    """Response body: the mask PNG alone, or JSON with the mask, scores and timings."""

    PNG = "png"
    JSON = "json"


class ImageInfo(BaseModel):
    """What the uploaded file was."""

    format: str
    dtype: str
    mode: str
    width: int
    height: int
    channels: int


class Scores(BaseModel):
    """Per-class IoU and Dice (``null`` for a class absent from prediction and truth) and their
    means over the classes present."""

    iou: dict[str, float | None]
    dice: dict[str, float | None]
    mean_iou: float | None
    mean_dice: float | None
    pixels: dict[str, dict[str, int]]


class SegmentResponse(BaseModel):
    """The JSON answer of ``POST /segment``."""

    request_id: str
    model: str
    version: str
    provider: str
    image: ImageInfo
    classes: list[str]
    threshold: float | None
    overlap: float
    blend: BlendMode
    tiles: int
    class_fractions: dict[str, float]
    mask_png: str
    class_masks: dict[str, str] | None = None
    metrics: Scores | None = None
    timings_ms: dict[str, float]


def _wants_json(request: Request, fmt: OutputFormat | None) -> bool:
    if fmt is not None:
        return fmt is OutputFormat.JSON
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "image/png" not in accept


def _class_index(model: LoadedModel, class_name: str | None) -> int | None:
    if class_name is None:
        return None
    if class_name not in model.meta.classes:
        raise ApiError(
            422,
            "invalid_parameter",
            f"class_name {class_name!r} is not a class of model {model.name!r}: "
            f"{model.meta.classes}",
        )
    return model.meta.classes.index(class_name)


def _record(
    metrics: ServiceMetrics, model: LoadedModel, result: SegmentResult, upload: int
) -> None:
    name = model.name
    metrics.inference_seconds.labels(name).observe(result.timings["infer"])
    for stage, seconds in result.timings.items():
        metrics.stage_seconds.labels(stage).observe(seconds)
    metrics.tiles.labels(name).inc(result.tiles)
    metrics.pixels.labels(name).inc(result.image.height * result.image.width)
    metrics.image_bytes.inc(upload)
    for size in result.batches:
        metrics.tile_batch_size.labels(name).observe(size)


@router.post(
    "/segment",
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
                503: "Saturated or still loading; retry after `Retry-After` seconds",
            }
        ),
    },
)
async def segment_image(
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    gate: GateDep,
    image: Annotated[UploadFile, File(description="PNG, JPEG or TIFF; 8/16-bit; grey or RGB")],
    ground_truth: Annotated[
        UploadFile | None,
        File(description="Optional mask, same size: 0/1, 0/255, class indices or instance labels"),
    ] = None,
    model: Annotated[
        str | None,
        Query(pattern=MODEL_NAME_PATTERN, description="Model name (default: the default model)"),
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
    name = model or settings.default_model
    if not registry.ready.is_set():
        raise ApiError(
            503,
            "not_ready",
            "the models are still loading; try again shortly",
            headers={"Retry-After": str(settings.retry_after_seconds)},
        )
    loaded = registry.get(name)
    if loaded is None:
        reason = registry.failed.get(name)
        detail = f"model {name!r} failed to load" if reason else f"no model named {name!r}"
        raise ApiError(
            404, "unknown_model", f"{detail}; available models: {sorted(registry.models)}"
        )
    if threshold is not None and loaded.meta.task is not Task.BINARY:
        raise ApiError(
            422,
            "invalid_parameter",
            f"threshold applies to binary models; {name!r} has {loaded.meta.num_classes} classes "
            "and takes the most probable class per pixel",
        )
    class_index = _class_index(loaded, class_name)
    as_json = _wants_json(request, format)
    params = SegmentParams(
        threshold=threshold,
        overlap=settings.default_overlap if overlap is None else overlap,
        blend=blend,
        batch_size=settings.tile_batch_size,
    )
    truth_file = ground_truth.file if ground_truth is not None else None

    def work() -> tuple[SegmentResult, bytes, dict[str, str] | None, float]:
        result = segment(
            loaded, image.file, params, max_pixels=settings.max_image_pixels, truth_file=truth_file
        )
        t0 = time.perf_counter()
        png = render_mask(result, loaded.meta, class_index)
        extra = None
        if as_json and per_class:
            extra = {
                cls: base64.b64encode(render_mask(result, loaded.meta, i)).decode("ascii")
                for i, cls in enumerate(loaded.meta.classes)
            }
        return result, png, extra, time.perf_counter() - t0

    try:
        result, png, class_masks, encode_s = await gate.run(work)
    except OverloadedError:
        metrics.rejected.inc()
        raise ApiError(
            503,
            "overloaded",
            f"the service is busy ({gate.limit} requests admitted); retry in "
            f"{settings.retry_after_seconds} s",
            headers={"Retry-After": str(settings.retry_after_seconds)},
        ) from None
    result.timings["encode"] = encode_s
    _record(
        metrics,
        loaded,
        result,
        (image.size or 0) + ((ground_truth.size or 0) if ground_truth else 0),
    )

    request_id: str = request.state.request_id
    timings = result.timings_ms()
    headers = {
        "X-Model": f"{loaded.name}/{loaded.meta.version}",
        "X-Provider": loaded.provider,
        "Server-Timing": ", ".join(f"{k};dur={v}" for k, v in timings.items()),
    }
    if result.scores is not None and result.scores.mean_iou is not None:
        headers["X-Mean-IoU"] = f"{result.scores.mean_iou:.6f}"
        headers["X-Mean-Dice"] = f"{result.scores.mean_dice:.6f}"
    if not as_json:
        return Response(content=png, media_type="image/png", headers=headers)

    k = loaded.meta.num_classes
    counts = [int(c) for c in np.bincount(result.mask.ravel(), minlength=k)[:k]]
    total = max(sum(counts), 1)
    body = SegmentResponse(
        request_id=request_id,
        model=loaded.name,
        version=loaded.meta.version,
        provider=loaded.provider,
        image=ImageInfo(
            format=result.image.format,
            dtype=result.image.dtype,
            mode=result.image.mode,
            width=result.image.width,
            height=result.image.height,
            channels=int(result.image.pixels.shape[2]),
        ),
        classes=loaded.meta.classes,
        threshold=(loaded.meta.threshold if threshold is None else threshold)
        if loaded.meta.task is Task.BINARY
        else None,
        overlap=params.overlap,
        blend=params.blend,
        tiles=result.tiles,
        class_fractions={c: n / total for c, n in zip(loaded.meta.classes, counts, strict=True)},
        mask_png=base64.b64encode(png).decode("ascii"),
        class_masks=class_masks,
        metrics=Scores(**result.scores.as_dict()) if result.scores is not None else None,
        timings_ms=timings,
    )
    return Response(content=body.model_dump_json(), media_type="application/json", headers=headers)
