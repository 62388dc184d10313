"""An 8-bit preview of an uploaded image for people to look at (the page at ``/``).

Browsers show neither TIFF nor the range of a 16-bit microscope image (a HeLa frame looks
black), so the service makes the preview: decoded by the service's own decoder (the same
channel choice, limits and memory admission as ``/segment``), contrast-stretched between the
0.5th and 99.5th percentiles, and shrunk to at most ``max_side`` pixels a side. A stack previews
one plane (the first by default).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image

from service.segmentation.errors import InvalidParameterError
from service.segmentation.images import (
    ImageHeader,
    check_pixels,
    choose_channel,
    decode,
    probe,
)
from service.segmentation.memory import preview_memory

PERCENTILES = (0.5, 99.5)
_SAMPLE = 1 << 20  # pixels looked at for the percentiles


def stretch(pixels: np.ndarray) -> np.ndarray:
    """``(H, W, C)`` of any type to uint8, the percentile range mapped onto 0..255."""
    flat = pixels.reshape(-1)
    step = max(1, flat.size // _SAMPLE)
    low, high = np.percentile(flat[::step].astype(np.float64), PERCENTILES)
    if high <= low:
        high = low + 1.0
    scaled = (pixels.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    return np.clip(scaled, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class PreviewPlan:
    """An upload checked from its header for a preview, and what previewing it holds."""

    header: ImageHeader
    channel: int | None
    memory: int


def plan_preview(file: BinaryIO, *, max_pixels: int, channel: str | None = None) -> PreviewPlan:
    """The header checked as ``/segment`` checks it (format, pixel limit, channel)."""
    header = probe(file)
    check_pixels(header, max_pixels)
    index = choose_channel(header, channel, None)
    return PreviewPlan(header, index, preview_memory(header))


def preview_png(
    file: BinaryIO, plan: PreviewPlan, *, max_side: int, plane: int = 0
) -> tuple[bytes, int, int]:
    """The preview PNG of one plane (of a stack; the first by default), and the image's full
    width and height."""
    if not 0 <= plane < plan.header.planes:
        raise InvalidParameterError(
            f"plane {plane} is not a plane of this image: it has {plan.header.planes} "
            f"(0 to {plan.header.planes - 1})"
        )
    pixels = decode(file, plan.header, channel=plan.channel).planes[plane]
    height, width = pixels.shape[:2]
    if pixels.shape[2] == 2 or pixels.shape[2] > 4:
        pixels = pixels[..., :1]
    pixels = stretch(pixels[..., :3])
    img = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
    scale = max_side / max(height, width)
    if scale < 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        img = img.resize(size, Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue(), width, height
