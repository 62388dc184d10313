"""Training pipeline: pairing, splitting, 3-class derivation, and an end-to-end smoke run."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import tifffile
from PIL import Image

from service.core.config import DEFAULT_OVERLAP
from service.inference.modelmeta import ModelMetadata
from service.inference.pipeline import predict_mask
from tests.conftest import decode_png, running_app, tiff_bytes
from training.config import ArchOptions, TrainConfig
from training.data import (
    PairingError,
    instances_to_three_class,
    mask_to_classes,
    pair_files,
    split_sequence,
)

# ------------------------------------------------------------------------------------ pairing


def _touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def test_pairs_match_by_stem_not_by_order(tmp_path: Path) -> None:
    # Sorted by full name the two folders would pair a<->b: only stems give the right pairs.
    _touch(tmp_path / "images", "a.tif", "b.png", "c.jpg")
    _touch(tmp_path / "masks", "a.png", "b.tif", "c.tiff")
    pairs = pair_files(tmp_path / "images", tmp_path / "masks")
    assert [(p.stem, p.image.name, p.mask.name) for p in pairs] == [
        ("a", "a.tif", "a.png"),
        ("b", "b.png", "b.tif"),
        ("c", "c.jpg", "c.tiff"),
    ]


def test_unmatched_files_are_reported_and_stop(tmp_path: Path) -> None:
    _touch(tmp_path / "images", "a.tif", "b.tif", "only_image.tif")
    _touch(tmp_path / "masks", "a.tif", "b.tif", "only_mask.png", "notes.txt")
    with pytest.raises(PairingError) as err:
        pair_files(tmp_path / "images", tmp_path / "masks")
    assert err.value.unmatched_images == ["only_image.tif"]
    assert err.value.unmatched_masks == ["only_mask.png"]
    assert "only_image.tif" in str(err.value) and "only_mask.png" in str(err.value)


def test_duplicate_stems_are_rejected(tmp_path: Path) -> None:
    _touch(tmp_path / "images", "a.tif", "a.png")
    _touch(tmp_path / "masks", "a.tif")
    with pytest.raises(ValueError, match="two files with stem"):
        pair_files(tmp_path / "images", tmp_path / "masks")


# -------------------------------------------------------------------------------------- split


@pytest.mark.parametrize("n", [3, 5, 10, 20, 37])
def test_split_by_frame_is_disjoint_ordered_and_complete(tmp_path: Path, n: int) -> None:
    names = [f"frame_{i:03d}.tif" for i in range(n)]
    _touch(tmp_path / "images", *names)
    _touch(tmp_path / "masks", *names)
    splits = split_sequence(pair_files(tmp_path / "images", tmp_path / "masks"))
    stems = {k: [p.stem for p in v] for k, v in splits.items()}
    assert all(stems.values())
    assert not set(stems["train"]) & set(stems["val"])
    assert not set(stems["train"]) & set(stems["test"])
    assert not set(stems["val"]) & set(stems["test"])
    # Early frames train, middle validate, last are the held-out test: no temporal leakage.
    assert stems["train"] + stems["val"] + stems["test"] == [f"frame_{i:03d}" for i in range(n)]


def test_hela_split_holds_out_the_last_frames(tmp_path: Path) -> None:
    names = [f"frame_{i:03d}.tif" for i in range(20)]
    _touch(tmp_path / "images", *names)
    _touch(tmp_path / "masks", *names)
    splits = split_sequence(pair_files(tmp_path / "images", tmp_path / "masks"))
    assert [p.stem for p in splits["test"]] == ["frame_017", "frame_018", "frame_019"]
    assert [p.stem for p in splits["val"]] == ["frame_014", "frame_015", "frame_016"]


# ------------------------------------------------------------------------------ 3-class labels


def test_three_class_separates_touching_nuclei() -> None:
    labels = np.zeros((10, 14), np.uint16)
    labels[2:8, 1:7] = 1  # two 6x6 nuclei touching along columns 6|7
    labels[2:8, 7:13] = 2
    out = instances_to_three_class(labels, boundary_width=1)
    expected = np.zeros((10, 14), np.uint8)
    expected[2:8, 1:13] = 2
    expected[3:7, 2:6] = 1  # interior of nucleus 1
    expected[3:7, 8:12] = 1  # interior of nucleus 2
    np.testing.assert_array_equal(out, expected)
    # The two columns where the nuclei touch are boundary on both sides ...
    assert (out[2:8, 6] == 2).all() and (out[2:8, 7] == 2).all()
    # ... so the interiors form two separate components, one per nucleus.
    from scipy import ndimage

    _, n = ndimage.label(out == 1)
    assert n == 2


def test_three_class_background_and_image_edge() -> None:
    labels = np.zeros((8, 8), np.int32)
    labels[0:5, 0:5] = 7  # a nucleus cut by the image edge: the edge is no boundary
    out = instances_to_three_class(labels, boundary_width=1)
    assert (out[labels == 0] == 0).all()
    assert out[0, 0] == 1 and out[4, 0] == 2 and out[0, 4] == 2 and out[4, 4] == 2
    wide = instances_to_three_class(labels, boundary_width=2)
    assert (wide[3:5, 0] == 2).all() and wide[2, 0] == 1


def test_contact_width_widens_the_band_only_where_nuclei_touch() -> None:
    labels = np.zeros((12, 20), np.uint16)
    labels[2:10, 1:10] = 1  # two 8x9 nuclei touching along columns 9|10
    labels[2:10, 10:19] = 2
    out = instances_to_three_class(labels, boundary_width=1, contact_width=3)
    # Against the background: 1 px, as without contact_width.
    assert out[2, 4] == 2 and out[3, 4] == 1 and out[5, 1] == 2 and out[5, 2] == 1
    # At the contact: 3 px on each side (columns 7-9 and 10-12), so 6 px between interiors.
    assert (out[3:9, 7:13] == 2).all()
    assert (out[3:9, 6] == 1).all() and (out[3:9, 13] == 1).all()
    # The foreground, i.e. the mask every client gets, is the same as without it.
    np.testing.assert_array_equal(out > 0, labels > 0)
    # Whichever nucleus carries the larger label, the band is the same on both sides.
    swapped = np.where(labels == 1, 2, np.where(labels == 2, 1, 0)).astype(np.uint16)
    np.testing.assert_array_equal(
        instances_to_three_class(swapped, boundary_width=1, contact_width=3), out
    )


def test_keep_cores_seeds_a_nucleus_the_bands_would_leave_without_interior() -> None:
    labels = np.zeros((12, 16), np.uint16)
    labels[2:10, 1:9] = 1  # a large nucleus ...
    labels[4:7, 9:12] = 2  # ... with a 3x3 one touching it, and a 3x3 one alone
    labels[8:11, 12:15] = 3
    plain = instances_to_three_class(labels, boundary_width=2)
    assert not (plain[labels == 2] == 1).any() and not (plain[labels == 3] == 1).any()
    kept = instances_to_three_class(labels, boundary_width=2, keep_cores=True)
    # Each small nucleus gets its innermost pixel (its centre) as interior, the large one keeps
    # its own interior unchanged, and no core touches another nucleus' core.
    assert kept[5, 10] == 1 and (kept[labels == 2] == 1).sum() == 1
    assert kept[9, 13] == 1 and (kept[labels == 3] == 1).sum() == 1
    np.testing.assert_array_equal(kept[labels == 1], plain[labels == 1])
    np.testing.assert_array_equal(kept > 0, labels > 0)
    from scipy import ndimage

    _, n = ndimage.label(kept == 1)
    assert n == 3


def test_mask_modes() -> None:
    labels = np.array([[0, 3], [5, 5]], np.uint16)
    np.testing.assert_array_equal(mask_to_classes(labels, "binary"), [[0, 1], [1, 1]])
    dense = np.array([[1, 49], [91, 67]], np.uint8)
    np.testing.assert_array_equal(
        mask_to_classes(dense, "labels", label_values=[1, 49, 67, 91]), [[0, 1], [3, 2]]
    )
    with pytest.raises(ValueError, match="not in label_values"):
        mask_to_classes(dense, "labels", label_values=[1, 49])


# --------------------------------------------------------------------------------- smoke, e2e


def _make_disk_data(root: Path, n: int = 4, shape: tuple[int, int] = (72, 100)) -> None:
    """Bright disks (instances) on a noisy uint16 background; one frame as PNG to mix formats."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for i in range(n):
        labels = np.zeros(shape, np.uint16)
        for k in range(1, 7):
            cy, cx, r = rng.integers(8, shape[0] - 8), rng.integers(8, shape[1] - 8), 6
            labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
        image = (1000 + 200 * rng.standard_normal(shape) + 3000 * (labels > 0)).clip(0, 65535)
        tifffile.imwrite(root / "images" / f"frame_{i:03d}.tif", image.astype(np.uint16))
        if i == 0:
            Image.fromarray(labels.astype(np.uint8)).save(root / "masks" / f"frame_{i:03d}.png")
        else:
            tifffile.imwrite(root / "masks" / f"frame_{i:03d}.tif", labels)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "classes"),
    [("binary", ["background", "nucleus"]), ("3class", ["background", "interior", "boundary"])],
)
def test_smoke_train_export_parity_and_serve(tmp_path: Path, mode: str, classes: list[str]) -> None:
    from training.evaluate import onnx_predictor
    from training.export import ort_predictor
    from training.release import export_run
    from training.train import train

    data = tmp_path / "data"
    _make_disk_data(data)
    config = TrainConfig(
        name="smoke-" + mode,
        data_dir=str(data),
        mask_mode=mode,
        classes=classes,
        boundary_width=1,
        tile_size=32,
        options=ArchOptions(depth=2, base_filters=4, max_filters=8),
        batch_size=4,
        epochs=1,
        steps_per_epoch=3,
        val_fraction=0.25,
        test_fraction=0.25,
    )
    run_dir = tmp_path / "runs" / config.name
    summary = train(config, run_dir)
    assert summary["epochs_run"] == 1
    assert summary["splits"]["test"] == ["frame_003"]
    for name in ("best.keras", "history.csv", "config.json", "train_summary.json"):
        assert (run_dir / name).is_file()

    result = export_run(run_dir, tmp_path / "models", "1")
    onnx_path = tmp_path / "models" / config.name / "1" / "model.onnx"
    assert Path(result["onnx"]) == onnx_path
    assert result["parity"] <= 1e-5
    model_dir = onnx_path.parent.parent
    config_pbtxt = (model_dir / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config_pbtxt
    assert "dims: [ 32, 32, 1 ]" in config_pbtxt
    assert (model_dir / "README.md").is_file() and (model_dir / "1" / "README.md").is_file()
    assert (model_dir / "1" / "training_curves.png").is_file()
    assert (model_dir / "1" / "test_frame_003.png").is_file()
    assert "](1/test_frame_003.png)" in (model_dir / "README.md").read_text()
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert set(report["onnx"]["aggregate"]["iou"]) == set(classes)

    # Serve one request the way the service does: metadata from the file, ORT, predict_mask.
    proto = onnx.load(str(onnx_path))
    assert proto.opset_import[0].version <= 18
    meta = ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props})
    assert meta.classes == classes and meta.tile_size == 32 and meta.tile_multiple == 4
    assert "iou" in meta.metrics
    image = tifffile.imread(data / "images" / "frame_003.tif")
    session = ort_predictor(onnx_path)
    *dynamic, channels = session.get_inputs()[0].shape
    assert channels == 1 and not any(isinstance(d, int) for d in dynamic)  # batch, height, width
    # At the service's default overlap: the request below names none.
    mask = predict_mask(image, meta, onnx_predictor(session), batch_size=3, overlap=DEFAULT_OVERLAP)
    assert mask.shape == image.shape and mask.dtype == np.uint8
    assert int(mask.max()) < len(classes)

    # And through the real service: the exported folder is served with no other configuration.
    with running_app(tmp_path / "models", default_model=config.name) as client:
        listed = client.get("/models").json()["models"]
        assert [m["name"] for m in listed] == [config.name]
        r = client.post("/segment", files={"image": ("f.tif", tiff_bytes(image))})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        served = np.asarray(decode_png(r.content))
        assert np.array_equal(served, mask * 255 if mode == "binary" else mask)


