"""The U-Net's 2x upsampling rewritten for ONNX Runtime's int8 CPU kernels, before quantizing.

Keras' ``Conv2DTranspose(kernel 2, stride 2, "same")`` reaches ONNX (tf2onnx) as a
``ConvTranspose`` followed by a ``Slice`` and a ``Pad`` that crop its output to the size
TensorFlow computes, and the decoder's ``Concatenate`` as an NCHW ``Concat``. Quantized as is,
ONNX Runtime's CPU provider runs that part in float (it has no int8 ``ConvTranspose``):
dequantize, transposed convolution, quantize, crop, and layout changes around each int8
convolution (which it runs channels-last). In ONNX Runtime's profile of version 5's int8
file (8 tiles of 256², this 2-core CPU), its convolutions took 38 % of the time and that
float, crop and layout work about 60 %.

A 2x2, stride-2 transposed convolution is exactly a 1x1 convolution to 4x the channels
followed by a pixel shuffle (each input pixel's four outputs do not overlap). Written so,
with the shuffle and the concatenation done channels-last, everything between two int8
convolutions stays int8 and channels-last, and the crop goes (the output is exactly twice the
input; the service feeds multiples of the model's ``tile_multiple``). The float graph computes
the same numbers: :func:`rewrite_upsampling` checks that on several input shapes and refuses
otherwise.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

# The largest float difference accepted between the graph and its rewrite (they agree to the
# last bit on the bundled networks; summation order may differ on others).
PARITY = 1e-5


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _level_factors(proto: onnx.ModelProto, names: list[str], tile: int) -> list[int]:
    """How many times smaller than the input each named tensor is (height), read from one
    run of the float model on a ``tile``-sized input."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    (image,) = session.get_inputs()
    shape = [1, tile, tile, int(image.shape[3])]
    outs = session.run(names, {image.name: np.zeros(shape, np.float32)})
    return [tile // out.shape[2] for out in outs]  # NCHW


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove nodes and initializers that no longer lead to an output (the crop's shape
    arithmetic)."""
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _upsampling_nodes(
    node: onnx.NodeProto,
    weight: np.ndarray,
    bias: np.ndarray,
    factor: int,
    input_shape: str,
    concat: onnx.NodeProto,
    upsampled: str,
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Conv 1x1 -> channels-last pixel shuffle -> channels-last Concat -> back to NCHW, giving
    ``concat``'s output."""
    p = node.name
    cin, cout = weight.shape[:2]
    # Output channel (i * 2 + j) * cout + c of the 1x1 convolution is output pixel (2y+i, 2x+j)
    # of channel c of the transposed one.
    w1 = weight.transpose(2, 3, 1, 0).reshape(4 * cout, cin, 1, 1)
    inits = [
        numpy_helper.from_array(w1.astype(np.float32), f"{p}/w1x1"),
        numpy_helper.from_array(np.tile(bias, 4).astype(np.float32), f"{p}/b1x1"),
        numpy_helper.from_array(np.array([0, 0, 0, 2, 2, cout], np.int64), f"{p}/split"),
        numpy_helper.from_array(np.array([1, factor, factor, 1], np.int64), f"{p}/factor"),
        numpy_helper.from_array(np.array([1, 1, 1, cout], np.int64), f"{p}/channels"),
    ]
    skip = [i for i in concat.input if i != upsampled]
    if len(skip) != 1:
        raise ValueError(f"{concat.name}: expected the upsampling and one skip, got {concat.input}")
    nodes = [
        helper.make_node(
            "Conv",
            [node.input[0], f"{p}/w1x1", f"{p}/b1x1"],
            [f"{p}/conv1x1"],
            name=f"{p}/conv1x1",
            kernel_shape=[1, 1],
        ),
        helper.make_node("Transpose", [f"{p}/conv1x1"], [f"{p}/nhwc"], perm=[0, 2, 3, 1]),
        # (N, H, W, 4C) -> (N, H, W, 2, 2, C) -> (N, H, 2, W, 2, C) -> (N, 2H, 2W, C); the
        # target shape from the graph input's, so that no activation is read for a shape.
        helper.make_node("Reshape", [f"{p}/nhwc", f"{p}/split"], [f"{p}/blocks"]),
        helper.make_node("Transpose", [f"{p}/blocks"], [f"{p}/shuffled"], perm=[0, 1, 3, 2, 4, 5]),
        helper.make_node("Div", [input_shape, f"{p}/factor"], [f"{p}/level_shape"]),
        helper.make_node("Mul", [f"{p}/level_shape", f"{p}/channels"], [f"{p}/up_shape"]),
        helper.make_node("Reshape", [f"{p}/shuffled", f"{p}/up_shape"], [f"{p}/up"]),
        helper.make_node("Transpose", [skip[0]], [f"{p}/skip_nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node(
            "Concat",
            [f"{p}/up" if i == upsampled else f"{p}/skip_nhwc" for i in concat.input],
            [f"{p}/concat_nhwc"],
            axis=3,
        ),
        helper.make_node("Transpose", [f"{p}/concat_nhwc"], list(concat.output), perm=[0, 3, 1, 2]),
    ]
    return nodes, inits


def rewrite_upsampling(proto: onnx.ModelProto, tile: int) -> onnx.ModelProto:
    """``proto`` (a tf2onnx U-Net, NHWC input) with each 2x2 stride-2 ``ConvTranspose`` and its
    crop replaced as the module says. Raises ``ValueError`` where the graph is not that shape,
    or where the rewrite's output differs from the original's by more than :data:`PARITY`."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    consumers = _consumers(graph)
    inits = {t.name: t for t in graph.initializer}
    upsamplings = [n for n in graph.node if n.op_type == "ConvTranspose"]
    if not upsamplings:
        raise ValueError("the graph has no ConvTranspose to rewrite")
    factors = _level_factors(proto, [n.output[0] for n in upsamplings], tile)
    input_shape = "pixel_shuffle/input_shape"
    new_inits: list[onnx.TensorProto] = []
    replaced: list[tuple[onnx.NodeProto, list[onnx.NodeProto], list[onnx.NodeProto]]] = []
    for node, factor in zip(upsamplings, factors, strict=True):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if list(attrs.get("kernel_shape", [])) != [2, 2] or list(attrs.get("strides", [])) != [
            2,
            2,
        ]:
            raise ValueError(f"{node.name}: expected kernel 2x2 and stride 2, got {attrs}")
        if any(attrs.get("pads", [])) or attrs.get("group", 1) != 1 or len(node.input) != 3:
            raise ValueError(f"{node.name}: expected no pads, one group and a bias, got {attrs}")
        crop = [c for c in consumers[node.output[0]] if c.op_type != "Shape"]
        chain = [c.op_type for c in crop]
        if chain != ["Slice"] or [c.op_type for c in consumers[crop[0].output[0]]] != ["Pad"]:
            raise ValueError(f"{node.name}: expected tf2onnx's Slice -> Pad crop, got {chain}")
        (pad,) = consumers[crop[0].output[0]]
        (concat,) = consumers[pad.output[0]]
        if concat.op_type != "Concat":
            raise ValueError(f"{node.name}: expected a Concat with the skip, got {concat.op_type}")
        weight = numpy_helper.to_array(inits[node.input[1]])
        bias = numpy_helper.to_array(inits[node.input[2]])
        nodes, tensors = _upsampling_nodes(
            node, weight, bias, factor, input_shape, concat, pad.output[0]
        )
        new_inits += tensors
        replaced.append((node, [node, crop[0], pad, concat], nodes))
    for first, old, new in replaced:
        at = list(graph.node).index(first)
        for k, n in enumerate(new):
            graph.node.insert(at + k, n)
        for n in old:
            graph.node.remove(n)
    graph.node.insert(0, helper.make_node("Shape", [graph.input[0].name], [input_shape]))
    graph.initializer.extend(new_inits)
    _drop_unused(graph)
    onnx.checker.check_model(model)
    check_parity(proto, model, tile)
    return model


def check_parity(
    original: onnx.ModelProto, rewritten: onnx.ModelProto, tile: int, seed: int = 0
) -> float:
    """The largest difference between the two on random inputs of several shapes (batches,
    non-square); ``ValueError`` above :data:`PARITY`."""
    import onnxruntime as ort

    a, b = (
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        for m in (original, rewritten)
    )
    (image,) = a.get_inputs()
    rng = np.random.default_rng(seed)
    worst = 0.0
    for batch, h, w in _shapes(tile):
        x = rng.random((batch, h, w, int(image.shape[3])), dtype=np.float32)
        ya, yb = (s.run(None, {image.name: x})[0] for s in (a, b))
        if ya.shape != yb.shape:
            raise ValueError(f"the rewrite's output is {yb.shape} where the graph's is {ya.shape}")
        worst = max(worst, float(np.abs(ya - yb).max()))
    if worst > PARITY:
        raise ValueError(f"the rewrite differs from the graph by {worst:.3g} (> {PARITY})")
    return worst


def _shapes(tile: int) -> Iterable[tuple[int, int, int]]:
    step = max(16, tile // 16)
    return [(2, tile, tile), (1, 2 * tile, tile), (1, tile + step, tile + 2 * step)]


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.pixel_shuffle MODEL.onnx OUT.onnx``: rewrite a float model and check
    it (the int8 variant is made by ``python -m bench.variants``)."""
    parser = argparse.ArgumentParser(prog="python -m bench.pixel_shuffle", description=__doc__)
    parser.add_argument("model", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--tile", type=int, default=256)
    args = parser.parse_args(argv)
    onnx.save(rewrite_upsampling(onnx.load(str(args.model)), args.tile), str(args.out))
    print(f"{args.out}: the same outputs as {args.model} within {PARITY}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
