"""Image in, class-index mask out: the one path both the service and the training evaluation use.

Normalisation statistics are computed once on the whole image; tiles are normalised as they are
cut and blended as probabilities before they are thresholded (binary) or arg-maxed (multiclass).
With a ``diameter`` the image is first rescaled to the model's training scale
(:mod:`service.inference.rescale`).
"""

from __future__ import annotations

import numpy as np

from service.inference.modelmeta import ModelMetadata, Task
from service.inference.normalize import compute_intensity_stats
from service.inference.rescale import ScalePlan, StripResampler, plan_scale, resize_image
from service.inference.tiling import BlendMode, Predictor, Reducer, sliding_window_inference


def make_reducer(meta: ModelMetadata, threshold: float | None = None) -> Reducer:
    """Probability strip ``(rows, W, K)`` to a uint8 class-index strip ``(rows, W)``."""
    if meta.task is Task.BINARY:
        thr = meta.threshold if threshold is None else threshold
        return lambda strip: (strip[..., 0] >= thr).astype(np.uint8)
    return lambda strip: np.argmax(strip, axis=-1).astype(np.uint8)


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
    """
    image = as_hwc(image)
    if image.shape[2] != meta.channels:
        raise ValueError(
            f"model {meta.name!r} expects {meta.channels} channel(s), image has {image.shape[2]}"
        )
    stats = compute_intensity_stats(image, meta.normalization)
    reduce = make_reducer(meta, threshold)
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
