"""``segtrain train|release --data-dir DIR`` on a lab's own folder: every problem reported before
training starts, the task inferred from the masks, a seeded random split, and a released model
served with no other configuration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from service.segmentation.registry import find_model_files
from tests.conftest import decode_png, running_app, tiff_bytes
from training.cli import main
from training.data import Pair, split_random
from training.folder import DataFolderError, inspect_folder


def disks(shape: tuple[int, int], seed: int, n: int = 5) -> np.ndarray:
    """Instance labels: ``n`` disks numbered 1..n."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.uint16)
    for k in range(1, n + 1):
        cy, cx = rng.integers(8, shape[0] - 8), rng.integers(8, shape[1] - 8)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= 36] = k
    return labels


def image_for(labels: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (1000 + 150 * rng.standard_normal(labels.shape) + 3000 * (labels > 0)).astype(np.uint16)


def make_folder(root: Path, n: int = 5, shape: tuple[int, int] = (64, 80)) -> Path:
    """A lab-like folder: 16-bit TIFF images, instance-label masks, one mask as PNG."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for i in range(n):
        labels = disks(shape, i)
        tifffile.imwrite(root / "images" / f"cells_{i:02d}.tif", image_for(labels, i))
        if i == 0:
            Image.fromarray(labels.astype(np.uint8)).save(root / "masks" / f"cells_{i:02d}.png")
        else:
            tifffile.imwrite(root / "masks" / f"cells_{i:02d}.tif", labels)
    return root


def problems_of(folder: Path, classes: list[str] | None = None) -> list[str]:
    with pytest.raises(DataFolderError) as info:
        inspect_folder(folder, classes)
    return info.value.problems


# --- checks before training -------------------------------------------------------------------


def test_every_problem_is_reported_at_once_naming_the_file(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "data", n=6)
    (folder / "images" / "extra_image.tif").write_bytes(
        (folder / "images/cells_01.tif").read_bytes()
    )
    tifffile.imwrite(folder / "masks" / "orphan.tif", np.zeros((8, 8), np.uint8))
    problems = problems_of(folder)
    assert problems == [
        "image extra_image.tif has no mask in masks/",
        "mask orphan.tif has no image in images/",
    ]
    (folder / "images" / "extra_image.tif").unlink()
    (folder / "masks" / "orphan.tif").unlink()
    (folder / "images" / "cells_01.tif").write_bytes(b"not a tiff at all")
    tifffile.imwrite(folder / "masks" / "cells_02.tif", np.zeros((64, 70), np.uint16))
    rgb = np.stack([image_for(disks((64, 80), 3), 3)] * 3, -1).astype(np.uint8)
    tifffile.imwrite(folder / "images" / "cells_03.tif", rgb)
    tifffile.imwrite(folder / "masks" / "cells_04.tif", np.full((64, 80), 0.5, np.float32))
    problems = problems_of(folder)
    text = "\n".join(problems)
    assert "image cells_01.tif cannot be read" in text
    assert "cells_02: image cells_02.tif is 80x64 but mask cells_02.tif is 70x64" in text
    assert "mask cells_04.tif holds fractional values" in text
    assert "mixed channel counts" in text and "cells_03.tif" in text
    assert len(problems) == 4, problems


def test_labels_outside_the_named_classes_and_too_few_images(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "data", n=2)
    problems = problems_of(folder, ["background", "a", "b"])
    assert any(
        p.startswith("mask cells_01.tif has labels [3, 4, 5] outside the 3 classes")
        for p in problems
    )
    assert problems[-1].startswith("2 image pair(s): at least 3 are needed")


def test_the_cli_stops_before_training_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = make_folder(tmp_path / "data", n=2)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["release", "mycells", "--data-dir", str(folder), "--models-dir", "models"])
    assert "cannot train on" in str(info.value) and "at least 3 are needed" in str(info.value)
    assert not (tmp_path / "models").exists() and not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit, match=r"is not a preset .*give --data-dir"):
        main(["train", "mycells"])


# --- what is inferred -------------------------------------------------------------------------


def test_instance_masks_are_binary(tmp_path: Path) -> None:
    found = inspect_folder(make_folder(tmp_path / "data"))
    assert found.mask_mode == "binary" and found.classes == ["background", "foreground"]
    assert found.channels == 1 and found.images == 5
    assert "instance labels" in found.notes[0]


def test_class_maps_and_named_classes(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for i in range(3):
        labels = disks((64, 80), i, n=6)
        classes = np.where(labels == 0, 0, np.where(labels % 2 == 0, 255, 128)).astype(np.uint8)
        Image.fromarray(image_for(labels, i).astype(np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(classes).save(root / "masks" / f"{i}.png")
    found = inspect_folder(root)
    assert found.mask_mode == "labels" and found.label_values == [0, 128, 255]
    assert found.classes == ["background", "class128", "class255"]
    named = inspect_folder(root, ["background", "round", "square"])
    assert named.classes == ["background", "round", "square"]
    assert named.label_values == [0, 128, 255]
    assert inspect_folder(root, ["background", "cell"]).mask_mode == "binary"


def test_random_split_is_seeded_disjoint_and_complete() -> None:
    pairs = [Pair(f"s{i:02d}", Path(f"i{i}"), Path(f"m{i}")) for i in range(20)]
    a, b = split_random(pairs, seed=3), split_random(pairs, seed=3)
    assert a == b and split_random(pairs, seed=4) != a
    stems = [p.stem for part in a.values() for p in part]
    assert sorted(stems) == [p.stem for p in pairs]
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (14, 3, 3)


def test_dot_folders_in_the_model_directory_are_not_models(tmp_path: Path) -> None:
    (tmp_path / ".staging-x-123" / "x" / "1").mkdir(parents=True)
    (tmp_path / ".staging-x-123" / "x" / "1" / "model.onnx").write_bytes(b"")
    assert find_model_files(tmp_path) == {}


# --- one command, end to end ------------------------------------------------------------------


@pytest.mark.slow
def test_release_a_model_from_a_folder_and_serve_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = make_folder(tmp_path / "my-cells", n=5)
    monkeypatch.chdir(tmp_path)
    args = [
        "release",
        "--data-dir",
        str(folder),
        "--tile-size",
        "32",
        "--depth",
        "2",
        "--base-filters",
        "4",
        "--max-filters",
        "8",
        "--batch-size",
        "4",
        "--epochs",
        "1",
        "--steps-per-epoch",
        "2",
        "--max-minutes",
        "5",
    ]
    assert main(args) == 0
    models = tmp_path / "models"
    assert sorted(p.name for p in models.iterdir()) == ["my-cells"]  # no staging left behind
    model_dir = models / "my-cells"
    assert (model_dir / "1" / "model.onnx").is_file()
    assert (model_dir / "README.md").is_file()
    assert (model_dir / "1" / "training_curves.png").is_file()
    card = (model_dir / "README.md").read_text()
    assert "my-cells" in card
    image = tifffile.imread(folder / "images" / "cells_04.tif")
    with running_app(models, default_model="my-cells") as client:
        listed = client.get("/models").json()["models"]
        assert [m["name"] for m in listed] == ["my-cells"]
        assert listed[0]["metadata"]["classes"] == ["background", "foreground"]
        r = client.post("/segment", files={"image": ("c.tif", tiff_bytes(image))})
        assert r.status_code == 200, r.text
        assert np.asarray(decode_png(r.content)).shape == image.shape


def test_segtrain_without_the_train_extra_says_which_extra_and_exits_2(tmp_path: Path) -> None:
    """``make serve``'s install has no TensorFlow: a command that needs it says so in one line
    (no traceback) and exits 2."""
    script = (
        "import sys; sys.modules['tensorflow'] = None\n"  # an install without the train extra
        "from training.cli import main\n"
        f"sys.exit(main(['train', 'nuclei', '--runs-dir', {str(tmp_path)!r}]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("segtrain: train needs the train extra"), done.stderr
    assert "pip install -e '.[train,cpu]'" in lines[-1] and "Traceback" not in done.stderr
