"""Image in, class-index mask out: the one path both the service and the training evaluation use.

Normalisation statistics are computed once on the whole image; tiles are normalised as they are
cut and blended as probabilities before they are thresholded (binary) or arg-maxed (multiclass).
With a ``diameter`` the image is first rescaled to the model's training scale
(:mod:`service.inference.rescale`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.inference.instances import codes_from_classes, label_instances, speck_area
from service.inference.modelmeta import ModelMetadata, Task
from service.inference.normalize import compute_intensity_stats
from service.inference.rescale import ScalePlan, StripResampler, plan_scale, resize_image
from service.inference.tiling import BlendMode, Predictor, Reducer, sliding_window_inference


def make_reducer(
    meta: ModelMetadata, threshold: float | None = None, *, cores: bool = False
) -> Reducer:
    """Probability strip ``(rows, W, K)`` to a uint8 class-index strip ``(rows, W)``; with
    ``cores`` (a binary model that gives instances) to instance codes: 0 background,
    1 foreground, 2 foreground that is an object's core (:mod:`service.inference.instances`)."""
    if meta.task is Task.BINARY:
        thr = meta.threshold if threshold is None else threshold
        if cores and meta.instances is not None:
            seed = meta.instances.seed_threshold

            def reduce(strip: np.ndarray) -> np.ndarray:
                fg = strip[..., 0] >= thr
                codes = fg.astype(np.uint8)
                codes += fg & (strip[..., 1] >= seed)
                return codes

            return reduce
        return lambda strip: (strip[..., 0] >= thr).astype(np.uint8)
    return lambda strip: np.argmax(strip, axis=-1).astype(np.uint8)


def _first_channel(predictor: Predictor) -> Predictor:
    """``predictor`` with only its first output channel (a view: nothing is copied)."""
    return lambda tiles: predictor(tiles)[..., :1]


def as_hwc(image: np.ndarray) -> np.ndarray:
    """``(H, W)`` or ``(H, W, C)`` to ``(H, W, C)`` without copying."""
    return image[..., None] if image.ndim == 2 else image


def predict_mask(
    image: np.ndarray,
    meta: ModelMetadata,
    predictor: Predictor,
    *,
    batch_size: int = 8,
    overlap: float = 0.25,
    mode: BlendMode | str = BlendMode.GAUSSIAN,
    threshold: float | None = None,
    overlapped: bool = False,
    diameter: float | None = None,
    scale: ScalePlan | None = None,
    cores: bool = False,
) -> np.ndarray:
    """Segment a whole ``(H, W[, C])`` image into a ``(H, W)`` uint8 class-index mask.

    ``predictor`` maps normalised float32 tiles ``(N, t, t, C)`` to probabilities
    ``(N, t, t, K)``: an ONNX Runtime session in the service, a Keras model in training.
    With ``overlapped`` tiles are cut and normalised, and outputs blended, on helper threads
    while the predictor runs (:func:`sliding_window_inference`): for a predictor that leaves
    the CPU free (a GPU); the mask is the same.

    ``diameter``: the objects' diameter in pixels in this image. The image is resampled by
    ``meta.object_diameter / diameter`` (:func:`~service.inference.rescale.plan_scale`; a
    :class:`~service.inference.rescale.ScaleError` for a model without a training scale or a
    factor outside 0.1..10) and tiled at that size; the blended probabilities are resampled
    back to the exact ``(H, W)`` strip by strip, then thresholded or arg-maxed. The intensity
    statistics are always those of the original image. Factors within 1 +- 0.05 skip the
    resampling: the mask is then bit-identical to one without ``diameter``. A caller that has
    planned the rescaling already (the service, once per request) passes its ``scale``.

    ``cores``: a binary model that gives instances answers instance codes (0 background,
    1 foreground, 2 core) instead of 0/1 (see :func:`predict_instances`).
    """
    image = as_hwc(image)
    if image.shape[2] != meta.channels:
        raise ValueError(
            f"model {meta.name!r} expects {meta.channels} channel(s), image has {image.shape[2]}"
        )
    stats = compute_intensity_stats(image, meta.normalization)
    reduce = make_reducer(meta, threshold, cores=cores)
    if meta.task is Task.BINARY and not cores and meta.output_channels > 1:
        # The mask thresholds the first channel alone: an instance model's second (its cores)
        # is not blended, half the stitching work for the same mask, bit for bit.
        predictor = _first_channel(predictor)
    out_rows = None
    if scale is None and diameter is not None:
        scale = plan_scale(meta, diameter, image.shape[0], image.shape[1])
    if scale is not None and scale.resampled:
        scaled = (scale.scaled_height, scale.scaled_width)
        image = resize_image(image, scaled)
        reduce = StripResampler(scaled, (scale.height, scale.width), reduce)
        out_rows = scale.height
    return sliding_window_inference(
        image,
        roi_size=meta.tile_size,
        sw_batch_size=batch_size,
        predictor=predictor,
        overlap=overlap,
        mode=mode,
        reduce=reduce,
        prepare=stats.apply,
        overlapped=overlapped,
        out_rows=out_rows,
    )


@dataclass(frozen=True)
class InstanceMasks:
    """One plane's class-index mask and its instance labels (uint32, 0 background, 1..count)."""

    mask: np.ndarray
    labels: np.ndarray
    count: int
    seconds: float  # spent labelling (the watershed), after the model and stitching


def object_diameter(meta: ModelMetadata, scale: ScalePlan | None) -> float | None:
    """The objects' diameter in the image's pixels: the one a request gave (``diameter=``),
    else the model's training scale (the image is taken to be at it)."""
    return scale.diameter if scale is not None else meta.object_diameter


def predict_instances(
    image: np.ndarray,
    meta: ModelMetadata,
    predictor: Predictor,
    *,
    diameter: float | None = None,
    scale: ScalePlan | None = None,
    **options: Any,
) -> InstanceMasks:
    """:func:`predict_mask` and the instances of a model that gives them
    (``meta.instances``): the seeded watershed of
    :func:`~service.inference.instances.label_instances`, with the speck rule in the
    objects' size in this image (:func:`object_diameter`).
    ``options`` are :func:`predict_mask`'s."""
    spec = meta.instances
    if spec is None:
        raise ValueError(f"model {meta.name!r} does not give instances")
    if scale is None and diameter is not None:
        image = as_hwc(image)
        scale = plan_scale(meta, diameter, image.shape[0], image.shape[1])
    out = predict_mask(image, meta, predictor, scale=scale, cores=True, **options)
    binary = meta.task is Task.BINARY
    codes = out if binary else codes_from_classes(out, spec.seed_channel)
    start = time.perf_counter()
    size = object_diameter(meta, scale)
    halo = 64 if size is None else int(min(256, max(32, math.ceil(3 * size))))
    labels, count = label_instances(
        codes, min_area=speck_area(size, spec.min_area_fraction), halo=halo
    )
    if binary:
        out = np.minimum(codes, 1, out=codes)  # codes to the 0/1 mask, in place
    return InstanceMasks(out, labels, count, time.perf_counter() - start)
