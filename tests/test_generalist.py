"""Training a generalist from several sources: edge placement, augmentation, per-source reports.

The bundled ``nuclei`` model is trained on three sources and tested on a fourth it never saw;
these tests check the parts that make that possible on small generated data, with real Keras
training, a real ONNX export and real ONNX Runtime evaluation.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import tifffile
from scipy import ndimage

from service.inference.modelmeta import ModelMetadata
from training.boundary import boundary_bias, edge_level, edge_profile
from training.config import ArchOptions, Augmentation, TrainConfig
from training.data import object_diameters, training_scale

# ------------------------------------------------------------------------------ edge placement


def _discs(shape: tuple[int, int], centres: list[tuple[int, int]], r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    for k, (cy, cx) in enumerate(centres, start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
    return labels


CENTRES = [(30, 30), (30, 90), (90, 30), (90, 90)]


def test_a_perfect_mask_has_no_edge_bias() -> None:
    labels = _discs((120, 120), CENTRES, 12)
    bias = boundary_bias(labels > 0, labels).as_dict()
    assert bias["matched_objects"] == bias["truth_objects"] == 4
    assert bias["median_area_ratio"] == 1.0
    assert bias["mean_signed_distance_px"] == 0.0


@pytest.mark.parametrize("grow", [1, 2, 3])
def test_a_halo_and_a_shrunken_mask_are_measured_in_pixels(grow: int) -> None:
    labels = _discs((120, 120), CENTRES, 12)

    def radius(r: float) -> float:  # a digital disc's equivalent radius: sqrt(area / pi)
        return float(np.sqrt((_discs((40, 40), [(20, 20)], r) > 0).sum() / np.pi))

    for r in (12 + grow, 12 - grow):
        bias = boundary_bias(_discs((120, 120), CENTRES, r) > 0, labels).as_dict()
        assert bias["median_area_ratio"] == pytest.approx((radius(r) / radius(12)) ** 2, rel=1e-3)
        shift = radius(r) - radius(12)  # about +-grow
        assert bias["mean_signed_distance_px"] == pytest.approx(shift, abs=0.25)


def test_missed_and_merged_nuclei_are_detection_errors_not_edge_errors() -> None:
    labels = _discs((120, 120), CENTRES, 12)
    pred = labels > 0
    pred[labels == 4] = False  # one nucleus missed
    pred[28:33, 30:91] = True  # two nuclei merged by a bridge
    bias = boundary_bias(pred, labels).as_dict()
    assert bias["truth_objects"] == 4
    assert bias["matched_objects"] == 1  # only the untouched nucleus 3 measures edges
    assert bias["mean_signed_distance_px"] == 0.0


def test_edge_level_says_where_annotators_drew_the_edge() -> None:
    # A blurred disc: labels at the half-maximum contour sit near 0.5; one pixel wider, lower.
    yy, xx = np.mgrid[:100, :100]
    dist = np.hypot(yy - 50, xx - 50)
    image = 100 + 1000 / (1 + np.exp((dist - 20) / 1.5))
    tight = (dist <= 20).astype(np.int32)
    loose = (dist <= 22).astype(np.int32)
    assert edge_level(image, tight) == pytest.approx(0.5, abs=0.15)
    assert edge_level(image, loose) < edge_level(image, tight) - 0.2  # type: ignore[operator]
    assert edge_level(image, np.zeros_like(tight)) is None


def test_edge_profile_tells_a_sharp_edge_from_a_glow() -> None:
    yy, xx = np.mgrid[:100, :100]
    dist = np.hypot(yy - 50, xx - 50)
    labels = (dist <= 20).astype(np.int32)
    sharp = edge_profile(100 + 1000 / (1 + np.exp((dist - 20.5) / 0.4)), labels)
    glow = edge_profile(100 + 1000 / (1 + np.exp((dist - 20.5) / 2.0)), labels)
    assert sharp is not None and glow is not None
    assert set(sharp) == set(range(-4, 5))
    assert sharp[-4] == pytest.approx(1.0, abs=0.02) and sharp[4] == pytest.approx(0.0, abs=0.02)
    # Three pixels out the sharp nucleus is gone; the blurred one still glows.
    assert sharp[3] < 0.05 and glow[3] > 0.2 and glow[2] > sharp[2] + 0.2


def test_object_diameters_of_instance_and_binary_masks() -> None:
    labels = _discs((120, 120), CENTRES, 12)
    for mask in (labels, (labels > 0).astype(np.uint8)):
        d = object_diameters(mask)
        assert len(d) == 4 and np.allclose(d, 24, atol=1.0)


# ---------------------------------------------------------------------------- augmentation


def _frames(scale: float) -> list:  # type: ignore[type-arg]
    from training.dataset import Frame

    labels = _discs((160, 200), [(40, 40), (40, 140), (110, 60), (120, 150)], 14 * scale)
    image = (labels > 0).astype(np.float32)[..., None]
    return [Frame("f", image, (labels > 0).astype(np.uint8), "a")]


def test_zoomed_patches_keep_labels_on_their_nuclei() -> None:
    """Patches cut at 0.5-2x and resized to the tile: the image (here equal to its labels)
    and the labels are resized alike, flipped and rotated alike."""
    import tensorflow as tf

    from training.dataset import train_dataset

    aug = Augmentation(scale_min=0.5, scale_max=2.0)
    ds = train_dataset(_frames(1.0), 64, 16, 2, seed=3, fg_bias=0.8, augmentation=aug)
    x, y = next(iter(ds))
    assert x.shape == (16, 64, 64, 1) and y.shape == (16, 64, 64, 1)
    # Gain, offset and gamma move the image; it stays monotonic in the label, so a threshold
    # halfway between the two levels of each patch recovers the labels up to resampled edges.
    for xi, yi in zip(np.asarray(x), np.asarray(y), strict=True):
        if 0 < yi.mean() < 1:
            lo, hi = xi[yi == 0].min(), xi[yi == 1].max()
            recovered = xi > (lo + hi) / 2
            assert (recovered == (yi > 0.5)).mean() > 0.97
    # The same seed gives the same batches (stateless ops, seeded crops).
    again = next(iter(train_dataset(_frames(1.0), 64, 16, 2, 3, fg_bias=0.8, augmentation=aug)))
    assert tf.reduce_all(again[0] == x) and tf.reduce_all(again[1] == y)


def test_degradations_blur_and_add_noise_to_the_image_only() -> None:
    import tensorflow as tf

    from training.dataset import degrade

    image = tf.constant((_discs((64, 64), [(32, 32)], 12) > 0).astype(np.float32)[..., None])
    seed = tf.constant([1, 2], tf.int64)
    blurred = degrade(image, seed, Augmentation(blur_max_sigma=1.5, probability=1.0))
    edge = np.asarray(blurred)[32, 18:22, 0]
    assert 0 < edge.min() < edge.max() < 1  # a soft edge, not a step
    noisy = degrade(image, seed, Augmentation(poisson=True, probability=1.0))
    assert float(tf.math.reduce_std(noisy - image)) > 0.01
    unchanged = degrade(image, seed, Augmentation(blur_max_sigma=1.5, probability=0.0))
    assert tf.reduce_all(unchanged == image)


def test_sources_are_drawn_by_their_weights_not_their_size() -> None:
    from training.dataset import Frame, random_patches

    def frame(source: str, side: int) -> Frame:
        image = np.zeros((side, side, 1), np.float32)
        return Frame(source, image + len(source), np.zeros((side, side), np.uint8), source)

    # One small and one large source: equally often by default, 3:1 with weights.
    frames = [frame("a", 64), frame("bb", 256), frame("bb", 256)]
    for weights, share in ((None, 0.5), ({"a": 3.0}, 0.75)):
        patches = random_patches(frames, 64, seed=0, source_weights=weights)
        drawn = [float(next(patches)[0][0, 0, 0]) for _ in range(2000)]
        assert np.mean([d == 1.0 for d in drawn]) == pytest.approx(share, abs=0.04)


def test_percentile_jitter_draws_the_services_statistics() -> None:
    from service.inference.modelmeta import Normalization
    from training.data import Pair
    from training.dataset import JITTER_HIGH, JITTER_LOW, load_frames, random_patches

    rng = np.random.default_rng(0)
    image = rng.integers(100, 4000, (64, 64), dtype=np.uint16)
    labels = _discs((64, 64), [(32, 32)], 20).astype(np.uint16)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tifffile.imwrite(Path(tmp) / "i.tif", image)
        tifffile.imwrite(Path(tmp) / "m.tif", labels)
        pair = Pair("x", Path(tmp) / "i.tif", Path(tmp) / "m.tif")
        norm = Normalization(low=1.0, high=99.8)
        (frame,) = load_frames([pair], norm, "binary", percentile_jitter=True)
    assert frame.jitter is not None and len(frame.jitter) == len(JITTER_LOW) * len(JITTER_HIGH)
    # The tile is the whole frame: the same pixels every time, scaled by the drawn percentiles.
    patches = random_patches([frame], 64, seed=0)
    means = {round(float(next(patches)[0].mean()), 4) for _ in range(60)}
    assert len(means) > 10


# ------------------------------------------------------------------ several sources, held out


def _disc_folder(root: Path, radius: float, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for i in range(n):
        centres = [tuple(rng.integers(12, 60, 2)) for _ in range(5)]
        labels = _discs((72, 72), centres, radius).astype(np.uint16)  # type: ignore[arg-type]
        blur = ndimage.gaussian_filter((labels > 0).astype(float), 1.0)
        image = (800 + 150 * rng.standard_normal((72, 72)) + 2500 * blur).clip(0, 65535)
        tifffile.imwrite(root / "images" / f"im_{i:02d}.tif", image.astype(np.uint16))
        tifffile.imwrite(root / "masks" / f"im_{i:02d}.tif", labels)


@pytest.mark.slow
def test_several_sources_train_together_and_a_held_out_one_is_reported_apart(
    tmp_path: Path,
) -> None:
    from training.release import export_run
    from training.train import train

    for name, radius, seed in (("small", 5, 0), ("large", 9, 1), ("unseen", 7, 2)):
        _disc_folder(tmp_path / name, radius, 4, seed)
    config = TrainConfig(
        name="multi",
        data_dir="",
        sources=[str(tmp_path / "small"), str(tmp_path / "large")],
        held_out=[str(tmp_path / "unseen")],
        tile_size=32,
        options=ArchOptions(depth=2, base_filters=4, max_filters=8),
        batch_size=4,
        epochs=1,
        steps_per_epoch=3,
        val_fraction=0.25,
        test_fraction=0.25,
        augmentation=Augmentation(
            scale_min=0.5, scale_max=2.0, percentile_jitter=True, blur_max_sigma=1.0, poisson=True
        ),
    )
    splits = config.splits()
    assert [p.key for p in splits["test"]] == ["small/im_03", "large/im_03"]
    assert {p.source for p in config.held_out_pairs()} == {"unseen"}
    run_dir = tmp_path / "runs" / "multi"
    summary = train(config, run_dir)
    assert summary["object_diameter"] == pytest.approx(14, abs=2)  # median of 10 and 18
    assert summary["object_diameter"] == training_scale(splits["train"])
    trained = {k.split("/")[0] for k in summary["splits"]["train"]}
    assert trained == {"small", "large"}, "the held-out source is never trained on"

    # A model folder that ships its Keras weights gets the new checkpoint beside the ONNX file.
    (tmp_path / "models" / "multi" / "keras").mkdir(parents=True)
    export_run(run_dir, tmp_path / "models", "1")
    shipped = tmp_path / "models" / "multi" / "1" / "keras" / "model.keras"
    assert shipped.is_file() and shipped.stat().st_size > 0
    with zipfile.ZipFile(shipped) as archive:  # weights only: not compiled, no optimizer state
        assert not json.loads(archive.read("config.json")).get("compile_config")
    proto = onnx.load(str(tmp_path / "models" / "multi" / "1" / "model.onnx"))
    meta = ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props})
    assert meta.object_diameter == summary["object_diameter"]  # what diameter= rescales to
    assert (
        "Training scale: median nucleus diameter"
        in (tmp_path / "models" / "multi" / "README.md").read_text()
    )
    assert set(meta.metrics["per_source"]) == {"small", "large"}
    assert set(meta.metrics["held_out"]) == {"unseen"}
    assert meta.metrics["held_out"]["unseen"]["images"] == 4
    for entry in (*meta.metrics["per_source"].values(), meta.metrics["held_out"]["unseen"]):
        assert set(entry["iou"]) == {"background", "nucleus"}
        assert "mean_signed_distance_px" in entry["boundary"]
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert set(report["onnx"]["held_out"]["per_source"]) == {"unseen"}
    card = (tmp_path / "models" / "multi" / "README.md").read_text()
    assert "| unseen | **held out** |" in card and "| small | training |" in card
    assert "0 / 0 / 4" in card  # the held-out source's images, all tested
    assert "## Keras weights" in card


def test_config_round_trips_sources_and_augmentation(tmp_path: Path) -> None:
    config = TrainConfig(
        name="x",
        data_dir="",
        sources=["a", "b"],
        held_out=["c"],
        augmentation=Augmentation(scale_min=0.5, scale_max=2.0, poisson=True),
    )
    config.save(tmp_path / "config.json")
    assert TrainConfig.load(tmp_path / "config.json") == config
    with pytest.raises(ValueError, match="scale range"):
        replace(config, augmentation=Augmentation(scale_min=2.0, scale_max=1.0))