def _tiny_3class(data: Path, **fields: object) -> TrainConfig:
    return TrainConfig(
        name="inst",
        data_dir=str(data),
        mask_mode="3class",
        classes=["background", "interior", "boundary"],
        boundary_width=1,
        tile_size=32,
        options=ArchOptions(depth=2, base_filters=4, max_filters=8),
        batch_size=4,
        epochs=1,
        steps_per_epoch=2,
        val_fraction=0.25,
        test_fraction=0.25,
        **fields,  # type: ignore[arg-type]
    )


@pytest.mark.slow
def test_binary_instances_export_and_immutable_versions(tmp_path: Path) -> None:
    """A 3-class network exported as a binary model with instances: 2 channels
    [1 - p_background, p_interior] from the graph itself (parity on both), object scores in its
    metadata; a second release is version 2 and leaves version 1's bytes as they were."""
    from training.evaluate import keras_predictor, onnx_predictor
    from training.export import ort_predictor, served_model
    from training.release import export_run
    from training.train import load_trained, train

    data = tmp_path / "data"
    _make_disk_data(data)
    config = _tiny_3class(data, binary_instances=True, speck_fraction=0.2)
    run_dir = tmp_path / "runs" / config.name
    train(config, run_dir)
    models = tmp_path / "models"
    first = export_run(run_dir, models)
    assert first["version"] == "1" and first["parity"] <= 1e-5
    v1 = models / "inst" / "1"
    proto = onnx.load(str(v1 / "model.onnx"))
    meta = ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props})
    assert meta.task.value == "binary" and meta.classes == ["background", "nucleus"]
    assert meta.output_channels == 2 and meta.instances is not None
    # The seed threshold and speck rule start from the config's and are tuned on validation.
    assert meta.instances.seed_channel == 1 and "instances_tuned_on" in meta.metrics
    assert {"f1", "ap50", "mean_ap", "mean_matched_iou"} <= set(meta.metrics["objects"])
    # Scored again where the reference labels, in the metadata and the card.
    labelled = meta.metrics["labelled_only"]
    assert labelled["objects_left_out"] >= 0 and "f1" in labelled["objects"]
    assert "| all test images | " in (v1 / "README.md").read_text().split("SEG measure")[1]
    assert (
        "Targets: background / interior / boundary, the boundary 1 px."
        in (v1 / "README.md").read_text()
    )

    # The head: the exported channels are 1 - p_background and p_interior of the softmax.
    tiles = np.random.default_rng(0).random((2, 32, 32, 1), np.float32)
    net = load_trained(run_dir)
    softmax = np.asarray(net(tiles, training=False))
    served = onnx_predictor(ort_predictor(v1 / "model.onnx"))(tiles)
    np.testing.assert_allclose(served[..., 0], 1 - softmax[..., 0], atol=1e-5)
    np.testing.assert_allclose(served[..., 1], softmax[..., 1], atol=1e-5)
    head = keras_predictor(served_model(net, config))(tiles)
    np.testing.assert_allclose(head, served, atol=1e-5)

    # Fine-tuning starts from a run's (or a release's) Keras weights, array for array, and
    # refuses a file of another network, saying so.
    from training.architectures import build_model, options_for
    from training.train import start_from

    options = options_for(config.arch, config.options)
    fresh = build_model(config.arch, 1, 3, name="inst", **options)
    start_from(fresh, run_dir / "best.keras")
    for got, want in zip(fresh.get_weights(), net.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    wider = build_model(config.arch, 1, 3, name="inst", **(options | {"base_filters": 8}))
    with pytest.raises(ValueError, match="do not fit this network"):
        start_from(wider, run_dir / "best.keras")

    # Versions are immutable: the next release is version 2, version 1 keeps its bytes and card.
    before = {p.relative_to(v1): p.read_bytes() for p in v1.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match="immutable"):
        export_run(run_dir, models, "1")
    second = export_run(run_dir, models)
    assert second["version"] == "2" and (models / "inst" / "2" / "model.onnx").is_file()
    after = {p.relative_to(v1): p.read_bytes() for p in v1.rglob("*") if p.is_file()}
    assert after == before
    assert "(version 1)" in (v1 / "README.md").read_text()
    root = (models / "inst" / "README.md").read_text()
    assert "(version 2)" in root and "[1](1/README.md)" in root
    assert sorted(p.name for p in models.iterdir()) == ["inst"]  # no staging left behind


@pytest.mark.slow
def test_a_release_keeps_the_card_and_weights_of_a_version_from_before_versioned_cards(
    tmp_path: Path,
) -> None:
    """A model folder as version 1 of `nuclei` was committed (card, pictures and Keras weights
    in the model folder): the next release moves them into version 1's folder, never touching
    its ONNX file, and ships its own Keras weights in its own folder."""
    from training.release import export_run
    from training.train import train

    data = tmp_path / "data"
    _make_disk_data(data)
    config = _tiny_3class(data)
    run_dir = tmp_path / "runs" / config.name
    train(config, run_dir)
    model_dir = tmp_path / "models" / "inst"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "keras").mkdir()
    (model_dir / "1" / "model.onnx").write_bytes(b"version one")
    (model_dir / "keras" / "model.keras").write_bytes(b"weights one")
    (model_dir / "README.md").write_text("# `inst` (version 1)\n![a](test_a.png)\n")
    (model_dir / "test_a.png").write_bytes(b"picture one")
    assert export_run(run_dir, tmp_path / "models")["version"] == "2"
    assert (model_dir / "1" / "model.onnx").read_bytes() == b"version one"
    assert (model_dir / "1" / "README.md").read_text().startswith("# `inst` (version 1)")
    assert (model_dir / "1" / "test_a.png").read_bytes() == b"picture one"
    assert (model_dir / "1" / "keras" / "model.keras").read_bytes() == b"weights one"
    assert (model_dir / "2" / "keras" / "model.keras").stat().st_size > 1000
    assert not (model_dir / "keras").exists() and not list(model_dir.glob("*.png"))
    assert "`2/keras/model.keras`" in (model_dir / "README.md").read_text()


