"""One segmentation, the same for every entry point (``/segment``, ``/jobs``, ``/serverkit``, the
Ray Serve ingress, benchmarks and tests): an N-plane image (N = 1 for a 2-D image) through
plan → run; :mod:`service.segmentation.render` encodes what comes out.

- :func:`plan` reads the headers and checks everything that can be checked without decoding a
  pixel: the pixel limit (every plane, each counted as at least one tile, as the tiler really
  runs it), the channel, the parameters, the ground truth's shape, the rescaling for
  ``diameter`` (planned here, once). It counts the tiles and estimates the memory
  (:func:`~service.segmentation.memory.request_memory`).
- :func:`run` decodes, tiles, infers, stitches each plane, and scores against the truth. Its
  ``progress`` hook hears the tiles done between tile batches; whatever it raises stops the
  request there (how a cancelled job or a disconnected client stops the work).

Framework-free: domain errors (:mod:`service.segmentation.errors`) say what is wrong.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO

import numpy as np
from scipy import ndimage

from service.core.config import DEFAULT_OVERLAP
from service.inference.instances import ObjectTable, object_table
from service.inference.labels import LabelError, labels_to_classes
from service.inference.matching import ObjectScores, image_counts_both, object_scores
from service.inference.modelmeta import ModelMetadata, Task
from service.inference.normalize import histogram
from service.inference.pipeline import predict_instances, predict_mask
from service.inference.rescale import ScaleError, ScalePlan, plan_scale, scale_factor
from service.inference.scores import (
    SegmentationScores,
    get_stats,
    scores_from_stats,
    total_stats,
)
from service.inference.tiling import BlendMode, count_tiles
from service.segmentation.errors import (
    ImageTooLargeError,
    InvalidGroundTruthError,
    InvalidImageError,
    InvalidParameterError,
)
from service.segmentation.images import (
    ImageFacts,
    ImageHeader,
    check_pixels,
    choose_channel,
    decode,
    probe,
    to_channels,
)
from service.segmentation.memory import request_memory
from service.segmentation.registry import SegmentationModel

# Told (tiles done, tiles in all) before the first tile batch and after each; whatever it raises
# stops the request there (how a job is cancelled, or a request whose client went away).
ProgressHook = Callable[[int, int], None]


@dataclass
class SegmentParams:
    """What a request may choose; ``None`` means the model's or the service's default."""

    threshold: float | None = None
    overlap: float = DEFAULT_OVERLAP
    blend: BlendMode = BlendMode.GAUSSIAN
    batch_size: int = 8
    class_name: str | None = None  # answer this class's 0/255 mask instead of all classes
    diameter: float | None = None  # the objects' diameter in pixels: rescale to the model's
    labels: bool = False  # answer instance labels (output=labels) instead of the mask

    def check(self, name: str, meta: ModelMetadata) -> None:
        """An :class:`InvalidParameterError` when a choice does not apply to the model served as
        ``name``."""
        if self.labels and meta.instances is None:
            raise InvalidParameterError(
                f"output=labels needs a model that separates touching objects; {name!r} gives "
                "a mask only (GET /models lists each model's `instances`)"
            )
        if self.labels and self.class_name is not None:
            raise InvalidParameterError(
                "class_name picks one class's mask; it does not apply to output=labels"
            )
        if self.diameter is not None:
            try:
                scale_factor(meta, self.diameter, name)
            except ScaleError as exc:
                raise InvalidParameterError(exc.message) from None
        if self.threshold is not None and meta.task is not Task.BINARY:
            raise InvalidParameterError(
                f"threshold applies to binary models; {name!r} has {meta.num_classes} "
                "classes and takes the most probable class per pixel"
            )
        if self.class_name is not None and self.class_name not in meta.classes:
            raise InvalidParameterError(
                f"class_name {self.class_name!r} is not a class of model {name!r}: {meta.classes}"
            )

    def class_index(self, meta: ModelMetadata) -> int | None:
        """The index of ``class_name`` among the model's classes (None: every class)."""
        return None if self.class_name is None else meta.classes.index(self.class_name)

    def instances(self, meta: ModelMetadata, truth: bool) -> bool:
        """Whether the request's objects are labelled: asked for (``labels``), or to score
        them against a ground truth with a binary model that gives instances."""
        if meta.instances is None:
            return False
        return self.labels or (truth and meta.task is Task.BINARY)


