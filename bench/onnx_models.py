"""Small real ONNX segmentation models built with ``onnx.helper`` for tests.

They are fully convolutional NHWC networks with the same interface as the exported U-Nets
(one input ``(N, H, W, C)``, probabilities ``(N, H, W, K)``, metadata in ``metadata_props``),
so the service loads them exactly as it loads a trained model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.inference.modelmeta import Instances, ModelMetadata, Normalization, Task
from service.inference.precision import Precision


def build_model(
    path: Path,
    *,
    name: str = "toy",
    classes: list[str] | None = None,
    channels: int = 1,
    tile_size: int = 64,
    kernel: int = 1,
    seed: int = 0,
    input_name: str = "input_1",
    output_name: str = "output_0",
    normalization: Normalization | None = None,
    label_values: list[int] | None = None,
    object_diameter: float | None = None,
    instances: Instances | None = None,
    version: str = "1",
    precision: Precision = Precision.FP32,
    metrics: dict[str, Any] | None = None,
    bias_shift: float = 0.0,
) -> ModelMetadata:
    """Write a one-convolution model to ``path``: sigmoid for 2 classes, softmax otherwise.

    A binary model with ``kernel=1`` computes ``sigmoid(8 * (x - 0.5))`` pointwise on the
    normalised intensity, so the expected mask of any image is known exactly. With
    ``instances`` it has a second channel, the cores: ``sigmoid(8 * (x - 0.75))`` (pixels of
    at least 0.75 are an object's core).

    ``precision`` and ``metrics`` go into the metadata (a variant file of a version, with the
    figures its card would carry); ``bias_shift`` moves the threshold of a binary model's
    foreground by ``bias_shift / 8`` of the intensity, so that a variant's masks differ.
    """
    classes = classes or ["background", "foreground"]
    binary = len(classes) == 2
    k_out = (2 if instances is not None else 1) if binary else len(classes)
    rng = np.random.default_rng(seed)
    if binary and kernel == 1:
        w = np.full((k_out, channels, 1, 1), 8.0 / channels, np.float32)
        b = np.array([-4.0 + bias_shift, -6.0][:k_out], np.float32)
    else:
        w = rng.normal(0, 1, (k_out, channels, kernel, kernel)).astype(np.float32)
        b = np.linspace(-1, 1, k_out).astype(np.float32)
    activation = (
        helper.make_node("Sigmoid", ["logits"], ["probs"])
        if binary
        else helper.make_node("Softmax", ["logits"], ["probs"], axis=1)
    )
    nodes = [
        helper.make_node("Transpose", [input_name], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "w", "b"], ["logits"], pads=[kernel // 2] * 4),
        activation,
        helper.make_node("Transpose", ["probs"], [output_name], perm=[0, 2, 3, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", "H", "W", channels])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", "H", "W", k_out])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = ModelMetadata(
        name=name,
        version=version,
        task=Task.BINARY if binary else Task.MULTICLASS,
        classes=classes,
        tile_size=tile_size,
        tile_multiple=16,
        channels=channels,
        normalization=normalization or Normalization(method="scale", scale=255.0),
        threshold=0.5,
        label_values=label_values,
        object_diameter=object_diameter,
        instances=instances,
        architecture="test-conv",
        description="test model built by bench/onnx_models.py",
        precision=precision,
        metrics=metrics or {},
    )
    helper.set_model_props(model, meta.to_props())
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return meta
