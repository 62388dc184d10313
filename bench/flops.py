"""Model arithmetic from the ONNX graph, and the machine's practical float32 peak.

FLOPs are counted from the convolutions (``Conv``, ``ConvTranspose``) and matrix products
(``MatMul``, ``Gemm``) with the shapes of one run at a fixed tile shape: 2 FLOP per multiply-add.
Everything else in a U-Net (ReLU, pooling, concatenation, sigmoid) is memory traffic, a few
percent of the arithmetic at most, and is left out, as is usual for GFLOP figures.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def _tensor_shapes(model: onnx.ModelProto, names: set[str], feed: np.ndarray) -> dict[str, tuple]:
    """Shapes of the tensors ``names`` for one run on ``feed``.

    ONNX shape inference loses track of tf2onnx's dynamic shapes in some networks (resizes,
    reshapes), so the shapes come from one ONNX Runtime run with every tensor of interest
    exposed as a graph output.
    """
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for name in sorted(names - known):
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = sorted(names)
    outputs = session.run(wanted, {probe.graph.input[0].name: feed})
    return {name: out.shape for name, out in zip(wanted, outputs, strict=True)}


def conv_flops(model_path: Path, tile: int, channels: int, batch: int = 1) -> dict[str, float]:
    """FLOPs of one forward pass on ``batch`` tiles of ``tile x tile x channels`` (NHWC input).

    Returns ``{"gflop": ..., "conv_layers": n, "largest_layer_share": ...}`` (per ``batch``).
    """
    model = onnx.load(str(model_path))
    graph = model.graph
    weights = {t.name: numpy_helper.to_array(t).shape for t in graph.initializer}
    # Quantized (QDQ) models feed each weight through a DequantizeLinear node.
    for n in graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in weights:
            weights[n.output[0]] = weights[n.input[0]]
    nodes = [
        n
        for n in graph.node
        if n.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm") and n.input[1] in weights
    ]
    names = {name for n in nodes for name in (n.input[0], n.output[0])}
    feed = np.zeros((batch, tile, tile, channels), np.float32)
    shapes = _tensor_shapes(model, names, feed)
    per_layer: list[float] = []
    for node in nodes:
        w = weights[node.input[1]]
        if node.op_type == "Conv":
            # out: (N, Cout, H, W); w: (Cout, Cin/group, kh, kw): the group is in the weights.
            macs = float(np.prod(shapes[node.output[0]])) * float(np.prod(w[1:]))
        elif node.op_type == "ConvTranspose":
            # Every input pixel scatters a (Cout/group, kh, kw) patch per input channel.
            macs = float(np.prod(shapes[node.input[0]])) * float(np.prod(w[1:]))
        else:  # MatMul / Gemm against a weight matrix
            macs = float(np.prod(shapes[node.input[0]])) * float(w[-1])
        per_layer.append(2.0 * macs)
    total = sum(per_layer)
    return {
        "gflop": total / 1e9,
        "conv_layers": float(len(per_layer)),
        "largest_layer_share": max(per_layer) / total if per_layer else 0.0,
    }


def matmul_peak(size: int = 4096, repeats: int = 5) -> dict[str, float]:
    """Practical float32 peak: the median GFLOP/s of ``size x size`` matrix products (BLAS)."""
    rng = np.random.default_rng(0)
    a = rng.random((size, size), dtype=np.float32)
    b = rng.random((size, size), dtype=np.float32)
    out = np.empty((size, size), np.float32)
    np.matmul(a, b, out=out)  # warm-up: thread pool, page faults
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.matmul(a, b, out=out)
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    return {"size": size, "seconds": seconds, "gflops": 2.0 * size**3 / seconds / 1e9}
