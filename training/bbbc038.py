"""BBBC038 (Kaggle Data Science Bowl 2018, ``stage1_train.zip``): the importer behind
``segtrain fetch-data --bbbc038 PATH/stage1_train.zip``.

The zip, as users download it from the Broad Bioimage Benchmark Collection
(https://bbbc.broadinstitute.org/BBBC038), holds one folder per image id:
``<id>/images/<id>.png`` (an RGBA PNG) and ``<id>/masks/<n>.png`` (one binary PNG per nucleus).
Fluorescence, brightfield and H&E images are mixed; only fluorescence is written for training.

Modality rule (measured on every image, recorded per image in ``manifest.csv``):

1. **colour**: the mean over pixels of ``max(R, G, B) - min(R, G, B)`` is above
   ``COLOUR_SPREAD`` (8-bit units). Grey images store R = G = B, so theirs is exactly 0; the
   H&E images of stage1_train are stained purple and pink, far above it. Colour -> ``histology``.
2. otherwise **nuclei brighter than background**: the mean grey level inside the union of the
   nucleus masks minus the mean outside it (``contrast``) is > 0 -> ``fluorescence``;
   nuclei darker than their surroundings -> ``brightfield``.

Instance labels: each nucleus PNG becomes one label (1, 2, ... in the order of the sorted mask
file names). Where masks overlap, the earlier label keeps the pixel (a later mask never
overwrites one before it); the overlapping pixels are counted in the manifest.

Split: by image, seeded, with the same function the training config uses for a folder of
independent images (:func:`training.data.split_random`, fractions 0.15 / 0.15, seed 0) over the
fluorescence ids sorted, so ``manifest.csv``'s ``split`` column is exactly what
``TrainConfig.splits()`` draws for ``data/bbbc038`` with ``source_splits`` ``random``.
"""

from __future__ import annotations

import csv
import io
import re
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from training.data import Pair, split_random

# Mean channel spread (8-bit units) above which an image counts as colour (H&E); grey is 0.
COLOUR_SPREAD = 2.0
SPLIT_SEED = 0
VAL_FRACTION = 0.15
TEST_FRACTION = 0.15
MANIFEST = "manifest.csv"
DATASET = "bbbc038"

_IMAGE = re.compile(r"^(?:[^/]+/)*?([0-9a-zA-Z_-]+)/images/\1\.png$")


@dataclass
class Entry:
    """One image of the zip as the manifest records it."""

    id: str
    modality: str  # fluorescence | brightfield | histology
    height: int
    width: int
    objects: int  # nuclei with at least one pixel in the label image
    overlap_pixels: int  # pixels claimed by more than one mask (kept by the earlier mask)
    spread: float  # mean max(RGB) - min(RGB)
    contrast: float  # mean grey inside the masks minus outside
    split: str  # train | val | test for fluorescence; "" for what is not imported


def _png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img)


def _rgb(pixels: np.ndarray) -> np.ndarray:
    """An image PNG as ``(H, W, 3)`` uint8 (alpha, always opaque in stage1_train, dropped)."""
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    if pixels.dtype != np.uint8:
        raise ValueError(f"expected an 8-bit image, got {pixels.dtype}")
    return pixels[..., :3]


def instance_labels(masks: list[np.ndarray], shape: tuple[int, int]) -> tuple[np.ndarray, int]:
    """uint16 labels from one binary mask per nucleus (label i + 1 for ``masks[i]``); an
    earlier mask keeps overlapping pixels. Returns the labels and the overlapping pixel count."""
    if len(masks) >= 2**16:
        raise ValueError(f"{len(masks)} masks do not fit 16-bit labels")
    labels = np.zeros(shape, np.uint16)
    flat = labels.reshape(-1)
    overlap = 0
    for i, mask in enumerate(masks, start=1):
        if mask.shape != shape:
            raise ValueError(f"mask {i} is {mask.shape}, the image {shape}")
        # One pass over the image per mask (a nucleus is a few hundred of its pixels), then
        # work on those pixels only: the import reads 28 000 masks.
        on = np.flatnonzero(mask > 0)  # on a bool array: 20x faster than on uint8
        free = flat[on] == 0
        overlap += on.size - int(np.count_nonzero(free))
        flat[on[free]] = i
    return labels, overlap


