"""The segmentation options a request chooses in its query string, as one dependency.

Jobs (``POST /jobs``) take exactly what ``POST /segment`` takes; declaring the options here
once keeps the two from drifting apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated

from fastapi import Depends, Query

from service.api.deps import SettingsDep
from service.inference.tiling import BlendMode
from service.segmentation.usecase import SegmentParams


class Output(StrEnum):
    """What the image file of an answer holds: the mask, or the objects' instance labels."""

    MASK = "mask"
    LABELS = "labels"


@dataclass
class SegmentOptions:
    """Checked segmentation parameters and what the JSON answer should include."""

    params: SegmentParams
    per_class: bool
    channel: str | None = None


def segment_options(
    settings: SettingsDep,
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
    class_name: Annotated[
        str | None, Query(max_length=64, description="Return this class's 0/255 mask only")
    ] = None,
    per_class: Annotated[
        bool,
        Query(
            description="JSON only: add one 0/255 PNG per class (and with output=labels the "
            "objects' outlines)"
        ),
    ] = False,
    channel: Annotated[
        str | None,
        Query(
            max_length=64,
            description="Multi-channel TIFF (CYX, CZYX, TCZYX): the channel to segment, as an "
            "index or an OME channel name",
        ),
    ] = None,
    diameter: Annotated[
        float | None,
        Query(
            gt=0.0,
            allow_inf_nan=False,
            description="The objects' (e.g. nuclei's) typical diameter in pixels in this image: "
            "the image is rescaled to the model's training scale (its object_diameter in "
            "GET /models) before tiling, and the mask back to the image's size. Models "
            "without a training scale refuse it",
        ),
    ] = None,
    output: Annotated[
        Output,
        Query(
            description="mask: the class mask; labels: the objects as instance labels (16-bit "
            "PNG, or TIFF; 0 background, one id per object) and, in JSON, a table of the "
            "objects. Models that separate touching objects list `instances` in GET /models",
        ),
    ] = Output.MASK,
) -> SegmentOptions:
    """The options as sent (checked against the model when the request is planned)."""
    params = SegmentParams(
        threshold=threshold,
        overlap=settings.default_overlap if overlap is None else overlap,
        blend=blend,
        batch_size=settings.tile_batch_size,
        class_name=class_name,
        diameter=diameter,
        labels=output is Output.LABELS,
    )
    return SegmentOptions(params, per_class, channel)


SegmentOptionsDep = Annotated[SegmentOptions, Depends(segment_options)]
