"""Z and T stacks (multi-page TIFF, ImageJ hyperstacks, OME-TIFF), segmented plane by plane with
the 2-D model: the mask comes back as a multi-page TIFF with the image's plane axes, and with a
ground truth of the same shape, scores per plane and over the whole stack.

Each plane is one 2-D image to the pipeline (its own normalisation, tiling and stitching), so a
plane's mask is exactly what ``/segment`` gives for that plane sent alone.
"""

from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import tifffile
from pydantic import BaseModel

from service.exceptions import InvalidGroundTruthError, InvalidImageError, SegmentationInputError
from service.images import sniff_format, to_channels
from service.inference.metrics import (
    SegmentationScores,
    Stats,
    get_stats,
    scores_from_stats,
    total_stats,
)
from service.inference.modelmeta import ModelMetadata, Task
from service.inference.rescale import ScalePlan
from service.inference.tiling import BlendMode, count_tiles
from service.registry import SegmentationModel
from service.responses import Answer, ScaleInfo, answer_headers, render_answer, scale_info
from service.segmenter import (
    ProgressHook,
    SegmentParams,
    TimedModel,
    ground_truth_classes,
    segment,
)
from service.tiffstack import (
    TiffLayout,
    check_layout,
    read_layout,
    read_planes,
    resolve_channel,
)

_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def stack_layout(file: BinaryIO) -> TiffLayout | None:
    """The layout of an upload that is a TIFF of several planes; None for anything else (one
    plane, another format, or a file too damaged to tell: the 2-D decoder then says why)."""
    file.seek(0)
    head = file.read(4)
    file.seek(0)
    if head not in _TIFF_SIGNATURES:
        return None
    try:
        with tifffile.TiffFile(file, name="upload.tif") as tif:
            layout = read_layout(tif)
    except Exception:
        return None
    finally:
        file.seek(0)
    return layout if layout.planes > 1 else None


@dataclass
class DecodedStack:
    """Planes ``(N, H, W, C)`` and what the file was."""

    planes: np.ndarray
    layout: TiffLayout
    channel: int | None

    @property
    def height(self) -> int:
        """Rows of every plane together (``height * width`` counts the stack's pixels)."""
        return self.layout.planes * self.layout.height

    @property
    def width(self) -> int:
        """Columns of a plane."""
        return self.layout.width


def decode_stack(
    file: BinaryIO,
    *,
    max_pixels: int,
    what: str = "image",
    channel: str | None = None,
    model_channels: int | None = None,
) -> DecodedStack:
    """Decode a multi-plane TIFF: the pixel limit on the whole stack and the channel choice are
    checked from the header, before any pixel is decoded."""
    file.seek(0)
    sniff_format(file.read(32), what)
    file.seek(0)
    try:
        with tifffile.TiffFile(file, name="upload.tif") as tif:
            layout = read_layout(tif, what)
            check_layout(layout, max_pixels, what)
            index = resolve_channel(layout, channel, model_channels)
            planes = read_planes(tif, layout, index, what)
    except SegmentationInputError:
        raise
    except Exception as exc:  # tifffile raises many types for damaged files
        raise InvalidImageError(
            f"the {what} is a damaged or truncated TIFF ({type(exc).__name__})"
        ) from exc
    return DecodedStack(planes, layout, index)


@dataclass
class StackResult:
    """The mask of every plane ``(N, H, W)`` and what is reported about it."""

    mask: np.ndarray
    image: DecodedStack
    plane_scores: list[SegmentationScores] | None
    scores: SegmentationScores | None
    tiles: int
    batches: list[int]
    timings: dict[str, float] = field(default_factory=dict)
    scale: ScalePlan | None = None  # with diameter=: how each plane was rescaled

    def timings_ms(self) -> dict[str, float]:
        """Stage durations in milliseconds."""
        return {k: round(v * 1000.0, 3) for k, v in self.timings.items()}


