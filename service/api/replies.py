"""What a finished segmentation is answered with over HTTP, in the format the client asked for:
the mask (PNG, or TIFF: multi-page for a stack) or the JSON document, and the headers that say
how it was made. ``/segment`` and ``/jobs/{id}/result`` both answer through :func:`reply`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from fastapi import Request

from service.api.problems import ApiError, ErrorCode
from service.api.schemas import segment_document, stack_document
from service.segmentation.render import (
    encode_class_masks,
    encode_labels,
    encode_mask,
    encode_outlines,
)
from service.segmentation.usecase import Segmentation


class OutputFormat(StrEnum):
    """Response body: the mask PNG alone, the mask as TIFF (multi-page for a stack), or JSON
    with the mask, scores and timings."""

    PNG = "png"
    TIFF = "tiff"
    JSON = "json"


def response_format(request: Request, fmt: OutputFormat | None, stack: bool) -> OutputFormat:
    """The format asked for (``?format=``, else ``Accept``); a stack's mask cannot be one PNG,
    so a stack answered as PNG is a 422 that says what to ask for instead."""
    accept = request.headers.get("accept", "")
    if fmt is None:
        if "image/tiff" in accept:
            fmt = OutputFormat.TIFF
        elif "application/json" in accept and "image/png" not in accept:
            fmt = OutputFormat.JSON
        else:
            fmt = OutputFormat.PNG
    if stack and fmt is OutputFormat.PNG:
        raise ApiError(
            422,
            ErrorCode.INVALID_PARAMETER,
            "the image is a stack of planes: its mask is a multi-page TIFF with the same axes; "
            "ask for it with ?format=tiff (or ?format=json for the mask and per-plane scores)",
        )
    return fmt


def answer_headers(segmentation: Segmentation) -> dict[str, str]:
    """Model, precision, provider, stage timings (``Server-Timing``), with a truth the means (a
    stack's: the whole stack's), and with a diameter the factor the image was really rescaled by
    (``X-Segment-Scale``: 1 when it was segmented as it is)."""
    model, scores, scale = segmentation.model, segmentation.scores, segmentation.scale
    timings = segmentation.timings_ms()
    headers = {
        "X-Model": f"{model.name}/{model.meta.version}",
        "X-Precision": model.meta.precision,
        "X-Provider": model.provider,
        "Server-Timing": ", ".join(f"{k};dur={v}" for k, v in timings.items()),
    }
    if scores is not None and scores.mean_iou is not None:
        headers["X-Mean-IoU"] = f"{scores.mean_iou:.6f}"
        headers["X-Mean-Dice"] = f"{scores.mean_dice:.6f}"
    if scale is not None:
        headers["X-Segment-Scale"] = f"{scale.applied:.6g}"
    found = segmentation.objects
    if found is not None:
        headers["X-Object-Count"] = str(sum(found.counts))
        if found.scores is not None and found.scores.f1 is not None:
            headers["X-Object-F1"] = f"{found.scores.f1:.6f}"
    return headers


@dataclass(frozen=True)
class Reply:
    """The bytes and headers of a response, holding nothing of the image: what the worker
    hands back once the request's arrays can be freed."""

    body: bytes
    media_type: str
    headers: dict[str, str]


def reply(
    segmentation: Segmentation, fmt: OutputFormat, request_id: str, *, per_class: bool = False
) -> Reply:
    """Encode ``segmentation`` in ``fmt`` (one class's mask with ``class_name``; with
    ``per_class``, JSON carries each class's PNG too; with output=labels the instance labels,
    and in JSON the object table, beside the mask)."""
    meta = segmentation.model.meta
    tiff = fmt is OutputFormat.TIFF
    labels = encode_labels(segmentation, tiff=tiff) if segmentation.params.labels else None
    if labels is not None and fmt is not OutputFormat.JSON:
        return Reply(labels[0], labels[1], answer_headers(segmentation))
    class_index = segmentation.params.class_index(meta)
    mask = encode_mask(segmentation, tiff=tiff, class_index=class_index)
    if fmt is OutputFormat.JSON:
        if segmentation.stack:
            planes = range(len(segmentation.mask))
            each = [encode_class_masks(segmentation, k) for k in planes] if per_class else None
            lines = [encode_outlines(segmentation, k) for k in planes] if each and labels else None
            body = stack_document(
                segmentation, mask, request_id, labels, each, lines
            ).model_dump_json()
        else:
            masks = encode_class_masks(segmentation) if per_class else None
            edges = encode_outlines(segmentation) if per_class and labels else None
            document = segment_document(segmentation, mask, masks, request_id, labels, edges)
            body = document.model_dump_json()
        return Reply(body.encode(), "application/json", answer_headers(segmentation))
    tiff = tiff or segmentation.stack
    media_type = "image/tiff" if tiff else "image/png"
    return Reply(mask, media_type, answer_headers(segmentation))
