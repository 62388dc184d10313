"""The in-process cases: (1) the tutorial way in Keras, (2) raw ONNX Runtime on the service's
tiles, (3) the service's pipeline from TIFF bytes to PNG bytes."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from service.inference.modelmeta import ModelMetadata, Task
from service.inference.normalize import compute_intensity_stats
from service.inference.scores import get_stats, scores_from_stats, total_stats
from service.inference.tiling import iter_tile_batches
from service.segmentation.registry import LoadedModel
from service.segmentation.render import encode_mask
from service.segmentation.usecase import Segmentation, SegmentParams, Upload, segment


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall seconds of one call, and its result."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


# --- (1) the tutorial way ----------------------------------------------------------------------


def tutorial_predict(
    keras_model: Any, pixels: np.ndarray, meta: ModelMetadata, batch_size: int = 8
) -> np.ndarray:
    """What users come from: pad to a multiple of the tile, cut non-overlapping patches
    (``patchify``), ``model.predict``, put the patches back (``unpatchify``), threshold.

    Normalisation is the same whole-image percentile scaling as the service's, so that only the
    tiling and the runtime differ. The patch borders show as seams.
    """
    t = meta.tile_size
    height, width, channels = pixels.shape
    image = compute_intensity_stats(pixels, meta.normalization).apply(pixels)
    image = np.pad(image, ((0, -height % t), (0, -width % t), (0, 0)))
    ny, nx = image.shape[0] // t, image.shape[1] // t
    patches = (
        image.reshape(ny, t, nx, t, channels).transpose(0, 2, 1, 3, 4).reshape(-1, t, t, channels)
    )
    probs = np.asarray(keras_model.predict(patches, batch_size=batch_size, verbose=0))
    k = probs.shape[-1]
    full = probs.reshape(ny, nx, t, t, k).transpose(0, 2, 1, 3, 4).reshape(ny * t, nx * t, k)
    full = full[:height, :width]
    if meta.task is Task.BINARY:  # channel 0 is the foreground (1 is the cores, if any)
        return (full[..., 0] >= meta.threshold).astype(np.uint8)
    return np.argmax(full, axis=-1).astype(np.uint8)


def tutorial_tiles(shape: tuple[int, ...], tile: int) -> int:
    """Patches the tutorial way cuts."""
    return -(-shape[0] // tile) * -(-shape[1] // tile)


# --- (2) raw ONNX Runtime ----------------------------------------------------------------------


def service_batches(
    pixels: np.ndarray, meta: ModelMetadata, overlap: float, batch_size: int
) -> list[np.ndarray]:
    """Exactly the tiles the service runs (same positions, same normalisation), pre-cut."""
    stats = compute_intensity_stats(pixels, meta.normalization)
    return [
        np.ascontiguousarray(stats.apply(tiles))
        for tiles, _ in iter_tile_batches(pixels, meta.tile_size, batch_size, overlap)
    ]


def run_raw(model: LoadedModel, batches: list[np.ndarray]) -> int:
    """Push pre-cut batches through the session; the tile count."""
    for batch in batches:
        model.session.run([model.output_name], {model.input_name: batch})
    return sum(len(b) for b in batches)


# --- (3) the service's pipeline ----------------------------------------------------------------


def run_pipeline(
    model: LoadedModel, tiff: bytes, batch_size: int, overlap: float = 0.25
) -> tuple[Segmentation, bytes, float]:
    """TIFF bytes to PNG bytes through ``service.segmentation.usecase``: the request minus HTTP."""
    result = segment(
        model,
        Upload(io.BytesIO(tiff)),
        SegmentParams(batch_size=batch_size, overlap=overlap),
        max_pixels=1 << 31,
    )
    start = time.perf_counter()
    png = encode_mask(result, tiff=False)
    return result, png, time.perf_counter() - start


def iou(preds: list[np.ndarray], truths: list[np.ndarray], classes: list[str]) -> dict[str, float]:
    """Foreground and mean IoU over all pixels of all images (per-image counts summed)."""
    counts = (get_stats(p, t, len(classes)) for p, t in zip(preds, truths, strict=True))
    scores = scores_from_stats(total_stats(counts), classes)
    return {
        "foreground": float(scores.iou[classes[1]] or 0.0),
        "mean": float(scores.mean_iou or 0.0),
    }