def _truth_planes(
    file: BinaryIO, layout: TiffLayout, meta: ModelMetadata, max_pixels: int
) -> np.ndarray:
    """The ground truth as ``(N, H, W)`` class indices; it must be a stack of the image's
    shape."""
    file.seek(0)
    head = file.read(4)
    file.seek(0)
    expected = f"{layout.plane_axes}YX {(*layout.plane_shape, layout.height, layout.width)}"
    if head not in _TIFF_SIGNATURES:
        raise InvalidGroundTruthError(
            f"the image is a stack ({expected}); its ground truth must be a multi-page TIFF "
            "of the same shape"
        )
    truth = decode_stack(file, max_pixels=max_pixels, what="ground truth")
    t = truth.layout
    if (t.planes, t.height, t.width) != (layout.planes, layout.height, layout.width):
        raise InvalidGroundTruthError(
            f"the ground truth is {t.plane_axes}YX {(*t.plane_shape, t.height, t.width)} but "
            f"the image is {expected}; they must have the same planes and size"
        )
    shape = (layout.height, layout.width)
    return np.stack([ground_truth_classes(p, meta, shape) for p in truth.planes])


def segment_stack(
    model: SegmentationModel,
    image_file: BinaryIO,
    params: SegmentParams,
    *,
    max_pixels: int,
    channel: str | None = None,
    truth_file: BinaryIO | None = None,
    progress: ProgressHook | None = None,
) -> StackResult:
    """Segment every plane of a stack with ``model``; scores per plane and overall when a
    ground truth stack of the same shape is given."""
    meta = model.meta
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    stack = decode_stack(
        image_file,
        max_pixels=max_pixels,
        channel=channel,
        model_channels=meta.channels,
    )
    layout = stack.layout
    # Each plane is rescaled on its own: the pixel limit applies to one rescaled plane.
    scale = params.scale_plan(model.name, meta, layout.height, layout.width, max_pixels)
    truth = None
    if truth_file is not None:
        truth = _truth_planes(truth_file, layout, meta, max_pixels)
    t1 = time.perf_counter()
    timings["decode"] = t1 - t0

    height, width = layout.height, layout.width
    if scale is not None:
        height, width = scale.scaled_height, scale.scaled_width
    per_plane = count_tiles(height, width, meta.tile_size, params.overlap)
    total = per_plane * layout.planes
    timed = TimedModel(model, total, progress)
    mask = np.empty((layout.planes, layout.height, layout.width), np.uint8)
    try:
        for i, plane in enumerate(stack.planes):
            mask[i] = timed.predict_mask(to_channels(plane, meta.channels), params)
    finally:  # also when a job is cancelled between two tile batches
        start = time.perf_counter()
        model.release_memory()
        timed.seconds += time.perf_counter() - start
    t2 = time.perf_counter()
    timings["infer"] = timed.seconds
    timings["stitch"] = (t2 - t1) - timed.seconds
    plane_scores = scores = None
    if truth is not None:
        stats: list[Stats] = [
            get_stats(m, t, meta.num_classes) for m, t in zip(mask, truth, strict=True)
        ]
        plane_scores = [scores_from_stats(s, meta.classes) for s in stats]
        scores = scores_from_stats(total_stats(stats), meta.classes)
    timings["score"] = time.perf_counter() - t2
    return StackResult(
        mask, stack, plane_scores, scores, sum(timed.batches), timed.batches, timings, scale
    )


def encode_mask_tiff(
    mask: np.ndarray,
    layout: TiffLayout | None,
    meta: ModelMetadata,
    class_index: int | None = None,
) -> bytes:
    """The mask as a TIFF with the image's plane axes (``(planes..., H, W)``): 0/255 for binary
    models or one class, class indices otherwise; OME-TIFF (with the physical pixel size) when
    the plane axes are OME's (Z, T), else tifffile's shaped TIFF that records its axes."""
    if class_index is not None:
        values = (mask == class_index).astype(np.uint8) * np.uint8(255)
    elif meta.task is Task.BINARY:
        values = mask * np.uint8(255)
    else:
        values = mask
    plane_axes = layout.plane_axes if layout is not None else ""
    plane_shape = layout.plane_shape if layout is not None else ()
    values = values.reshape(*plane_shape, *mask.shape[-2:])
    axes = plane_axes + "YX"
    buf = io.BytesIO()
    metadata: dict[str, Any] = {"axes": axes}
    ome = all(a in "TZ" for a in plane_axes)
    if ome and layout is not None and layout.physical_size is not None:
        size = layout.physical_size
        for key, value in (("X", size.x), ("Y", size.y), ("Z", size.z)):
            if value is not None and (key != "Z" or "Z" in axes):
                metadata[f"PhysicalSize{key}"] = value
                metadata[f"PhysicalSize{key}Unit"] = size.unit
    tifffile.imwrite(
        buf, values, ome=ome, metadata=metadata, photometric="minisblack", compression="zlib"
    )
    return buf.getvalue()


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


