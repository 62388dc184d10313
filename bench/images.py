"""Benchmark images: the held-out HeLa frames, larger images tiled from them, synthetic ones."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

HELA = Path("data/hela")
TEST_FRAMES = ("frame_017", "frame_018", "frame_019")


@dataclass
class BenchImage:
    """An image as the service receives it (TIFF bytes) and decoded, with its truth if any."""

    name: str
    pixels: np.ndarray  # (H, W, 1) uint16
    truth: np.ndarray | None  # (H, W) uint8 classes
    tiff: bytes

    @property
    def megapixels(self) -> float:
        """Pixels in millions."""
        return self.pixels.shape[0] * self.pixels.shape[1] / 1e6


def tiff_bytes(pixels: np.ndarray) -> bytes:
    """Uncompressed TIFF, as a microscope writes it."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, pixels[..., 0] if pixels.ndim == 3 else pixels)
    return buf.getvalue()


def synthetic(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Bright blobs on a noisy background, uint16 ``(H, W, 1)``: nucleus-like enough to run."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width), np.float32)
    for _ in range(max(4, height * width // 6000)):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(6, 14)
        image += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    noisy = image.clip(0, 1) * 3000 + 200 + rng.normal(0, 40, image.shape)
    return noisy.clip(0, 65535).astype(np.uint16)[..., None]


def mosaic(frames: list[np.ndarray], side: int) -> np.ndarray:
    """A ``side x side`` image tiled from frames (mirrored in turn so that edges continue)."""
    h, w = frames[0].shape[:2]
    rows = []
    k = 0
    for r in range(-(-side // h)):
        row = []
        for c in range(-(-side // w)):
            f = frames[k % len(frames)]
            k += 1
            f = f[::-1] if r % 2 else f
            f = f[:, ::-1] if c % 2 else f
            row.append(f)
        rows.append(np.concatenate(row, axis=1))
    return np.ascontiguousarray(np.concatenate(rows, axis=0)[:side, :side])


def load_images(quick: bool) -> tuple[list[BenchImage], list[BenchImage]]:
    """(held-out frames with truth, larger images). Quick mode: small synthetic images only."""
    if quick:
        small = synthetic(300, 420)
        truth = (small[..., 0] > 1500).astype(np.uint8)
        big = synthetic(640, 640, seed=1)
        return (
            [BenchImage("synthetic 420x300", small, truth, tiff_bytes(small))],
            [BenchImage("synthetic 640x640", big, None, tiff_bytes(big))],
        )
    from training.data import mask_to_classes, read_image, read_mask

    if not (HELA / "images" / f"{TEST_FRAMES[0]}.tif").is_file():
        raise SystemExit(
            "data/hela is missing: run `.venv/bin/segtrain fetch-data` first (or use --quick)"
        )
    frames = []
    for stem in TEST_FRAMES:
        pixels = read_image(HELA / "images" / f"{stem}.tif")
        truth = mask_to_classes(read_mask(HELA / "masks" / f"{stem}.tif"), "binary")
        frames.append(BenchImage(f"HeLa {stem}", pixels, truth, tiff_bytes(pixels)))
    large = []
    for side in (2048, 4096):
        pixels = mosaic([f.pixels for f in frames], side)
        large.append(BenchImage(f"mosaic {side}x{side}", pixels, None, tiff_bytes(pixels)))
    return frames, large
