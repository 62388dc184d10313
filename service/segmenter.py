"""One segmentation request, start to finish, run in a worker thread: decode, tile, infer,
stitch, threshold or argmax, score against the ground truth, encode PNG.

Kept apart from the HTTP layer so that benchmarks and tests drive the exact pipeline in-process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from service.exceptions import ImageTooLargeError, InvalidGroundTruthError, InvalidParameterError
from service.images import DecodedImage, ImageHeader, decode_image, encode_png, to_channels
from service.inference.labels import LabelError, labels_to_classes
from service.inference.metrics import SegmentationScores, score_segmentation
from service.inference.modelmeta import ModelMetadata, Task
from service.inference.normalize import HIST_CHUNK_PIXELS
from service.inference.pipeline import predict_mask
from service.inference.rescale import ScaleError, ScalePlan, plan_scale, rescale_bytes, scale_factor
from service.inference.tiling import BATCHES_IN_FLIGHT, BlendMode, count_tiles
from service.registry import SegmentationModel

# Told (tiles done, tiles in all) before the first tile batch and after each; whatever it raises
# stops the request there (how a job is cancelled between two tile batches).
ProgressHook = Callable[[int, int], None]


@dataclass
class SegmentParams:
    """What a request may choose; ``None`` means the model's or the service's default."""

    threshold: float | None = None
    overlap: float = 0.25
    blend: BlendMode = BlendMode.GAUSSIAN
    batch_size: int = 8
    class_name: str | None = None  # answer this class's 0/255 mask instead of all classes
    diameter: float | None = None  # the objects' diameter in pixels: rescale to the model's

    def check(self, name: str, meta: ModelMetadata) -> None:
        """An :class:`InvalidParameterError` when a choice does not apply to the model served as
        ``name``."""
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

    def scale_plan(
        self, name: str, meta: ModelMetadata, height: int, width: int, max_pixels: int
    ) -> ScalePlan | None:
        """How a ``height x width`` image (or each plane of a stack) is rescaled for
        ``diameter`` (None without one): an :class:`InvalidParameterError` when the model
        cannot, an :class:`ImageTooLargeError` when the rescaled image is over the pixel
        limit, with the numbers and the smallest diameter that fits."""
        if self.diameter is None:
            return None
        try:
            plan = plan_scale(meta, self.diameter, height, width, name)
        except ScaleError as exc:
            raise InvalidParameterError(exc.message) from None
        if plan.scaled_pixels > max_pixels:
            smallest = plan.model_diameter * math.sqrt(height * width / max_pixels)
            raise ImageTooLargeError(
                f"with diameter={plan.diameter:g} the {width}x{height} image is rescaled by "
                f"{plan.factor:.4g} to the training scale of model {name!r} "
                f"({plan.model_diameter:g} px objects): {plan.scaled_width}x"
                f"{plan.scaled_height} = {plan.scaled_pixels:,} pixels, over the limit of "
                f"{max_pixels:,} pixels per image (setting SEG_MAX_IMAGE_PIXELS). Send a crop, "
                f"or a diameter of at least {math.ceil(smallest * 100) / 100:g} px if that "
                "is true of the objects"
            )
        return plan

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
    scale: ScalePlan | None = None  # with diameter=: how the image was rescaled

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


def request_memory(
    meta: ModelMetadata,
    image: ImageHeader,
    batch_size: int,
    truth: ImageHeader | None = None,
    *,
    batch_bytes: int = 0,
    diameter: float | None = None,
) -> int:
    """An upper bound of the memory :func:`segment` plus encoding hold for this request on top
    of the idle process, from the headers alone: the larger of its two peaks, decoding and
    inference (the README's formula, term by term).

    With ``diameter`` (already checked against the model) the model runs on each plane
    rescaled: the tiler's strips are as wide as the rescaled plane, and the resampled plane and
    the resampling buffers (:func:`~service.inference.rescale.rescale_bytes`) come on top.

    ``batch_bytes`` is ONNX Runtime's memory for one tile batch, measured at warm-up
    (:attr:`SegmentationModel.request_bytes`). Checked against the real process by
    tests/test_budgets.py (the measured peak stays under it) and docs/memory.md.
    """
    hw = image.height * image.width
    t, c, k = meta.tile_size, meta.channels, meta.output_channels
    # Decoding: the decoder's own buffers beside the image, then the truth's beside both.
    decoding = image.decode_peak
    if truth is not None:  # then its labels are checked (np.unique sorts a copy)
        truth_peak = max(truth.decode_peak, 3 * truth.nbytes + hw)
        decoding = max(decoding, image.nbytes + truth_peak)
    held = image.nbytes  # the decoded image stays until the answer is encoded
    if image.channels != c:
        held += 4 * hw * c  # to_channels: one float32 plane per model channel
    if truth is not None:
        held += 3 * hw  # its class map, and boolean masks while scoring
    strip_width, rescaling = image.width, 0
    if diameter is not None:
        plan = plan_scale(meta, diameter, image.height, image.width)
        strip_width = plan.scaled_width
        samples = image.pixels * image.planes * image.channels
        sample_bytes = image.nbytes // samples if samples else 1
        if image.channels != c:
            sample_bytes = 4  # to_channels' output: at most a float32 sample
        rescaling = rescale_bytes(plan, c, sample_bytes, k, t)
    inference = (
        held
        + 2 * hw * image.planes  # the uint8 mask (every plane) and the copy that is encoded
        + 12 * t * strip_width * (k + 1)  # the probability and weight strips
        + rescaling  # the rescaled plane and the resampling buffers
        # tile batches in and out (float32, and a copy), as many as the overlapped tiler holds
        + BATCHES_IN_FLIGHT * 8 * batch_size * t * t * (c + k)
        + 8 * HIST_CHUNK_PIXELS  # the int64 histogram counts of one chunk of rows
        + batch_bytes  # ONNX Runtime's buffers for one tile batch, measured
    )
    return max(decoding, inference)


def overlap_host_work(model: SegmentationModel) -> bool:
    """Whether the tiler should cut, normalise and blend beside the model calls: when the model
    runs off this CPU (a GPU, another process). On the CPU, ONNX Runtime already uses every core
    and the helper threads only compete with it: measured in-process with the bundled model on
    2 cores, a 2048² image took 4.45 s overlapped against 4.12 s serial."""
    return model.provider != "CPUExecutionProvider"


@dataclass
class TimedModel:
    """A model as the tiler's predictor, recording the time spent in it and each batch's size,
    and telling ``progress`` (tiles done, ``total``) before the first batch and after each: the
    one predictor wrapper of 2-D images and stacks."""

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

    def predict_mask(self, pixels: np.ndarray, params: SegmentParams) -> np.ndarray:
        """One 2-D plane's class-index mask, with ``params``."""
        return predict_mask(
            pixels,
            self.model.meta,
            self,
            batch_size=params.batch_size,
            overlap=params.overlap,
            mode=params.blend,
            threshold=params.threshold,
            overlapped=overlap_host_work(self.model),
            diameter=params.diameter,
        )


def smallest_request_memory(model: SegmentationModel, batch_size: int) -> int:
    """What the smallest request (one 8-bit tile) needs, by :func:`request_memory`: at
    start-up, a budget below it means the model can serve nothing."""
    side = model.meta.tile_size
    header = ImageHeader("PNG", side, side, model.meta.channels, side * side)
    return request_memory(model.meta, header, batch_size, batch_bytes=model.request_bytes)


def segment(
    model: SegmentationModel,
    image_file: BinaryIO,
    params: SegmentParams,
    *,
    max_pixels: int,
    truth_file: BinaryIO | None = None,
    progress: ProgressHook | None = None,
    channel: str | None = None,
) -> SegmentResult:
    """Segment one uploaded image with ``model``; score it when a ground truth is given;
    ``progress`` hears how many tiles are done (see :data:`ProgressHook`); ``channel`` picks
    one channel of a multi-channel TIFF (an index or an OME channel name)."""
    meta = model.meta
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    decoded = decode_image(
        image_file,
        max_pixels=max_pixels,
        what="image",
        channel=channel,
        model_channels=meta.channels,
    )
    pixels = to_channels(decoded.pixels, meta.channels)
    scale = params.scale_plan(model.name, meta, pixels.shape[0], pixels.shape[1], max_pixels)
    truth = None
    if truth_file is not None:
        # The decoded truth is freed as soon as its class map is made.
        truth = ground_truth_classes(
            decode_image(
                truth_file, max_pixels=max_pixels, what="ground truth", labels=True
            ).pixels,
            meta,
            pixels.shape[:2],
        )
    t1 = time.perf_counter()
    timings["decode"] = t1 - t0

    height, width = pixels.shape[:2]
    if scale is not None:
        height, width = scale.scaled_height, scale.scaled_width
    total_tiles = count_tiles(height, width, meta.tile_size, params.overlap)
    timed = TimedModel(model, total_tiles, progress)
    mask = timed.predict_mask(pixels, params)
    t2 = time.perf_counter()
    timings["infer"] = timed.seconds
    # tiling, normalising, blending, thresholding, and resampling with a diameter
    timings["stitch"] = (t2 - t1) - timed.seconds
    scores = score_segmentation(mask, truth, meta.classes) if truth is not None else None
    timings["score"] = time.perf_counter() - t2
    return SegmentResult(
        mask=mask,
        image=decoded,
        scores=scores,
        tiles=sum(timed.batches),
        batches=timed.batches,
        timings=timings,
        scale=scale,
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
