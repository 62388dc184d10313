"""BBBC038 importer (``segtrain fetch-data --bbbc038``): modalities, instance labels, the split.

A small zip in BBBC038's layout is made here; one test reads the real zip where CI has it
(``../shared/data/bbbc038/stage1_train.zip``) and skips with a reason where it does not.
"""

from __future__ import annotations

import io
import itertools
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from tests.conftest import BBBC038_ZIP as REAL_ZIP
from training.bbbc038 import (
    COLOUR_SPREAD,
    import_bbbc038,
    instance_labels,
    modality,
    read_manifest,
    read_zip,
)
from training.cli import main
from training.config import TrainConfig

SHAPE = (40, 48)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _discs(seed: int, touching: bool = False) -> list[np.ndarray]:
    """Binary masks of 3 nuclei (the first two touching when asked)."""
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    rng = np.random.default_rng(seed)
    centres = [(12, 12), (12, 21)] if touching else [(10, 10), (10, 36)]
    centres.append((int(rng.integers(26, 32)), int(rng.integers(12, 36))))
    return [((yy - y) ** 2 + (xx - x) ** 2 <= 20).astype(np.uint8) * 255 for y, x in centres]


def _image(masks: list[np.ndarray], kind: str, seed: int) -> np.ndarray:
    """An RGBA image as BBBC038 stores it: grey (R = G = B) or colour, alpha 255."""
    rng = np.random.default_rng(seed)
    fg = np.any([m > 0 for m in masks], axis=0)
    noise = rng.normal(0, 4, SHAPE)
    if kind == "fluorescence":
        grey = 20 + 150 * fg + noise
        rgb = np.repeat(grey[..., None], 3, axis=2)
    elif kind == "brightfield":
        grey = 200 - 120 * fg + noise
        rgb = np.repeat(grey[..., None], 3, axis=2)
    else:  # H&E: pink background, purple nuclei
        rgb = np.where(fg[..., None], [90, 40, 140], [230, 170, 200]) + noise[..., None]
    rgba = np.concatenate([rgb.clip(0, 255), np.full((*SHAPE, 1), 255)], axis=2)
    return rgba.astype(np.uint8)


KINDS = ["fluorescence"] * 7 + ["histology"] * 2 + ["brightfield"] * 2


def make_zip(path: Path) -> dict[str, str]:
    """A stage1_train-like zip; returns each id's modality. Image ``f0`` has touching nuclei and
    a fourth mask that overlaps the first."""
    truth = {}
    with zipfile.ZipFile(path, "w") as zf:
        for i, kind in enumerate(KINDS):
            image_id = f"{kind[0]}{i:02d}{'a' * 8}"
            masks = _discs(i, touching=i == 0)
            if i == 0:
                overlap = np.zeros(SHAPE, np.uint8)
                overlap[10:14, 8:12] = 255  # inside the first nucleus
                masks.append(overlap)
            zf.writestr(f"{image_id}/images/{image_id}.png", _png(_image(masks[:3], kind, i)))
            for k, mask in enumerate(masks):
                zf.writestr(f"{image_id}/masks/m{k:02d}.png", _png(mask))
            truth[image_id] = kind
    return truth


def test_instance_labels_keep_the_earlier_mask_and_count_overlaps() -> None:
    a = np.zeros((4, 4), np.uint8)
    a[:2, :2] = 255
    b = np.zeros((4, 4), np.uint8)
    b[1:3, 1:3] = 1
    labels, overlap = instance_labels([a, b], (4, 4))
    assert labels.dtype == np.uint16 and overlap == 1
    assert labels[1, 1] == 1  # the later mask does not overwrite the earlier one
    assert (labels == 2).sum() == 3 and (labels == 1).sum() == 4
    with pytest.raises(ValueError, match="mask 1 is"):
        instance_labels([np.zeros((2, 2))], (4, 4))


def test_modality_rule() -> None:
    masks = _discs(0)
    fg = np.any([m > 0 for m in masks], axis=0)
    for kind in ("fluorescence", "brightfield", "histology"):
        found, spread, contrast = modality(_image(masks, kind, 0)[..., :3], fg)
        assert found == kind
        assert (spread > COLOUR_SPREAD) == (kind == "histology")
        assert (contrast > 0) == (kind == "fluorescence")