@dataclass(frozen=True)
class Upload:
    """What a request sends: the image, optionally its ground truth, and the channel to
    segment (an index or an OME channel name) for a multi-channel TIFF. ``header`` is the
    image's header when the entry point has read it its own way (Server Kit's arrays, whose
    axes are told by their shape); otherwise :func:`plan` probes the file."""

    image: BinaryIO
    truth: BinaryIO | None = None
    channel: str | None = None
    header: ImageHeader | None = None

    def close(self) -> None:
        """Close the files (a job's, once it is done with them)."""
        self.image.close()
        if self.truth is not None:
            self.truth.close()


@dataclass(frozen=True)
class Plan:
    """A request checked and costed from its headers, before any pixel is decoded."""

    model: SegmentationModel
    params: SegmentParams
    image: ImageHeader
    channel: int | None  # the chosen channel's index; None: every channel
    truth: ImageHeader | None
    scale: ScalePlan | None  # with diameter=: how each plane is rescaled
    tiles: int  # model tiles, every plane
    memory: int  # bytes the request holds at its peak, above the idle process

    @property
    def stack(self) -> bool:
        """Several planes (a Z/T stack), whose mask is a multi-page TIFF."""
        return self.image.planes > 1

    @property
    def instances(self) -> bool:
        """Whether the objects are labelled (asked for, or scored against the truth)."""
        return self.params.instances(self.model.meta, self.truth is not None)

    @property
    def upload_bytes(self) -> int:
        """Bytes of the files uploaded (from their headers: the files are never seeked again
        but by the worker that decodes them)."""
        return self.image.file_bytes + (self.truth.file_bytes if self.truth is not None else 0)


def _scale_plan(
    model: SegmentationModel, params: SegmentParams, header: ImageHeader, max_pixels: int
) -> ScalePlan | None:
    """How each ``height x width`` plane is rescaled for ``diameter`` (None without one): an
    :class:`InvalidParameterError` when the model cannot, an :class:`ImageTooLargeError` when
    a rescaled plane is over the pixel limit, with the numbers and the smallest diameter that
    fits."""
    if params.diameter is None:
        return None
    height, width, name = header.height, header.width, model.name
    try:
        scale = plan_scale(model.meta, params.diameter, height, width, name)
    except ScaleError as exc:
        raise InvalidParameterError(exc.message) from None
    if scale.scaled_pixels > max_pixels:
        smallest = scale.model_diameter * math.sqrt(height * width / max_pixels)
        raise ImageTooLargeError(
            f"with diameter={scale.diameter:g} the {width}x{height} image is rescaled by "
            f"{scale.factor:.4g} to the training scale of model {name!r} "
            f"({scale.model_diameter:g} px objects): {scale.scaled_width}x"
            f"{scale.scaled_height} = {scale.scaled_pixels:,} pixels, over the limit of "
            f"{max_pixels:,} pixels per image (setting SEG_MAX_IMAGE_PIXELS). Send a crop, "
            f"or a diameter of at least {math.ceil(smallest * 100) / 100:g} px if that "
            "is true of the objects"
        )
    return scale


def _check_work(header: ImageHeader, height: int, width: int, tile: int, max_pixels: int) -> None:
    """The pixels the model really runs on against the limit: every plane of a stack is padded
    to at least one ``tile x tile`` tile, so a stack of tiny planes costs what its tiles cost.
    (A 2-D image is held to its own pixels: one padded tile is no attack.)"""
    work = header.planes * max(height, tile) * max(width, tile)
    if header.planes > 1 and work > max_pixels:
        raise ImageTooLargeError(
            f"the image is a stack of {header.planes:,} planes of {width}x{height} pixels "
            f"({header.describe()}); the model runs on each plane as at least one {tile}x{tile} "
            f"tile, {work:,} pixels in all, and this service runs at most {max_pixels:,} "
            "pixels per image (setting SEG_MAX_IMAGE_PIXELS). Send fewer, larger planes "
            "(e.g. a montage) or a part of the stack"
        )


