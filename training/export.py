"""Keras -> ONNX (tf2onnx) with embedded metadata, a parity check, and the Triton layout."""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import onnx
import onnxruntime as ort
import tensorflow as tf
import tf2onnx
import tf2onnx.optimizer

from service.inference.modelmeta import Instances, ModelMetadata, Task
from training.architectures import describe, options_for, tile_multiple
from training.config import TrainConfig

OPSET = 17  # tf2onnx supports up to 18
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
PARITY_TOLERANCE = 1e-5


class ParityError(RuntimeError):
    """ONNX Runtime and Keras disagree beyond the tolerance: the export is not trustworthy."""


def git_commit(repo: Path | None = None) -> str:
    """``git rev-parse HEAD`` (+ "-dirty" when ``training/`` has uncommitted changes), or
    "uncommitted" outside a repository or before the first commit."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "training"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "uncommitted"
    return f"{head}-dirty" if dirty else head


# What a ``binary_instances`` model serves: a binary mask and, beside it, the cores that seed
# instances (the watershed grows them over the mask).
SERVED_CLASSES = ["background", "nucleus"]


@keras.saving.register_keras_serializable(package="segtrain")
class ForegroundCore(keras.layers.Layer):
    """A 3-class softmax (background, interior, boundary) as 2 channels:
    ``[1 - p_background, p_interior]``, the foreground and the cores of a binary model with
    instances. Part of the exported graph, so ONNX and Keras compute it alike."""

    def call(self, probabilities: Any) -> Any:
        """``(N, H, W, 3)`` softmax to ``(N, H, W, 2)``."""
        foreground = 1.0 - probabilities[..., 0:1]
        return keras.ops.concatenate([foreground, probabilities[..., 1:2]], axis=-1)

    def compute_output_shape(self, input_shape: tuple[Any, ...]) -> tuple[Any, ...]:
        """The input's shape with 2 channels."""
        return (*input_shape[:-1], 2)


def served_model(model: keras.Model, config: TrainConfig) -> keras.Model:
    """The network as it is exported: ``model`` itself, or, for a ``binary_instances`` config,
    ``model`` with the :class:`ForegroundCore` head on its softmax."""
    if not config.binary_instances:
        return model
    if model.outputs[0].shape[-1] != 3:
        raise ValueError("binary_instances needs a 3-class (background/interior/boundary) net")
    head = ForegroundCore(name="foreground_core")(model.outputs[0])
    # A single input stays a tensor, not a one-element list, so calls with a bare array match.
    return keras.Model(model.inputs[0], head, name=model.name)


def served_mask_mode(config: TrainConfig) -> str:
    """The mask mode the exported model is scored in (binary for ``binary_instances``)."""
    return "binary" if config.binary_instances else config.mask_mode


def to_onnx(model: keras.Model, meta: ModelMetadata) -> onnx.ModelProto:
    """Convert via a ``tf.function`` (works with Keras 3, unlike ``from_keras``).

    Input ``(batch, height, width, C)``, all dynamic but the channels: the service feeds tiles
    of ``meta.tile_size`` (what ``config.pbtxt`` declares), yet any side that is a multiple of
    ``meta.tile_multiple`` also runs, e.g. a whole image in one pass.
    """
    spec = (tf.TensorSpec((None, None, None, meta.channels), tf.float32, name=INPUT_NAME),)

    @tf.function(input_signature=spec)
    def serve(image: tf.Tensor) -> dict[str, tf.Tensor]:
        return {OUTPUT_NAME: model(image, training=False)}

    with _without_reshape_optimizer():
        proto, _ = tf2onnx.convert.from_function(serve, input_signature=spec, opset=OPSET)
    set_metadata(proto, meta)
    return proto


@contextlib.contextmanager
def _without_reshape_optimizer() -> Iterator[None]:
    """tf2onnx's optimizers without ``reshape_optimizer``, for one conversion.

    That pass rewrites the Reshape that replaces the last NCHW -> NHWC Transpose (one output
    channel) as a 5-D Reshape ``[1, -1, 0, 0, 1]`` followed by a Squeeze. Once in CI (the tiny
    encoder-decoder) the export answered ``(1, N, H, W, 1)``, that Reshape's shape without the
    Squeeze, and the parity check's shape test caught it (not reproduced in 40 conversions
    here). Without the pass, the Reshape takes its shape from the input's (Shape, Gather): a
    few scalar ops per call. ``from_function`` takes no list of passes, hence the registry is
    edited for the call and restored after.
    """
    registry = tf2onnx.optimizer._optimizers  # no public way to choose the passes
    saved = dict(registry)
    registry.pop("reshape_optimizer", None)
    try:
        yield
    finally:
        registry.clear()
        registry.update(saved)


def set_metadata(proto: onnx.ModelProto, meta: ModelMetadata) -> None:
    """Replace the model's ``metadata_props`` with ``meta`` (the service reads them back)."""
    onnx.helper.set_model_props(proto, meta.to_props())
    proto.producer_name = "segtrain"
    proto.doc_string = meta.description


def ort_predictor(source: onnx.ModelProto | Path) -> ort.InferenceSession:
    """A CPU ONNX Runtime session for an ONNX model in memory or on disk."""
    data = source.SerializeToString() if isinstance(source, onnx.ModelProto) else str(source)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


@dataclasses.dataclass(frozen=True)
class Parity:
    """Max abs differences of the model's outputs on the same tiles.

    Keras in float32 is not an exact reference: in a deep network its own round-off can be as
    large as ONNX Runtime's, in the opposite direction, so two faithful float32 implementations
    can differ by the sum of both. The check therefore compares ONNX Runtime with the same Keras
    network evaluated in float64 (``onnx_vs_exact``); the float32 figures are kept for context.
    """

    onnx_vs_exact: float  # ONNX Runtime (float32) vs Keras in float64: what the check limits
    keras_vs_exact: float  # Keras float32 vs float64: the old reference's own round-off
    onnx_vs_keras: float  # ONNX Runtime vs Keras, both float32

    def as_dict(self) -> dict[str, float]:
        """The three figures by name, for reports and model metadata."""
        return dataclasses.asdict(self)