class StackResponse(BaseModel):
    """The JSON answer for a stack: the mask as a base64 multi-page TIFF, scores per plane and
    over the whole stack."""

    request_id: str
    model: str
    version: str
    provider: str
    image: StackInfo
    classes: list[str]
    threshold: float | None
    overlap: float
    blend: BlendMode
    tiles: int
    class_fractions: dict[str, float]
    mask_tiff: str
    metrics: SegmentationScores | None = None
    planes: list[PlaneScores] | None = None
    scale: ScaleInfo | None = None
    timings_ms: dict[str, float]


def stack_info(stack: DecodedStack) -> StackInfo:
    """The ``image`` part of the answer."""
    layout = stack.layout
    size = layout.physical_size
    return StackInfo(
        format="OME-TIFF" if layout.ome else "TIFF",
        dtype=str(layout.dtype),
        axes=layout.axes,
        shape=list(layout.shape),
        plane_axes=layout.plane_axes,
        planes=layout.planes,
        width=layout.width,
        height=layout.height,
        channels=layout.channels,
        channel=None if stack.channel is None else layout.channels[stack.channel],
        physical_pixel_size=None if size is None else PhysicalPixelSize(**size.as_dict()),
    )


@dataclass
class StackAnswer:
    """A segmented stack with its TIFF encoded, ready to be sent as TIFF or JSON."""

    model: SegmentationModel
    params: SegmentParams
    result: StackResult
    tiff: bytes

    def headers(self) -> dict[str, str]:
        """See :func:`~service.responses.answer_headers` (the means are the whole stack's)."""
        result = self.result
        return answer_headers(self.model, result.timings_ms(), result.scores, result.scale)

    def document(self, request_id: str) -> StackResponse:
        """The JSON answer."""
        meta, result = self.model.meta, self.result
        k = meta.num_classes
        counts = np.bincount(result.mask.ravel(), minlength=k)[:k]
        total = max(int(counts.sum()), 1)
        layout = result.image.layout
        planes = None
        if result.plane_scores is not None:
            positions = np.ndindex(*layout.plane_shape)
            axes = layout.plane_axes
            planes = [
                PlaneScores(index=dict(zip(axes, map(int, pos), strict=True)), metrics=s)
                for pos, s in zip(positions, result.plane_scores, strict=True)
            ]
        binary = meta.task is Task.BINARY
        return StackResponse(
            request_id=request_id,
            model=self.model.name,
            version=meta.version,
            provider=self.model.provider,
            image=stack_info(result.image),
            classes=meta.classes,
            threshold=(meta.threshold if self.params.threshold is None else self.params.threshold)
            if binary
            else None,
            overlap=self.params.overlap,
            blend=self.params.blend,
            tiles=result.tiles,
            class_fractions={c: int(n) / total for c, n in zip(meta.classes, counts, strict=True)},
            mask_tiff=base64.b64encode(self.tiff).decode("ascii"),
            metrics=result.scores,
            planes=planes,
            scale=scale_info(result.scale),
            timings_ms=result.timings_ms(),
        )


def render_stack(
    model: SegmentationModel, params: SegmentParams, result: StackResult
) -> StackAnswer:
    """Encode the stack's mask (one class's with ``params.class_name``); the ``encode`` stage."""
    start = time.perf_counter()
    tiff = encode_mask_tiff(
        result.mask, result.image.layout, model.meta, params.class_index(model.meta)
    )
    result.timings["encode"] = time.perf_counter() - start
    return StackAnswer(model, params, result, tiff)


def segment_upload(
    model: SegmentationModel,
    image_file: BinaryIO,
    params: SegmentParams,
    *,
    max_pixels: int,
    layout: TiffLayout | None,
    channel: str | None = None,
    per_class: bool = False,
    truth_file: BinaryIO | None = None,
    progress: ProgressHook | None = None,
) -> Answer | StackAnswer:
    """One upload, start to finish: a stack (``layout`` from :func:`stack_layout`) plane by
    plane, anything else as one 2-D image; ``/segment`` and ``/jobs`` both go through here."""
    if layout is not None:
        stack = segment_stack(
            model,
            image_file,
            params,
            max_pixels=max_pixels,
            channel=channel,
            truth_file=truth_file,
            progress=progress,
        )
        return render_stack(model, params, stack)
    result = segment(
        model,
        image_file,
        params,
        max_pixels=max_pixels,
        truth_file=truth_file,
        progress=progress,
        channel=channel,
    )
    return render_answer(model, params, result, per_class=per_class)