def _check_truth_shape(image: ImageHeader, truth: ImageHeader) -> None:
    """The ground truth must have the image's planes and size (from both headers)."""
    if image.planes > 1:
        layout = image.layout
        assert layout is not None
        expected = f"{layout.plane_axes}YX {(*layout.plane_shape, layout.height, layout.width)}"
        if truth.layout is None:
            raise InvalidGroundTruthError(
                f"the image is a stack ({expected}); its ground truth must be a multi-page TIFF "
                "of the same shape"
            )
        t = truth.layout
        if (t.planes, t.height, t.width) != (layout.planes, layout.height, layout.width):
            raise InvalidGroundTruthError(
                f"the ground truth is {t.plane_axes}YX {(*t.plane_shape, t.height, t.width)} "
                f"but the image is {expected}; they must have the same planes and size"
            )
        return
    if truth.planes > 1:
        raise InvalidImageError(
            f"the ground truth is a multi-page TIFF, a stack of {truth.planes} planes "
            f"({truth.describe()}); a 2-D image's ground truth is one plane of the same size"
        )
    if (truth.height, truth.width) != (image.height, image.width):
        raise InvalidGroundTruthError(
            f"ground truth is {truth.width}x{truth.height} pixels but the image is "
            f"{image.width}x{image.height}; they must be the same size"
        )


def plan(
    model: SegmentationModel, upload: Upload, params: SegmentParams, *, max_pixels: int
) -> Plan:
    """Check ``upload`` with ``params`` against the limits and ``model`` from the headers alone,
    and cost it. Raises a :class:`~service.segmentation.errors.SegmentationInputError` (415,
    413 or 422 in HTTP) for anything that could never run."""
    meta = model.meta
    params.check(model.name, meta)
    header = upload.header or probe(upload.image, what="image")
    check_pixels(header, max_pixels, "image")
    channel = choose_channel(header, upload.channel, meta.channels)
    scale = _scale_plan(model, params, header, max_pixels)
    height, width = header.height, header.width
    if scale is not None:
        height, width = scale.scaled_height, scale.scaled_width
    _check_work(header, height, width, meta.tile_size, max_pixels)
    truth = None
    if upload.truth is not None:
        truth = probe(upload.truth, what="ground truth")
        check_pixels(truth, max_pixels, "ground truth")
        _check_truth_shape(header, truth)
    tiles = header.planes * count_tiles(height, width, meta.tile_size, params.overlap)
    memory = request_memory(
        meta,
        header,
        params.batch_size,
        truth,
        batch_bytes=model.request_bytes,
        scale=scale,
        instances=params.instances(meta, truth is not None),
    )
    return Plan(model, params, header, channel, truth, scale, tiles, memory)


@dataclass
class Segmentation:
    """The masks of every plane ``(N, H, W)`` and everything reported about how they were made;
    the one result of 2-D images and stacks alike."""

    model: SegmentationModel
    params: SegmentParams
    mask: np.ndarray
    image: ImageFacts
    scores: SegmentationScores | None  # the whole image's (every plane's pixels together)
    plane_scores: list[SegmentationScores] | None  # a stack's, plane by plane
    class_counts: list[int]  # pixels of each class in the mask
    tiles: int
    batches: list[int]
    timings: dict[str, float] = field(default_factory=dict)
    scale: ScalePlan | None = None
    objects: Objects | None = None  # the instances, when they were labelled

    @property
    def stack(self) -> bool:
        """Several planes: the mask is sent as a multi-page TIFF."""
        return self.image.planes > 1

    @property
    def pixels(self) -> int:
        """Image pixels segmented, every plane."""
        return int(self.mask.size)

    def timings_ms(self) -> dict[str, float]:
        """Stage durations in milliseconds, rounded for reading."""
        return {k: round(v * 1000.0, 3) for k, v in self.timings.items()}

    def pack(self) -> PackedSegmentation:
        """The segmentation with its mask (and labels) compressed, to be kept (a job's
        result)."""
        data = zlib.compress(np.ascontiguousarray(self.mask).tobytes(), 1)
        labels = None
        kept = replace(self, mask=np.empty((0,), np.uint8))
        if self.objects is not None:
            labels = zlib.compress(np.ascontiguousarray(self.objects.labels).tobytes(), 1)
            kept.objects = replace(self.objects, labels=np.empty((0,), np.uint32))
        return PackedSegmentation(kept, data, self.mask.shape, labels)


@dataclass
class Objects:
    """The instances of every plane: labels ``(N, H, W)`` uint32 (0 background, ids 1..count
    per plane), each plane's object table, and with a ground truth the object-level scores
    (the whole image's, and a stack's plane by plane)."""

    labels: np.ndarray
    tables: list[ObjectTable]
    scores: ObjectScores | None = None
    plane_scores: list[ObjectScores] | None = None
    truth_objects: str | None = None  # how the truth's objects were read
    # The same scores without the objects the border cuts and the truth leaves unlabelled.
    labelled_scores: ObjectScores | None = None

    @property
    def counts(self) -> list[int]:
        """Objects per plane."""
        return [t.count for t in self.tables]


