"""What ``POST /segment`` answers, built from a :class:`~service.segmenter.SegmentResult`: the
mask PNG (or one class's), per-class PNGs on request, the headers and the JSON document.

Beside the segmenter rather than in the route, so the handler only wires HTTP to it.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, Field

from service.inference.metrics import SegmentationScores
from service.inference.modelmeta import Task
from service.inference.rescale import ScalePlan
from service.inference.tiling import BlendMode
from service.registry import SegmentationModel
from service.segmenter import SegmentParams, SegmentResult, render_mask


class ImageInfo(BaseModel):
    """What the uploaded file was."""

    format: str
    dtype: str
    mode: str
    width: int
    height: int
    channels: int
    channel: str | None = None
    physical_pixel_size: dict[str, float | str | None] | None = None


class ScaleInfo(BaseModel):
    """How the image was rescaled to the model's training scale (requests with ``diameter``)."""

    diameter: float = Field(description="The objects' diameter in the image, as sent (pixels)")
    model_diameter: float = Field(description="The model's training scale (object_diameter)")
    factor: float = Field(description="model_diameter / diameter")
    resampled: bool = Field(
        description="False when the factor is within 1 +- 0.05 (or too small to change the "
        "size): the image was segmented as it is"
    )
    width: int = Field(description="Width the model ran on (a stack: each plane's)")
    height: int = Field(description="Height the model ran on")


def scale_info(plan: ScalePlan | None) -> ScaleInfo | None:
    """The ``scale`` part of a JSON answer."""
    if plan is None:
        return None
    return ScaleInfo(
        diameter=plan.diameter,
        model_diameter=plan.model_diameter,
        factor=plan.factor,
        resampled=plan.resampled,
        width=plan.scaled_width,
        height=plan.scaled_height,
    )


def answer_headers(
    model: SegmentationModel,
    timings_ms: dict[str, float],
    scores: SegmentationScores | None,
    scale: ScalePlan | None,
) -> dict[str, str]:
    """Model, provider, stage timings (``Server-Timing``), with a truth the means, and with a
    diameter the factor the image was really rescaled by (``X-Segment-Scale``: 1 when it was
    segmented as it is); the headers of 2-D images and stacks alike."""
    headers = {
        "X-Model": f"{model.name}/{model.meta.version}",
        "X-Provider": model.provider,
        "Server-Timing": ", ".join(f"{k};dur={v}" for k, v in timings_ms.items()),
    }
    if scores is not None and scores.mean_iou is not None:
        headers["X-Mean-IoU"] = f"{scores.mean_iou:.6f}"
        headers["X-Mean-Dice"] = f"{scores.mean_dice:.6f}"
    if scale is not None:
        headers["X-Segment-Scale"] = f"{scale.applied:.6g}"
    return headers


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
    metrics: SegmentationScores | None = None
    scale: ScaleInfo | None = None
    timings_ms: dict[str, float]


def _b64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


@dataclass
class Answer:
    """A segmented request with its PNGs encoded, ready to be sent either way."""

    model: SegmentationModel
    params: SegmentParams
    result: SegmentResult
    png: bytes
    class_masks: dict[str, bytes] | None

    def headers(self) -> dict[str, str]:
        """See :func:`answer_headers`."""
        result = self.result
        return answer_headers(self.model, result.timings_ms(), result.scores, result.scale)

    def document(self, request_id: str) -> SegmentResponse:
        """The JSON answer: the mask as base64 PNG, scores, class fractions and timings."""
        meta, result = self.model.meta, self.result
        k = meta.num_classes
        counts = [int(c) for c in np.bincount(result.mask.ravel(), minlength=k)[:k]]
        total = max(sum(counts), 1)
        binary = meta.task is Task.BINARY
        return SegmentResponse(
            request_id=request_id,
            model=self.model.name,
            version=meta.version,
            provider=self.model.provider,
            image=ImageInfo(
                format=result.image.format,
                dtype=result.image.dtype,
                mode=result.image.mode,
                width=result.image.width,
                height=result.image.height,
                channels=int(result.image.pixels.shape[2]),
                channel=result.image.channel,
                physical_pixel_size=None
                if result.image.physical_size is None
                else result.image.physical_size.as_dict(),
            ),
            classes=meta.classes,
            threshold=(meta.threshold if self.params.threshold is None else self.params.threshold)
            if binary
            else None,
            overlap=self.params.overlap,
            blend=self.params.blend,
            tiles=result.tiles,
            class_fractions={c: n / total for c, n in zip(meta.classes, counts, strict=True)},
            mask_png=_b64(self.png),
            class_masks=None
            if self.class_masks is None
            else {name: _b64(png) for name, png in self.class_masks.items()},
            metrics=result.scores,
            scale=scale_info(result.scale),
            timings_ms=result.timings_ms(),
        )


@dataclass(frozen=True)
class Reply:
    """The bytes and headers of a ``/segment`` response, holding nothing of the image: what
    the worker hands back once the request's arrays can be freed."""

    body: bytes
    media_type: str
    headers: dict[str, str]


def render_answer(
    model: SegmentationModel,
    params: SegmentParams,
    result: SegmentResult,
    *,
    per_class: bool = False,
) -> Answer:
    """Encode the mask (one class's with ``params.class_name``) and, with ``per_class``, each
    class's 0/255 mask; the time it takes is the ``encode`` stage."""
    start = time.perf_counter()
    meta = model.meta
    png = render_mask(result, meta, params.class_index(meta))
    class_masks = (
        {name: render_mask(result, meta, i) for i, name in enumerate(meta.classes)}
        if per_class
        else None
    )
    result.timings["encode"] = time.perf_counter() - start
    return Answer(model, params, result, png, class_masks)
