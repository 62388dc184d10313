"""Keras -> ONNX (tf2onnx) with embedded metadata, a parity check, and the Triton layout."""

from __future__ import annotations

import subprocess
from pathlib import Path

import keras
import numpy as np
import onnx
import onnxruntime as ort
import tensorflow as tf
import tf2onnx

from service.inference.modelmeta import ModelMetadata

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

    proto, _ = tf2onnx.convert.from_function(serve, input_signature=spec, opset=OPSET)
    set_metadata(proto, meta)
    return proto


def set_metadata(proto: onnx.ModelProto, meta: ModelMetadata) -> None:
    """Replace the model's ``metadata_props`` with ``meta`` (the service reads them back)."""
    onnx.helper.set_model_props(proto, meta.to_props())
    proto.producer_name = "segtrain"
    proto.doc_string = meta.description


def ort_predictor(source: onnx.ModelProto | Path) -> ort.InferenceSession:
    """A CPU ONNX Runtime session for an ONNX model in memory or on disk."""
    data = source.SerializeToString() if isinstance(source, onnx.ModelProto) else str(source)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def check_parity(
    model: keras.Model,
    session: ort.InferenceSession,
    tiles: np.ndarray,
    tolerance: float = PARITY_TOLERANCE,
) -> float:
    """Max abs difference of Keras and ORT outputs on ``tiles``; raise :class:`ParityError` above
    ``tolerance``."""
    tiles = tiles.astype(np.float32)
    expected = np.asarray(model.predict(tiles, batch_size=8, verbose=0))
    got = session.run([OUTPUT_NAME], {INPUT_NAME: tiles})[0]
    diff = float(np.max(np.abs(expected - got)))
    if not diff <= tolerance:  # also catches NaN
        raise ParityError(f"Keras vs ONNX Runtime max abs diff {diff:.3g} > {tolerance:g}")
    return diff


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
