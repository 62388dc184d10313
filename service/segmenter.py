"""One segmentation request, start to finish, run in a worker thread: decode, tile, infer,
stitch, threshold or argmax, score against the ground truth, encode PNG.

Kept apart from the HTTP layer so that benchmarks and tests drive the exact pipeline in-process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from service.core.errors import ApiError
from service.images import DecodedImage, decode_image, encode_png, to_channels
from service.inference.metrics import SegmentationScores, score_segmentation
from service.inference.modelmeta import ModelMetadata, Task
from service.inference.pipeline import predict_mask
from service.inference.tiling import BlendMode
from service.registry import LoadedModel


@dataclass
class SegmentParams:
    """What a request may choose; ``None`` means the model's or the service's default."""

    threshold: float | None = None
    overlap: float = 0.25
    blend: BlendMode = BlendMode.GAUSSIAN
    batch_size: int = 8


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
    """A ground-truth image as a class-index map, or a 422 that says what was expected.

    Binary models: anything above 0 is foreground, so 0/1, 0/255 and instance labels all work.
    Multiclass models: class indices ``0..K-1``, or the pixel values the model was trained on
    (``label_values`` in its metadata).
    """
    if truth.shape[:2] != shape:
        raise ApiError(
            422,
            "invalid_ground_truth",
            f"ground truth is {truth.shape[1]}x{truth.shape[0]} pixels but the image is "
            f"{shape[1]}x{shape[0]}; they must be the same size",
        )
    if truth.shape[2] != 1:
        if (
            truth.shape[2] >= 3
            and np.array_equal(truth[..., 0], truth[..., 1])
            and np.array_equal(truth[..., 0], truth[..., 2])
        ):
            truth = truth[..., :1]  # a grey mask saved as RGB
        else:
            raise ApiError(
                422,
                "invalid_ground_truth",
                f"ground truth must be a single-channel label image, got {truth.shape[2]} channels",
            )
    labels = truth[..., 0]
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.array_equal(labels, np.round(labels)):
            raise ApiError(
                422, "invalid_ground_truth", "ground truth must hold whole-number labels"
            )
        labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise ApiError(422, "invalid_ground_truth", "ground truth has negative labels")
    if meta.task is Task.BINARY:
        return (labels > 0).astype(np.uint8)
    k = meta.num_classes
    present = np.unique(labels)
    if present.size and present.max() < k:
        return labels.astype(np.uint8)
    if meta.label_values is not None and set(present.tolist()) <= set(meta.label_values):
        lut = np.zeros(int(present.max()) + 1, np.uint8)
        for index, value in enumerate(meta.label_values):
            if value < lut.size:
                lut[value] = index
        return lut[labels]
    outside = [int(v) for v in present if v >= k][:10]
    expected = f"class indices 0..{k - 1} ({', '.join(meta.classes)})"
    if meta.label_values is not None:
        expected += f" or the label values {meta.label_values}"
    raise ApiError(
        422,
        "invalid_ground_truth",
        f"ground truth has labels {outside} outside the model's classes: expected {expected}",
    )


def segment(
    model: LoadedModel,
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
        truth_img = decode_image(truth_file, max_pixels=max_pixels, what="ground truth")
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