def float64_twin(model: keras.Model) -> keras.Model:
    """The same network and weights with every layer computing in float64."""

    def to_float64(node: Any) -> Any:
        # Layer configs name their dtype policy ("float32") in several nested places.
        if isinstance(node, dict):
            return {key: to_float64(value) for key, value in node.items()}
        if isinstance(node, list):
            return [to_float64(value) for value in node]
        return "float64" if node == "float32" else node

    twin = keras.Model.from_config(to_float64(model.get_config()))
    twin.set_weights([np.asarray(w, np.float64) for w in model.get_weights()])
    return twin


def check_parity(
    model: keras.Model,
    session: ort.InferenceSession,
    tiles: np.ndarray,
    tolerance: float = PARITY_TOLERANCE,
) -> Parity:
    """Compare ONNX Runtime's outputs on ``tiles`` with Keras's; raise :class:`ParityError` when
    ONNX Runtime is more than ``tolerance`` from the float64 Keras result.

    A conversion bug (padding, layout, a wrong op) shows up as differences of 1e-3 and more;
    1e-5 leaves room only for float32 round-off.
    """
    tiles = tiles.astype(np.float32)
    keras32 = np.asarray(model.predict(tiles, batch_size=8, verbose=0), np.float64)
    # Called eagerly: predict() would compile a graph, and TensorFlow's graph optimiser logs a
    # warning per float64 op it does not handle.
    twin, tiles64 = float64_twin(model), tiles.astype(np.float64)
    exact = np.concatenate(
        [np.asarray(twin(tiles64[i : i + 8], training=False)) for i in range(0, len(tiles64), 8)]
    )
    got = np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: tiles})[0], np.float64)
    # Broadcasting would hide an extra axis (e.g. a one-element list packed into the graph).
    if not got.shape == keras32.shape == exact.shape:
        raise ParityError(
            f"output shapes differ on {tiles.shape} tiles: ONNX Runtime {got.shape}, "
            f"Keras {keras32.shape}, Keras float64 {exact.shape}"
        )
    parity = Parity(
        onnx_vs_exact=float(np.max(np.abs(got - exact))),
        keras_vs_exact=float(np.max(np.abs(keras32 - exact))),
        onnx_vs_keras=float(np.max(np.abs(got - keras32))),
    )
    if not parity.onnx_vs_exact <= tolerance:  # also catches NaN
        raise ParityError(
            f"ONNX Runtime vs Keras (float64) max abs diff {parity.onnx_vs_exact:.3g} > "
            f"{tolerance:g} (Keras float32 vs float64: {parity.keras_vs_exact:.3g})"
        )
    return parity


def triton_config(meta: ModelMetadata, max_batch_size: int = 16) -> str:
    """``config.pbtxt`` for Triton's ONNX Runtime backend: batch dim implicit, dynamic batching."""
    t, c, k = meta.tile_size, meta.channels, meta.output_channels
    return (
        f'name: "{meta.name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch_size}\n"
        "input [\n"
        "  {\n"
        f'    name: "{INPUT_NAME}"\n'
        "    data_type: TYPE_FP32\n"
        f"    dims: [ {t}, {t}, {c} ]\n"
        "  }\n"
        "]\n"
        "output [\n"
        "  {\n"
        f'    name: "{OUTPUT_NAME}"\n'
        "    data_type: TYPE_FP32\n"
        f"    dims: [ {t}, {t}, {k} ]\n"
        "  }\n"
        "]\n"
        "dynamic_batching {\n"
        "  max_queue_delay_microseconds: 2000\n"
        "}\n"
        "instance_group [\n"
        "  {\n"
        "    kind: KIND_AUTO\n"
        "    count: 1\n"
        "  }\n"
        "]\n"
    )


def write_model_repository(proto: onnx.ModelProto, meta: ModelMetadata, models_dir: Path) -> Path:
    """Write ``models_dir/<name>/<version>/model.onnx`` and ``models_dir/<name>/config.pbtxt``.

    The same folder is then both what the service loads and a Triton model repository.
    """
    model_dir = models_dir / meta.name
    version_dir = model_dir / meta.version
    version_dir.mkdir(parents=True, exist_ok=True)
    path = version_dir / "model.onnx"
    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(path))
    (model_dir / "config.pbtxt").write_text(triton_config(meta))
    return path


def model_metadata(config: TrainConfig, channels: int, **overrides: Any) -> ModelMetadata:
    """The model metadata ``config`` implies (metrics and commit filled in at export): the
    network's description comes from its builders, so it is made here, beside Keras, and not
    in :mod:`training.config`, which reads and lists configs without Keras."""
    options = options_for(config.arch, config.options)
    fields: dict[str, Any] = {
        "name": config.name,
        "task": config.task,
        "classes": config.classes,
        "tile_size": config.tile_size,
        "tile_multiple": tile_multiple(config.arch, **options),
        "channels": channels,
        "normalization": config.normalization,
        "label_values": config.label_values,
        "architecture": describe(config.arch, **options),
        "description": config.description,
        "training_data": config.training_data,
    }
    if config.binary_instances:
        fields.update(
            task=Task.BINARY,
            classes=SERVED_CLASSES,
            threshold=0.5,
            instances=Instances(
                seed_channel=1, seed_threshold=0.5, min_area_fraction=config.speck_fraction
            ),
        )
    fields.update(overrides)
    return ModelMetadata(**fields)