@dataclass(frozen=True)
class PackedSegmentation:
    """A kept :class:`Segmentation`: its mask (and labels) as zlib-compressed bytes (a mask
    is mostly runs of equal values), unpacked when it is rendered."""

    summary: Segmentation
    data: bytes
    shape: tuple[int, ...]
    labels: bytes | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return len(self.data) + (len(self.labels) if self.labels is not None else 0)

    def unpack(self) -> Segmentation:
        """The segmentation with its mask."""
        mask = np.frombuffer(zlib.decompress(self.data), np.uint8).reshape(self.shape)
        out = replace(self.summary, mask=mask, timings=dict(self.summary.timings))
        if self.labels is not None and out.objects is not None:
            labels = np.frombuffer(zlib.decompress(self.labels), np.uint32).reshape(self.shape)
            out.objects = replace(out.objects, labels=labels)
        return out


def packed_bound(pixels: int, labels: bool = False) -> int:
    """An upper bound on :attr:`PackedSegmentation.nbytes` for a mask of ``pixels`` (and its
    uint32 labels): zlib's stored blocks (5 bytes per 16 KiB at worst) and its header."""
    raw = pixels * (5 if labels else 1)
    return raw + raw // 16384 * 5 + 2048


@dataclass
class _TimedModel:
    """A model as the tiler's predictor: records the time spent in it and each batch's size,
    and tells ``progress`` (tiles done, ``total``) before the first batch and after each."""

    model: SegmentationModel
    total: int
    progress: ProgressHook | None = None
    seconds: float = 0.0
    batches: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.progress is not None:
            self.progress(0, self.total)

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        out = self.model.predict(tiles)
        self.seconds += time.perf_counter() - start
        self.batches.append(int(tiles.shape[0]))
        if self.progress is not None:
            self.progress(sum(self.batches), self.total)
        return out


def overlap_host_work(model: SegmentationModel) -> bool:
    """Whether the tiler should cut, normalise and blend beside the model calls: when the model
    runs off this CPU (a GPU, another process). On the CPU, ONNX Runtime already uses every core
    and the helper threads only compete with it: measured in-process with the bundled model on
    2 cores, a 2048² image took 4.45 s overlapped against 4.12 s serial."""
    return model.provider != "CPUExecutionProvider"


def _truth_plane(truth: np.ndarray) -> np.ndarray:
    """A decoded ground-truth plane ``(H, W, C)`` as ``(H, W)`` whole-number labels, or an
    :class:`InvalidGroundTruthError` that says what was expected."""
    if truth.shape[2] != 1:
        if (
            truth.shape[2] >= 3
            and np.array_equal(truth[..., 0], truth[..., 1])
            and np.array_equal(truth[..., 0], truth[..., 2])
        ):
            truth = truth[..., :1]  # a grey mask saved as RGB
        else:
            raise InvalidGroundTruthError(
                f"ground truth must be a single-channel label image, got {truth.shape[2]} channels"
            )
    labels = truth[..., 0]
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.array_equal(labels, np.round(labels)):
            raise InvalidGroundTruthError("ground truth must hold whole-number labels")
        labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise InvalidGroundTruthError("ground truth has negative labels")
    return labels


def _truth_classes(labels: np.ndarray, meta: ModelMetadata) -> np.ndarray:
    """Ground-truth labels as a class-index map (the rule of
    :func:`~service.inference.labels.labels_to_classes`)."""
    try:
        return labels_to_classes(
            labels, meta.classes, binary=meta.task is Task.BINARY, label_values=meta.label_values
        )
    except LabelError as exc:
        raise InvalidGroundTruthError(f"ground truth has {exc}") from None


def _truth_objects(labels: np.ndarray) -> tuple[np.ndarray, bool]:
    """The truth's objects: its labels when it has two or more (instance labels), else the
    connected components of its foreground (a 0/1 or 0/255 mask); and whether it was labels."""
    positive = np.unique(labels)
    if np.count_nonzero(positive) >= 2:
        return labels, True
    components, _ = ndimage.label(labels > 0)
    return components, False


def _intensity(channels: np.ndarray) -> np.ndarray:
    """The ``(H, W)`` intensity objects are measured on: what the model saw, before
    normalisation (the mean of its channels for a multi-channel model)."""
    return channels[..., 0] if channels.shape[2] == 1 else channels.mean(axis=-1)


