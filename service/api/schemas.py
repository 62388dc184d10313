"""The JSON documents the API answers, and how each is built from a domain object: one
:class:`~service.segmentation.usecase.Segmentation` gives ``SegmentResponse`` (a 2-D image) or
``StackResponse`` (a stack), whether it is sent by ``/segment`` or by ``/jobs/{id}/result``.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from service.api.problems import ErrorCode
from service.inference.matching import ObjectScores
from service.inference.modelmeta import Task
from service.inference.precision import Precision
from service.inference.rescale import ScalePlan
from service.inference.scores import SegmentationScores
from service.inference.tiling import BlendMode
from service.segmentation.jobs import Job, JobState
from service.segmentation.usecase import Segmentation


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


def attributes(source: object, names: str) -> dict[str, Any]:
    """``source``'s attributes ``names`` (space-separated), for the fields of a document that
    say them as they are."""
    return {name: getattr(source, name) for name in names.split()}


def scale_info(plan: ScalePlan | None) -> ScaleInfo | None:
    """The ``scale`` part of a JSON answer."""
    if plan is None:
        return None
    same = attributes(plan, "diameter model_diameter factor resampled")
    return ScaleInfo(**same, width=plan.scaled_width, height=plan.scaled_height)


class ObjectCounts(BaseModel):
    """Predicted objects matched one-to-one to true ones by IoU
    (``service.inference.matching``): counts and scores."""

    true_objects: int
    predicted_objects: int
    tp: int = Field(description="Matches at IoU >= 0.5")
    fp: int
    fn: int
    precision: float | None
    recall: float | None
    f1: float | None = Field(description="At IoU 0.5")
    mean_matched_iou: float | None
    ap50: float | None = Field(description="TP / (TP + FP + FN) at IoU 0.5")
    mean_ap: float | None = Field(description="The 2018 Data Science Bowl score: AP over 0.5:0.95")
    ap: dict[str, float | None] = Field(description="AP at each IoU threshold")


class ObjectMetrics(ObjectCounts):
    """Object-level scores against an instance ground truth."""

    truth_objects: str = Field(
        description="How the truth's objects were read: its instance labels, or the connected "
        "components of a 0/1 (0/255) mask"
    )
    labelled_only: ObjectCounts | None = Field(
        None,
        description="The same without the predicted objects that the image border cuts and of "
        "which under a fifth lies on a true object: what a reference that leaves out nuclei cut "
        "by the border (the Cell Tracking Challenge's, say) can score; the model cards give "
        "both. The whole image's only (not per plane)",
    )


class ObjectRow(BaseModel):
    """One object: its id in the labels image, and its measurements in pixels."""

    id: int
    area: int
    centroid_y: float
    centroid_x: float
    bbox_top: int
    bbox_left: int
    bbox_bottom: int = Field(description="Exclusive")
    bbox_right: int = Field(description="Exclusive")
    equivalent_diameter: float = Field(description="Of the disc of the same area")
    mean_intensity: float = Field(description="Of the segmented channel, as sent")


class _Answer(BaseModel):
    """What the JSON answers of 2-D images and stacks share."""

    request_id: str
    model: str
    version: str
    precision: Precision = Field(
        description="The model variant that ran (precision=auto: the host's choice, GET /models)"
    )
    provider: str
    classes: list[str]
    threshold: float | None
    overlap: float
    blend: BlendMode
    tiles: int
    class_fractions: dict[str, float]
    metrics: SegmentationScores | None = None
    object_count: int | None = Field(
        None, description="Objects found (every plane), when they were labelled"
    )
    object_metrics: ObjectMetrics | None = None
    scale: ScaleInfo | None = None
    timings_ms: dict[str, float]


class SegmentResponse(_Answer):
    """The JSON answer of ``POST /segment`` for a 2-D image."""

    image: ImageInfo
    mask_png: str
    class_masks: dict[str, str] | None = None
    labels_png: str | None = Field(
        None, description="output=labels: the labels as a base64 16-bit PNG (0 background)"
    )
    labels_tiff: str | None = Field(
        None, description="output=labels with over 65,535 objects: a base64 32-bit TIFF"
    )
    objects: list[ObjectRow] | None = Field(None, description="output=labels: one row per object")
    outlines_png: str | None = Field(
        None, description="output=labels with per_class: the objects' outlines, a 0/255 PNG"
    )


class PhysicalPixelSize(BaseModel):
    """One pixel's size (and one Z step's) from the OME metadata."""

    x: float | None
    y: float | None
    z: float | None
    unit: str


class StackInfo(BaseModel):
    """What the uploaded stack was."""

    format: str
    dtype: str
    axes: str
    shape: list[int]
    plane_axes: str
    planes: int
    width: int
    height: int
    channels: list[str]
    channel: str | None
    physical_pixel_size: PhysicalPixelSize | None


class PlaneScores(BaseModel):
    """One plane's position along the plane axes and its scores."""

    index: dict[str, int]
    metrics: SegmentationScores
    object_metrics: ObjectMetrics | None = None


