"""The architectures of ``--arch``: shapes and activations, structure, and each one trained for a
step, exported with the parity check and served by the unchanged service."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import keras
import numpy as np
import onnx
import pytest
import tifffile
from keras import layers

from service.inference.modelmeta import ModelMetadata
from tests.conftest import decode_png, running_app, tiff_bytes
from tests.test_training import _make_disk_data
from training.architectures import (
    ARCHITECTURES,
    bilinear_kernel,
    build_model,
    count_layers,
    describe,
    inference_model,
    options_for,
    tile_multiple,
    u2net_heights,
)
from training.config import ARCHITECTURE_NAMES, ArchOptions, TrainConfig

TINY = ArchOptions(depth=2, base_filters=4, max_filters=8)


def build(arch: str, classes: int, options: ArchOptions = TINY) -> keras.Model:
    """``arch`` for one input channel, built with the ``options`` its builder takes."""
    return build_model(arch, 1, classes, **options_for(arch, options))


def multiple(arch: str, options: ArchOptions = TINY) -> int:
    """The tile multiple of ``arch`` built with ``options``."""
    return tile_multiple(arch, **options_for(arch, options))


def test_the_registry_builds_the_networks_the_cli_offers() -> None:
    assert tuple(ARCHITECTURES) == ARCHITECTURE_NAMES
    with pytest.raises(TypeError, match="not \\['depth'\\]"):
        build_model("fcn8s", 1, 1, depth=3)  # VGG-16's depth is fixed
    with pytest.raises(ValueError, match="choose from"):
        build_model("vgg", 1, 1)


TILE = 32  # a multiple of every tiny variant's tile multiple (fcn8s: 32)


def _merging_layers(model: keras.Model) -> list[str]:
    """Layers that join two or more tensors (skip connections, residual sums)."""
    return [
        layer.name
        for layer in model.layers
        if isinstance(layer, layers.Concatenate | layers.Add | layers.Multiply)
    ]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("classes", [1, 3])
def test_output_shape_and_activation(arch: str, classes: int) -> None:
    model = inference_model(build(arch, classes))
    x = np.random.default_rng(0).random((2, TILE, TILE, 1), np.float32)
    y = np.asarray(model(x, training=False))
    assert y.shape == (2, TILE, TILE, classes)
    assert model.outputs[0].name.startswith("probabilities") or model.layers[-1].name == (
        "probabilities"
    )
    assert ((y >= 0) & (y <= 1)).all()
    if classes > 1:
        np.testing.assert_allclose(y.sum(axis=-1), 1.0, atol=1e-5)  # softmax
    else:
        assert model.layers[-1].get_config()["activation"] == "sigmoid"
    assert TILE % multiple(arch) == 0


def test_encoder_decoder_has_no_skip() -> None:
    model = build("encoder-decoder", 1)
    # Nothing joins two tensors: every layer has exactly one input, so the decoder sees only
    # what passes the bottleneck.
    assert _merging_layers(model) == []
    # The U-Net of the same size does join encoder and decoder.
    assert count_layers(build("unet", 1), layers.Concatenate) == TINY.depth


def test_residual_unet_skips_versus_neighbour_only() -> None:
    options = ArchOptions(depth=3, base_filters=4, max_filters=16)
    full = build("residual-unet", 1, options)
    neighbour = build(
        "residual-unet",
        1,
        ArchOptions(depth=3, base_filters=4, max_filters=16, neighbour_residuals=True),
    )
    # Both have one residual sum per block (depth - 1 down, depth up) ...
    assert count_layers(full, layers.Add) == count_layers(neighbour, layers.Add) == 2 * 3 - 1
    assert count_layers(full, layers.SeparableConv2D) > 0
    # ... but only the full one concatenates encoder features into the decoder, at the
    # resolution they were computed at.
    assert count_layers(neighbour, layers.Concatenate) == 0
    concats = [layer for layer in full.layers if isinstance(layer, layers.Concatenate)]
    assert len(concats) == options.depth - 1
    for layer in concats:
        a, b = (t.shape for t in layer.input)
        assert a[1:3] == b[1:3]
    assert full.count_params() > neighbour.count_params()
    assert "neighbour_residuals=True" in describe("residual-unet", neighbour_residuals=True)


def test_u2net_side_outputs_are_training_only() -> None:
    assert u2net_heights(5) == [7, 6, 5, 4, 3, 2]  # U²-Net: RSU-7..4, then two RSU-4F
    model = build("u2net", 3)
    assert len(model.outputs) == TINY.depth + 2  # fused + one side per stage
    served = inference_model(model)
    assert len(served.outputs) == 1 and served.outputs[0].shape[-1] == 3
    assert multiple("u2net", ArchOptions(depth=5)) == 32
    plain = build("u2net", 1, ArchOptions(depth=2, deep_supervision=False))
    assert len(plain.outputs) == 1


def test_fcn8s_fuses_pool3_pool4_and_upsamples_bilinearly() -> None:
    model = build("fcn8s", 2)
    names = {layer.name for layer in model.layers}
    assert {"score_pool3", "score_pool4", "upscore8"} <= names
    assert multiple("fcn8s") == 32
    # The bilinear kernel turns a constant map into the same constant (away from the border).
    up = layers.Conv2DTranspose(1, 8, strides=4, padding="same", use_bias=False)
    up.build((None, 4, 4, 1))
    up.kernel.assign(bilinear_kernel(8, 1))
    out = np.asarray(up(np.ones((1, 4, 4, 1), np.float32)))
    np.testing.assert_allclose(out[0, 4:12, 4:12, 0], 1.0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_train_export_parity_and_serve(tmp_path: Path, arch: str) -> None:
    from training.release import export_run
    from training.train import train

    data = tmp_path / "data"
    _make_disk_data(data)
    # U²-Net at depth 1 (two stages of RSU blocks, their side outputs and the fusion): the
    # same kinds of layers as at depth 2 with 96 of its 166, so tracing and converting its
    # graph take 22 s instead of 36 here (CI's slowest test at depth 2: 68 s beside the others).
    options = dataclasses.replace(TINY, depth=1) if arch == "u2net" else TINY
    config = TrainConfig(
        name=f"tiny-{arch}",
        data_dir=str(data),
        arch=arch,
        tile_size=TILE,
        options=options,
        batch_size=2,
        epochs=1,
        steps_per_epoch=1,
        val_fraction=0.25,
        test_fraction=0.25,
    )
    run_dir = tmp_path / "runs" / config.name
    summary = train(config, run_dir)
    assert summary["epochs_run"] == 1
    result = export_run(run_dir, tmp_path / "models", "1")
    assert result["parity"] <= 1e-5

    proto = onnx.load(result["onnx"])
    assert len(proto.graph.input) == 1 and len(proto.graph.output) == 1
    meta = ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props})
    assert meta.tile_multiple == multiple(arch, config.options)
    assert meta.architecture.startswith(arch)

    image = tifffile.imread(data / "images" / "frame_003.tif")
    with running_app(tmp_path / "models", default_model=config.name) as client:
        r = client.post("/segment", files={"image": ("f.tif", tiff_bytes(image))})
        assert r.status_code == 200, r.text
        served = np.asarray(decode_png(r.content))
        assert served.shape == image.shape and set(np.unique(served)) <= {0, 255}