def _score_objects(found: Objects, truths: list[tuple[np.ndarray, bool]]) -> None:
    """Match each plane's objects to its truth's, and score (``found`` gets the scores)."""
    both = [image_counts_both(t, p) for (t, _), p in zip(truths, found.labels, strict=True)]
    found.scores = object_scores(counts for counts, _, _ in both)
    found.labelled_scores = object_scores(labelled for _, labelled, _ in both)
    if len(both) > 1:
        found.plane_scores = [object_scores([counts]) for counts, _, _ in both]
    found.truth_objects = (
        "instance labels" if any(k for _, k in truths) else "connected components of the mask"
    )


def run(plan: Plan, upload: Upload, progress: ProgressHook | None = None) -> Segmentation:
    """Segment every plane of the planned upload; label its objects when asked (or to score
    them); score it when a ground truth came with it."""
    model, params, meta = plan.model, plan.params, plan.model.meta
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    decoded = decode(upload.image, plan.image, channel=plan.channel)
    instances = params.instances(meta, upload.truth is not None)
    truth = truth_objects = None
    if upload.truth is not None and plan.truth is not None:
        # Decoded labels are freed as soon as their class maps (and objects) are made.
        planes = [
            _truth_plane(p)
            for p in decode(upload.truth, plan.truth, what="ground truth", labels=True).planes
        ]
        truth = np.stack([_truth_classes(p, meta) for p in planes])
        if instances:
            truth_objects = [_truth_objects(p) for p in planes]
        del planes
    t1 = time.perf_counter()
    timings["decode"] = t1 - t0

    timed = _TimedModel(model, plan.tiles, progress)
    n, h, w = decoded.planes.shape[:3]
    mask = np.empty((n, h, w), np.uint8)
    found = Objects(np.empty((n, h, w), np.uint32), []) if instances else None
    labelling = 0.0
    options: dict[str, Any] = {
        "batch_size": params.batch_size,
        "overlap": params.overlap,
        "mode": params.blend,
        "threshold": params.threshold,
        "overlapped": overlap_host_work(model),
        "scale": plan.scale,
    }
    try:
        for i, plane in enumerate(decoded.planes):
            channels = to_channels(plane, meta.channels)
            if found is None:
                mask[i] = predict_mask(channels, meta, timed, **options)
                continue
            got = predict_instances(channels, meta, timed, **options)
            mask[i], found.labels[i] = got.mask, got.labels
            start = time.perf_counter()
            found.tables.append(object_table(got.labels, got.count, _intensity(channels)))
            labelling += got.seconds + time.perf_counter() - start
    finally:  # also when the request is cancelled between two tile batches
        start = time.perf_counter()
        model.release_memory()
        timed.seconds += time.perf_counter() - start
    t2 = time.perf_counter()
    timings["infer"] = timed.seconds
    # tiling, normalising, blending, thresholding, and resampling with a diameter
    timings["stitch"] = (t2 - t1) - timed.seconds - labelling
    if found is not None:
        timings["instances"] = labelling
    scores = plane_scores = None
    if truth is not None:
        stats = [get_stats(m, t, meta.num_classes) for m, t in zip(mask, truth, strict=True)]
        scores = scores_from_stats(total_stats(stats), meta.classes)
        plane_scores = [scores_from_stats(s, meta.classes) for s in stats] if n > 1 else None
    if found is not None and truth_objects is not None:
        _score_objects(found, truth_objects)
    k = meta.num_classes
    counts = [int(c) for c in histogram(mask.reshape(-1, w), k)]
    timings["score"] = time.perf_counter() - t2
    return Segmentation(
        model=model,
        params=params,
        mask=mask,
        image=decoded.facts(),
        scores=scores,
        plane_scores=plane_scores,
        class_counts=counts,
        tiles=sum(timed.batches),
        batches=timed.batches,
        timings=timings,
        scale=plan.scale,
        objects=found if params.labels or truth_objects is not None else None,
    )


def segment(
    model: SegmentationModel,
    upload: Upload,
    params: SegmentParams,
    *,
    max_pixels: int,
    progress: ProgressHook | None = None,
) -> Segmentation:
    """Plan and run in one call, without admission: for benchmarks, scripts and tests."""
    return run(plan(model, upload, params, max_pixels=max_pixels), upload, progress)
