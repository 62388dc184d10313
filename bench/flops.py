"""Model arithmetic from the ONNX graph, and the machine's practical float32 peak.

FLOPs are counted from the convolutions (``Conv``, ``ConvTranspose``) and matrix products
(``MatMul``, ``Gemm``) with the shapes of one run at a fixed tile shape: 2 FLOP per multiply-add.
Everything else in a U-Net (ReLU, pooling, concatenation, sigmoid) is memory traffic, a few
percent of the arithmetic at most, and is left out, as is usual for GFLOP figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import numpy_helper

if TYPE_CHECKING:
    import onnxruntime


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


def _ort_matmul(size: int) -> onnxruntime.InferenceSession:
    """A one-node ONNX graph ``c = a @ b``: ONNX Runtime's own SGEMM (MLAS), default threads."""
    import onnxruntime

    dims = [size, size]
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["a", "b"], ["c"])],
        "matmul",
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, dims) for n in ("a", "b")],
        [onnx.helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, dims)],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: thread pool, page faults
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def matmul_peak(size: int = 4096, repeats: int = 5) -> dict[str, float]:
    """Practical float32 peak: ``size x size`` matrix products, all cores, median GFLOP/s.

    Measured twice, with NumPy's BLAS and with ONNX Runtime's MatMul, and the faster counts:
    NumPy's OpenBLAS may pick older kernels than the CPU has (on the benchmark machine its
    runtime dispatch chose Haswell AVX2 on an AVX-512 CPU, 2/3 of MLAS's speed), and ONNX
    Runtime's MLAS is the library the model's convolutions run on.
    """
    rng = np.random.default_rng(0)
    a = rng.random((size, size), dtype=np.float32)
    b = rng.random((size, size), dtype=np.float32)
    out = np.empty((size, size), np.float32)
    flop = 2.0 * size**3
    numpy_s = _median_seconds(lambda: np.matmul(a, b, out=out), repeats)
    session = _ort_matmul(size)
    ort_s = _median_seconds(lambda: session.run(None, {"a": a, "b": b}), repeats)
    numpy_gflops, ort_gflops = flop / numpy_s / 1e9, flop / ort_s / 1e9
    return {
        "size": size,
        "seconds": min(numpy_s, ort_s),
        "gflops": max(numpy_gflops, ort_gflops),
        "numpy_gflops": numpy_gflops,
        "ort_gflops": ort_gflops,
    }
