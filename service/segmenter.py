"""One segmentation request, start to finish, run in a worker thread: decode, tile, infer,
stitch, threshold or argmax, score against the ground truth, encode PNG.

Kept apart from the HTTP layer so that benchmarks and tests drive the exact pipeline in-process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from service.exceptions import InvalidGroundTruthError, InvalidParameterError
from service.images import DecodedImage, decode_image, encode_png, to_channels
from service.inference.labels import LabelError, labels_to_classes
from service.inference.metrics import SegmentationScores, score_segmentation
from service.inference.modelmeta import ModelMetadata, Task
from service.inference.pipeline import predict_mask
from service.inference.tiling import BlendMode
from service.registry import SegmentationModel


@dataclass
class SegmentParams:
    """What a request may choose; ``None`` means the model's or the service's default."""

    threshold: float | None = None
    overlap: float = 0.25
    blend: BlendMode = BlendMode.GAUSSIAN
    batch_size: int = 8
    class_name: str | None = None  # answer this class's 0/255 mask instead of all classes

    def check(self, name: str, meta: ModelMetadata) -> None:
        """An :class:`InvalidParameterError` when a choice does not apply to the model served as
        ``name``."""
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


@dataclass
class SegmentResult:
    """The mask and everything reported about how it was made."""

    mask: np.ndarray
    image: DecodedImage
    scores: SegmentationScores | None
    tiles: int
    batches: list[int]
    timings: dict[str, float] = field(default_factory=dict)

    def timings_ms(self) -> dict[str, float]:
        """Stage durations in milliseconds, rounded for reading."""
        return {k: round(v * 1000.0, 3) for k, v in self.timings.items()}


def ground_truth_classes(
    truth: np.ndarray, meta: ModelMetadata, shape: tuple[int, int]
) -> np.ndarray:
    """A decoded ground truth as a class-index map (the rule of
    :func:`~service.inference.labels.labels_to_classes`), or an
    :class:`InvalidGroundTruthError` that says what was expected."""
    if truth.shape[:2] != shape:
        raise InvalidGroundTruthError(
            f"ground truth is {truth.shape[1]}x{truth.shape[0]} pixels but the image is "
            f"{shape[1]}x{shape[0]}; they must be the same size"
        )
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
    try:
        return labels_to_classes(
            labels,
            meta.classes,
            binary=meta.task is Task.BINARY,
            label_values=meta.label_values,
        )
    except LabelError as exc:
        raise InvalidGroundTruthError(f"ground truth has {exc}") from None


def segment(
    model: SegmentationModel,
    image_file: BinaryIO,
    params: SegmentParams,
    *,
    max_pixels: int,
    truth_file: BinaryIO | None = None,
) -> SegmentResult:
    """Segment one uploaded image with ``model``; score it when a ground truth is given."""
    meta = model.meta
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    decoded = decode_image(image_file, max_pixels=max_pixels, what="image")
    pixels = to_channels(decoded.pixels, meta.channels)
    truth = None
    if truth_file is not None:
        truth_img = decode_image(
            truth_file, max_pixels=max_pixels, what="ground truth", labels=True
        )
        truth = ground_truth_classes(truth_img.pixels, meta, pixels.shape[:2])
    t1 = time.perf_counter()
    timings["decode"] = t1 - t0

    batches: list[int] = []
    infer_time = 0.0

    def timed_predict(tiles: np.ndarray) -> np.ndarray:
        nonlocal infer_time
        start = time.perf_counter()
        out = model.predict(tiles)
        infer_time += time.perf_counter() - start
        batches.append(int(tiles.shape[0]))
        return out

    mask = predict_mask(
        pixels,
        meta,
        timed_predict,
        batch_size=params.batch_size,
        overlap=params.overlap,
        mode=params.blend,
        threshold=params.threshold,
    )
    start = time.perf_counter()
    model.release_memory()  # SEG_CPU_MEMORY_ARENA=shrink: the request's buffers, back
    infer_time += time.perf_counter() - start
    t2 = time.perf_counter()
    timings["infer"] = infer_time
    timings["stitch"] = (t2 - t1) - infer_time  # tiling, normalising, blending, thresholding
    scores = score_segmentation(mask, truth, meta.classes) if truth is not None else None
    timings["score"] = time.perf_counter() - t2
    return SegmentResult(
        mask=mask,
        image=decoded,
        scores=scores,
        tiles=sum(batches),
        batches=batches,
        timings=timings,
    )


def render_mask(
    result: SegmentResult, meta: ModelMetadata, class_index: int | None = None
) -> bytes:
    """The PNG a client receives: 0/255 for binary models (or one class), a palette otherwise."""
    if class_index is not None:
        return encode_png((result.mask == class_index).astype(np.uint8) * 255)
    if meta.task is Task.BINARY:
        return encode_png(result.mask * np.uint8(255))
    return encode_png(result.mask, palette=True)