def test_parity_is_measured_against_float64_keras_and_catches_a_wrong_export() -> None:
    """The check's reference is the Keras network in float64 (Keras float32 has round-off of its
    own); a 1 % error in one layer's weights, the size of a conversion bug, is refused."""
    from onnx import numpy_helper

    from training.architectures import build_model, options_for
    from training.export import (
        ParityError,
        check_parity,
        float64_twin,
        model_metadata,
        ort_predictor,
        to_onnx,
    )

    config = TrainConfig(
        name="parity",
        data_dir="unused",
        mask_mode="3class",
        classes=["background", "interior", "boundary"],
        tile_size=32,
        arch="residual-unet",
        options=ArchOptions(depth=3, base_filters=4, max_filters=8),
    )
    model = build_model("residual-unet", 1, 3, **options_for("residual-unet", config.options))
    tiles = np.random.default_rng(0).random((4, 32, 32, 1), np.float32)

    exact = np.asarray(float64_twin(model).predict(tiles.astype(np.float64), verbose=0))
    assert exact.dtype == np.float64
    np.testing.assert_allclose(exact, model.predict(tiles, verbose=0), atol=1e-5)

    proto = to_onnx(model, model_metadata(config, 1))
    parity = check_parity(model, ort_predictor(proto), tiles)
    assert parity.onnx_vs_exact <= 1e-5
    assert 0 < parity.keras_vs_exact <= 1e-5  # float32 Keras is close to, not equal to, exact
    assert parity.onnx_vs_keras <= parity.onnx_vs_exact + parity.keras_vs_exact

    # The output layer's weights 1 % off: what a wrong scale or epsilon in a converter gives.
    head = [node for node in proto.graph.node if node.op_type == "Conv"][-1]
    weight = next(init for init in proto.graph.initializer if init.name == head.input[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.01, weight.name))
    with pytest.raises(ParityError, match=r"float64\) max abs diff"):
        check_parity(model, ort_predictor(proto), tiles)

    # An extra leading axis on the output (a one-element list packed into the graph) would
    # broadcast against Keras's and pass on values: it is refused by shape.
    import onnx

    proto = to_onnx(model, model_metadata(config, 1))
    out = proto.graph.output[0]
    last = next(node for node in proto.graph.node if out.name in node.output)
    last.output[list(last.output).index(out.name)] = "inner"
    axes = numpy_helper.from_array(np.array([0], np.int64), "axis0")
    proto.graph.initializer.append(axes)
    proto.graph.node.append(onnx.helper.make_node("Unsqueeze", ["inner", "axis0"], [out.name]))
    out.type.tensor_type.shape.dim.insert(0, onnx.TensorShapeProto.Dimension(dim_value=1))
    with pytest.raises(ParityError, match=r"output shapes differ.*\(1, 4, 32, 32, 3\)"):
        check_parity(model, ort_predictor(proto), tiles)