class PlaneObjects(BaseModel):
    """One plane's position along the plane axes and its objects (ids restart per plane)."""

    index: dict[str, int]
    object_count: int
    objects: list[ObjectRow]


class StackResponse(_Answer):
    """The JSON answer for a stack: the mask as a base64 multi-page TIFF, scores per plane and
    over the whole stack."""

    image: StackInfo
    mask_tiff: str
    planes: list[PlaneScores] | None = None
    labels_tiff: str | None = Field(
        None, description="output=labels: the labels of each plane as a base64 TIFF"
    )
    plane_objects: list[PlaneObjects] | None = None
    plane_class_masks: list[dict[str, str]] | None = Field(
        None, description="per_class: each plane's 0/255 PNG per class (base64), in plane order"
    )
    plane_outlines_png: list[str] | None = Field(
        None, description="per_class with output=labels: each plane's objects' outlines"
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def object_metrics(
    scores: ObjectScores | None, truth_objects: str | None, labelled: ObjectScores | None = None
) -> ObjectMetrics | None:
    """The ``object_metrics`` of a JSON answer."""
    if scores is None or truth_objects is None:
        return None
    only = ObjectCounts(**labelled.as_dict()) if labelled is not None else None
    return ObjectMetrics(truth_objects=truth_objects, labelled_only=only, **scores.as_dict())


def _objects_common(segmentation: Segmentation) -> dict[str, object]:
    found = segmentation.objects
    if found is None:
        return {}
    return {
        "object_count": sum(found.counts),
        "object_metrics": object_metrics(found.scores, found.truth_objects, found.labelled_scores),
    }


def _labels_fields(segmentation: Segmentation, labels: tuple[bytes, str] | None) -> dict[str, str]:
    if labels is None:
        return {}
    data, media_type = labels
    return {"labels_png" if media_type == "image/png" else "labels_tiff": _b64(data)}


def _common(segmentation: Segmentation, request_id: str) -> dict[str, object]:
    model, params = segmentation.model, segmentation.params
    meta = model.meta
    total = max(sum(segmentation.class_counts), 1)
    threshold = None
    if meta.task is Task.BINARY:
        threshold = meta.threshold if params.threshold is None else params.threshold
    return {
        "request_id": request_id,
        "model": model.name,
        "version": meta.version,
        "precision": meta.precision,
        "provider": model.provider,
        "classes": meta.classes,
        "threshold": threshold,
        "overlap": params.overlap,
        "blend": params.blend,
        "tiles": segmentation.tiles,
        "class_fractions": {
            c: n / total for c, n in zip(meta.classes, segmentation.class_counts, strict=True)
        },
        "metrics": segmentation.scores,
        **_objects_common(segmentation),
        "scale": scale_info(segmentation.scale),
        "timings_ms": segmentation.timings_ms(),
    }


def segment_document(
    segmentation: Segmentation,
    png: bytes,
    class_masks: dict[str, bytes] | None,
    request_id: str,
    labels: tuple[bytes, str] | None = None,
    outlines: bytes | None = None,
) -> SegmentResponse:
    """The JSON answer for a 2-D image: the mask as base64 PNG, per-class PNGs on request,
    with ``labels`` (output=labels: the file and its media type) the labels and objects."""
    image = segmentation.image
    size = image.physical_size
    found = segmentation.objects
    rows = None
    if labels is not None and found is not None:
        rows = [ObjectRow(**row) for row in found.tables[0].rows()]
    return SegmentResponse(
        **_labels_fields(segmentation, labels),
        objects=rows,
        outlines_png=None if outlines is None else _b64(outlines),
        **_common(segmentation, request_id),
        image=ImageInfo(
            **attributes(image, "format dtype mode width height channels channel"),
            physical_pixel_size=None if size is None else size.as_dict(),
        ),
        mask_png=_b64(png),
        class_masks=None
        if class_masks is None
        else {name: _b64(data) for name, data in class_masks.items()},
    )


def stack_document(
    segmentation: Segmentation,
    tiff: bytes,
    request_id: str,
    labels: tuple[bytes, str] | None = None,
    plane_masks: list[dict[str, bytes]] | None = None,
    plane_outlines: list[bytes] | None = None,
) -> StackResponse:
    """The JSON answer for a stack: the mask as a base64 multi-page TIFF, scores per plane;
    with ``labels`` (output=labels) the labels TIFF and each plane's objects; with
    ``plane_masks`` (and ``plane_outlines``) each plane's class PNGs (and outlines)."""
    image = segmentation.image
    layout = image.layout
    assert layout is not None
    size = layout.physical_size
    found = segmentation.objects
    indices = [
        dict(zip(layout.plane_axes, map(int, pos), strict=True))
        for pos in np.ndindex(*layout.plane_shape)
    ]
    planes = None
    if segmentation.plane_scores is not None:
        per_plane: list[ObjectScores | None] = [None] * len(indices)
        if found is not None and found.plane_scores is not None:
            per_plane = list(found.plane_scores)
        truth_objects = found.truth_objects if found is not None else None
        planes = [
            PlaneScores(index=i, metrics=s, object_metrics=object_metrics(o, truth_objects))
            for i, s, o in zip(indices, segmentation.plane_scores, per_plane, strict=True)
        ]
    plane_objects = None
    if labels is not None and found is not None:
        plane_objects = [
            PlaneObjects(index=i, object_count=t.count, objects=[ObjectRow(**r) for r in t.rows()])
            for i, t in zip(indices, found.tables, strict=True)
        ]
    info = StackInfo(
        **attributes(layout, "axes plane_axes planes width height channels"),
        format=image.format,
        dtype=str(layout.dtype),
        shape=list(layout.shape),
        channel=image.channel,
        physical_pixel_size=None if size is None else PhysicalPixelSize(**size.as_dict()),
    )
    return StackResponse(
        **_common(segmentation, request_id),
        image=info,
        mask_tiff=_b64(tiff),
        planes=planes,
        labels_tiff=None if labels is None else _b64(labels[0]),
        plane_objects=plane_objects,
        plane_class_masks=None
        if plane_masks is None
        else [{name: _b64(png) for name, png in masks.items()} for masks in plane_masks],
        plane_outlines_png=None if plane_outlines is None else [_b64(p) for p in plane_outlines],
    )


class JobError(BaseModel):
    """Why a job failed: what ``POST /segment`` would have answered."""

    status: int
    code: ErrorCode
    detail: str


class JobStatus(BaseModel):
    """Where a job stands."""

    id: str
    state: JobState
    model: str
    request_id: str = Field(description="The ID of the POST that created the job")
    tiles_done: int
    tiles_total: int | None = Field(description="Known once the image is decoded")
    progress: float | None = Field(description="tiles_done / tiles_total")
    eta_seconds: float | None = Field(description="At the rate of the tiles done so far")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    expires_at: datetime | None = Field(description="When the result is deleted (TTL)")
    error: JobError | None
    status_url: str
    result_url: str


def _time(t: float | None) -> datetime | None:
    return None if t is None else datetime.fromtimestamp(t, UTC)


def job_status(
    job: Job, expires_at: float | None, error: JobError | None, jobs_path: str
) -> JobStatus:
    """The status document of ``job``."""
    total = job.tiles_total
    return JobStatus(
        **attributes(job, "id state model request_id tiles_done tiles_total"),
        progress=None if not total else round(job.tiles_done / total, 4),
        eta_seconds=job.eta_seconds(),
        created_at=_time(job.created),
        started_at=_time(job.started),
        finished_at=_time(job.finished),
        expires_at=_time(expires_at),
        error=error,
        status_url=f"{jobs_path}/{job.id}",
        result_url=f"{jobs_path}/{job.id}/result",
    )