def modality(rgb: np.ndarray, foreground: np.ndarray) -> tuple[str, float, float]:
    """``(modality, spread, contrast)`` by the module's rule (see the docstring)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]  # channel by channel: reductions over a
    # last axis of 3 are several times slower
    spread = float((np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)).mean())
    grey = (r.astype(np.float64) + g + b) / 3
    inside = float(grey[foreground].mean()) if foreground.any() else 0.0
    outside = float(grey[~foreground].mean()) if (~foreground).any() else 0.0
    contrast = inside - outside
    if spread > COLOUR_SPREAD:
        return "histology", spread, contrast
    return ("fluorescence" if contrast > 0 else "brightfield"), spread, contrast


def _members(zf: zipfile.ZipFile) -> dict[str, tuple[str, list[str]]]:
    """``id -> (image member, sorted mask members)`` for every image of the zip."""
    names = zf.namelist()
    out: dict[str, tuple[str, list[str]]] = {}
    for name in names:
        if m := _IMAGE.match(name):
            out[m.group(1)] = (name, [])
    for name in names:
        parts = name.split("/")
        if len(parts) >= 3 and parts[-2] == "masks" and name.endswith(".png"):
            image_id = parts[-3]
            if image_id in out:
                out[image_id][1].append(name)
    if not out:
        raise ValueError("no <id>/images/<id>.png in the zip: is it BBBC038's stage1_train.zip?")
    for _, masks in out.values():
        masks.sort()
    return dict(sorted(out.items()))


def read_zip(path: Path) -> Iterator[tuple[Entry, np.ndarray, np.ndarray]]:
    """``(entry, rgb, labels)`` for each image of the zip, sorted by id (split still empty)."""
    with zipfile.ZipFile(path) as zf:
        for image_id, (image_name, mask_names) in _members(zf).items():
            rgb = _rgb(_png(zf.read(image_name)))
            shape = (rgb.shape[0], rgb.shape[1])
            masks = [_png(zf.read(n)) for n in mask_names]
            masks = [m[..., 0] if m.ndim == 3 else m for m in masks]
            labels, overlap = instance_labels(masks, shape)
            kind, spread, contrast = modality(rgb, labels > 0)
            objects = int(np.count_nonzero(np.bincount(labels.ravel())[1:]))
            entry = Entry(
                id=image_id,
                modality=kind,
                height=shape[0],
                width=shape[1],
                objects=objects,
                overlap_pixels=overlap,
                spread=round(spread, 3),
                contrast=round(contrast, 3),
                split="",
            )
            yield entry, rgb, labels


def assign_splits(entries: list[Entry], seed: int = SPLIT_SEED) -> None:
    """Fill ``split`` of the fluorescence entries as ``TrainConfig.splits()`` will draw them."""
    fluo = sorted(e.id for e in entries if e.modality == "fluorescence")
    pairs = [Pair(i, Path(f"{i}.tif"), Path(f"{i}.tif")) for i in fluo]
    by_id = {e.id: e for e in entries}
    for name, part in split_random(pairs, VAL_FRACTION, TEST_FRACTION, seed).items():
        for pair in part:
            by_id[pair.stem].split = name


def import_bbbc038(zip_path: Path, data_dir: Path, seed: int = SPLIT_SEED) -> list[Entry]:
    """Write the fluorescence images (one grey channel, uint8 TIFF) and their uint16 instance
    labels to ``data_dir/bbbc038/{images,masks}`` and every image's row to its manifest."""
    root = data_dir / DATASET
    out_img, out_msk = root / "images", root / "masks"
    for folder in (out_img, out_msk):
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.tif"):  # a re-import must not leave stale pairs behind
            old.unlink()
    entries = []
    for entry, rgb, labels in read_zip(zip_path):
        entries.append(entry)
        if entry.modality == "fluorescence":
            grey = rgb[..., 0]
            if not (np.array_equal(grey, rgb[..., 1]) and np.array_equal(grey, rgb[..., 2])):
                grey = np.round(rgb.mean(axis=2)).astype(np.uint8)
            tifffile.imwrite(out_img / f"{entry.id}.tif", np.ascontiguousarray(grey))
            tifffile.imwrite(out_msk / f"{entry.id}.tif", labels)
    assign_splits(entries, seed)
    write_manifest(entries, root / MANIFEST)
    return entries


def write_manifest(entries: list[Entry], path: Path) -> None:
    """One row per image of the zip (``split`` empty for what was not imported)."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(entries[0])))
        writer.writeheader()
        writer.writerows(asdict(e) for e in entries)


def read_manifest(path: Path) -> list[Entry]:
    """The manifest written by :func:`import_bbbc038`."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [
        Entry(
            id=r["id"],
            modality=r["modality"],
            height=int(r["height"]),
            width=int(r["width"]),
            objects=int(r["objects"]),
            overlap_pixels=int(r["overlap_pixels"]),
            spread=float(r["spread"]),
            contrast=float(r["contrast"]),
            split=r["split"],
        )
        for r in rows
    ]


def summary(entries: list[Entry]) -> dict[str, dict[str, int]]:
    """Images and nuclei per modality, and the fluorescence split sizes."""
    out: dict[str, dict[str, int]] = {}
    for e in entries:
        row = out.setdefault(e.modality, {"images": 0, "objects": 0, "overlap_images": 0})
        row["images"] += 1
        row["objects"] += e.objects
        row["overlap_images"] += e.overlap_pixels > 0
    splits: dict[str, int] = {}
    for e in entries:
        if e.split:
            splits[e.split] = splits.get(e.split, 0) + 1
    out["split"] = splits
    return out
