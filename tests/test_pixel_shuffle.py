"""The default network's upsampling rewritten for ONNX Runtime's int8 CPU kernels
(:mod:`bench.pixel_shuffle`): the same numbers, no transposed convolution left, and a rewrite
that would change the numbers or a graph of another shape refused."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bench.onnx_models import build_model
from bench.pixel_shuffle import PARITY, check_parity, rewrite_upsampling
from service.core.config import REPO_MODELS
from service.inference.modelmeta import ModelMetadata
from service.inference.pipeline import predict_mask
from service.segmentation.registry import load_model

NETWORK = REPO_MODELS / "nuclei" / "4" / "model.onnx"  # the default's network, tf2onnx's graph


@pytest.fixture(scope="module")
def network() -> onnx.ModelProto:
    return onnx.load(str(NETWORK))


def test_the_upsampling_becomes_a_1x1_conv_and_a_shuffle_with_the_same_numbers(
    network: onnx.ModelProto, tmp_path: Path
) -> None:
    rewritten = rewrite_upsampling(network, 256)
    before = Counter(n.op_type for n in network.graph.node)
    after = Counter(n.op_type for n in rewritten.graph.node)
    assert before["ConvTranspose"] == 4 and after["ConvTranspose"] == 0
    assert after["Pad"] == 0 and after["Conv"] == before["Conv"] + 4
    assert check_parity(network, rewritten, 256, seed=7) <= PARITY
    # Through the service's pipeline, on an image whose size is no multiple of the tile: the
    # same mask, the same probabilities.
    path = tmp_path / "model.onnx"
    onnx.save(rewritten, str(path))
    models = [load_model("nuclei", p, ["CPUExecutionProvider"], 0, 1) for p in (NETWORK, path)]
    rng = np.random.default_rng(3)
    image = (rng.random((300, 420)) * 4000).astype(np.uint16)
    masks = [predict_mask(image, m.meta, m.predict, batch_size=4) for m in models]
    assert np.array_equal(masks[0], masks[1])


def test_a_rewrite_that_changes_the_numbers_is_refused(network: onnx.ModelProto) -> None:
    rewritten = rewrite_upsampling(network, 256)
    weight = next(t for t in rewritten.graph.initializer if t.name.endswith("/w1x1"))
    wrong = numpy_helper.to_array(weight).copy()
    wrong[0] += 0.05
    weight.CopyFrom(numpy_helper.from_array(wrong, weight.name))
    with pytest.raises(ValueError, match=r"differs from the graph by .* \(> 1e-05\)"):
        check_parity(network, rewritten, 256)


def test_a_graph_without_the_upsampling_is_refused_saying_so(tmp_path: Path) -> None:
    build_model(tmp_path / "toy.onnx")
    with pytest.raises(ValueError, match="no ConvTranspose to rewrite"):
        rewrite_upsampling(onnx.load(str(tmp_path / "toy.onnx")), 64)


def test_the_newest_int8_file_was_made_from_the_rewritten_graph() -> None:
    path = REPO_MODELS / "nuclei" / "6" / "model.int8.onnx"
    proto = onnx.load(str(path), load_external_data=False)
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["ConvTranspose"] == 0 and ops["Pad"] == 0, ops
    meta = ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props})
    assert "bench.pixel_shuffle" in meta.metrics["variant_made_with"]