def test_import_writes_fluorescence_grey_with_instance_labels(tmp_path: Path) -> None:
    truth = make_zip(tmp_path / "stage1_train.zip")
    entries = import_bbbc038(tmp_path / "stage1_train.zip", tmp_path / "data")
    assert {e.id: e.modality for e in entries} == truth
    root = tmp_path / "data" / "bbbc038"
    fluo = sorted(i for i, k in truth.items() if k == "fluorescence")
    assert sorted(p.stem for p in (root / "images").iterdir()) == fluo
    assert sorted(p.stem for p in (root / "masks").iterdir()) == fluo
    first = fluo[0]
    image = tifffile.imread(root / "images" / f"{first}.tif")
    labels = tifffile.imread(root / "masks" / f"{first}.tif")
    assert image.shape == SHAPE and image.dtype == np.uint8  # one grey channel
    assert labels.shape == SHAPE and labels.dtype == np.uint16
    # The two touching nuclei stay two objects; the overlapping 4th mask keeps no pixel.
    assert sorted(np.unique(labels).tolist()) == [0, 1, 2, 3]
    row = next(e for e in entries if e.id == first)
    assert row.objects == 3 and row.overlap_pixels == 16
    ys, xs = np.nonzero(labels == 1)
    assert np.any(labels[ys, xs + 1] == 2)  # they touch
    # The manifest has every image, the split only for what was imported.
    manifest = read_manifest(root / "manifest.csv")
    assert manifest == entries
    assert {e.id for e in manifest if e.split} == set(fluo)
    assert sum(e.split == "test" for e in manifest) == 1


def test_split_is_seeded_stable_and_the_configs(tmp_path: Path) -> None:
    make_zip(tmp_path / "stage1_train.zip")
    first = import_bbbc038(tmp_path / "stage1_train.zip", tmp_path / "a")
    again = import_bbbc038(tmp_path / "stage1_train.zip", tmp_path / "a")  # a re-import
    other = import_bbbc038(tmp_path / "stage1_train.zip", tmp_path / "b", seed=1)
    assert [e.split for e in first] == [e.split for e in again]
    assert [e.split for e in first] != [e.split for e in other]
    # What the training config draws for the folder is the manifest's split.
    folder = str(tmp_path / "a" / "bbbc038")
    config = TrainConfig(
        name="x", data_dir=folder, sources=[folder], source_splits={folder: "random"}
    )
    by_id = {e.id: e.split for e in first}
    for name, pairs in config.splits().items():
        assert pairs and all(by_id[p.stem] == name for p in pairs)


def test_cli_imports_and_reports_the_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_zip(tmp_path / "stage1_train.zip")
    data = tmp_path / "data"
    assert main(["fetch-data", "--bbbc038", str(tmp_path / "stage1_train.zip"), "--data-dir",
                 str(data)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "fluorescence: 7 image(s), 21 nuclei, 1 image(s) with overlapping masks" in out
    assert "histology: 2 image(s)" in out and "brightfield: 2 image(s)" in out
    assert "'test': 1" in out and (data / "bbbc038" / "manifest.csv").is_file()
    with pytest.raises(SystemExit, match="no file"):
        main(["fetch-data", "--bbbc038", str(tmp_path / "missing.zip")])


@pytest.mark.skipif(not REAL_ZIP.is_file(), reason=f"BBBC038 is not at {REAL_ZIP}")
def test_the_real_zip() -> None:
    """The real stage1_train.zip: its layout, and the first images read, labelled and told
    apart (a few only: the whole import takes about 40 s on 2 cores)."""
    with zipfile.ZipFile(REAL_ZIP) as zf:
        names = zf.namelist()
    ids = {n.split("/")[0] for n in names if "/images/" in n}
    assert len(ids) == 623
    for entry, rgb, labels in itertools.islice(read_zip(REAL_ZIP), 6):
        assert rgb.shape == (entry.height, entry.width, 3) and labels.dtype == np.uint16
        masks = sum(n.startswith(f"{entry.id}/masks/") for n in names)
        assert 0 < entry.objects <= masks
        assert entry.modality in {"fluorescence", "brightfield", "histology"}
        grey = bool(np.array_equal(rgb[..., 0], rgb[..., 1]))
        assert grey == (entry.modality != "histology")