def test_segtrain_help_does_not_load_tensorflow() -> None:
    """``segtrain --help`` (and every subcommand's help) reads the presets and architecture names
    without importing Keras or TensorFlow: seconds, not a TensorFlow start-up."""
    code = (
        "import contextlib, io, json, sys\n"
        "from training.cli import main\n"
        "helps = []\n"
        "for argv in (['--help'], ['train', '--help'], ['release', '--help']):\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "    helps.append(out.getvalue())\n"
        "heavy = sorted(m for m in ('tensorflow', 'keras', 'tf2onnx') if m in sys.modules)\n"
        "print(json.dumps({'heavy': heavy, 'helps': helps}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    result = json.loads(proc.stdout)
    assert result["heavy"] == [], proc.stderr
    top, train_help, release_help = result["helps"]
    assert "fetch-data" in top and "release" in top
    assert "residual-unet" in train_help and "nuclei-3class" in train_help
    assert "--skip-train" in release_help


def test_a_card_says_how_the_targets_were_made_and_where_fine_tuning_started() -> None:
    from training.release import recipe

    config = _tiny_3class(Path("data"), contact_width=3, keep_cores=True)
    text = recipe(replace(config, init_weights="models/inst/1/keras/model.keras"))
    assert "the boundary 1 px, 3 px where another nucleus is within reach; a nucleus" in text
    assert "Fine-tuned: the weights started from `models/inst/1/keras/model.keras`" in text
    assert recipe(replace(config, mask_mode="binary", classes=["bg", "fg"])) == ""


def test_the_model_folders_card_links_into_the_version_folders() -> None:
    from training.release import root_card

    card = (
        "# `m` (version 5)\n![a](test_a.png) [its network](../4/README.md) "
        "[site](https://x.org/a) `keras/model.keras`\n"
    )
    root = root_card(card, "5", [1, 4])
    assert "](5/test_a.png)" in root and "](4/README.md)" in root and "(https://x.org/a)" in root
    assert "`5/keras/model.keras`" in root
    assert "Earlier versions and their cards: [1](1/README.md), [4](4/README.md)." in root
