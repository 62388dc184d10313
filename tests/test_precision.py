"""Precision variants of one model version: which one ``precision=auto`` runs, from the
measurements that ship with it and the host's CPU, and ``precision=`` on every entry point.

The choice is checked on every case with explicit CPU features; the service is checked on this
host, whatever its CPU, with real ONNX Runtime sessions of variant files whose masks differ.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bench.onnx_models import build_model
from service.inference.modelmeta import ModelMetadata, Normalization
from service.inference.pipeline import predict_mask
from service.inference.precision import (
    MAX_IOU_LOSS,
    CpuFeatures,
    Precision,
    choose,
    iou_loss,
    variant_files,
)
from service.segmentation.registry import OnDemandModel, load_model
from tests.conftest import png_bytes, running_app, wait_ready

VNNI = CpuFeatures("test CPU", frozenset({"avx2", "avx512f", "avx512_vnni"}))
NO_VNNI = CpuFeatures("test CPU", frozenset({"avx2", "avx512f"}))
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def card(**foreground: float) -> dict[str, Any]:
    """Card metrics with the given foreground IoU per source (the last one held out)."""
    *trained, (held, held_iou) = foreground.items()
    entry = lambda v: {"iou": {"background": 0.99, "nucleus": v}}  # noqa: E731
    return {
        "per_source": {source: entry(v) for source, v in trained},
        "held_out": {held: entry(held_iou)},
    }


FP32 = card(hela=0.90, dsb=0.85, cells3d=0.89)


def test_the_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512f avx512_vnni\n\n"
        "processor\t: 1\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512f avx512_vnni\n"
    )
    cpu = CpuFeatures.read(cpuinfo)
    assert cpu.model == "Some CPU" and cpu.int8_dot == ["avx512_vnni"]
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse4_2 avx2\n")
    assert CpuFeatures.read(cpuinfo).int8_dot == []
    assert CpuFeatures.read(tmp_path / "missing").int8_dot == []  # not Linux: fp32


def test_the_iou_loss_is_per_source_and_class() -> None:
    int8 = card(hela=0.899, dsb=0.853, cells3d=0.884)
    assert iou_loss(int8, FP32) == pytest.approx(
        {"hela": 0.001, "dsb": -0.003, "cells3d (held out)": 0.006}
    )


@pytest.mark.parametrize(
    ("provider", "cpu", "variants", "chosen", "why"),
    [
        # int8 on a CPU with VNNI, within the bound on every source
        (CPU, VNNI, {"int8": card(hela=0.897, dsb=0.85, cells3d=0.886)}, "int8", "within 0.005"),
        # ... but not when one source loses more than the bound
        (CPU, VNNI, {"int8": card(hela=0.90, dsb=0.844, cells3d=0.89)}, "fp32", "on dsb"),
        # ... nor when it was not measured on every source of the fp32 card
        (CPU, VNNI, {"int8": {"per_source": card(hela=0.9, dsb=0.85, c=0.9)["per_source"]}},
         "fp32", "not measured on every source"),
        # no 8-bit dot products: fp32 even with a good int8 variant
        (CPU, NO_VNNI, {"int8": FP32}, "fp32", "no 8-bit dot-product"),
        # CUDA: fp16 when within the bound; int8 is never a CUDA choice
        (CUDA, NO_VNNI, {"fp16": FP32, "int8": FP32}, "fp16", "fp16 on CUDA"),
        (CUDA, VNNI, {"int8": FP32}, "fp32", "no fp16 variant"),
        # a version with no variants
        (CPU, VNNI, {}, "fp32", "no int8 variant"),
    ],
)  # fmt: skip
def test_auto_picks_from_the_measurements_and_the_hardware(
    provider: str, cpu: CpuFeatures, variants: dict[str, Any], chosen: str, why: str
) -> None:
    measured = {Precision.FP32: FP32} | {Precision(p): m for p, m in variants.items()}
    choice = choose(measured, provider, cpu)
    assert choice.precision == chosen and why in choice.reason, choice


# --- the service -----------------------------------------------------------------------------

SCALE = Normalization(method="scale", scale=255.0)


def write_version(root: Path, int8_loss: float, fp16_loss: float) -> Path:
    """``toyv/1``: fp32 and two variants that threshold lower (their masks are larger), with
    cards whose IoU is ``*_loss`` below fp32's on one source."""
    version = root / "toyv" / "1"
    build_model(version / "model.onnx", name="toyv", metrics=FP32)
    for precision, loss, shift in (
        (Precision.INT8, int8_loss, 1.0),
        (Precision.FP16, fp16_loss, 2.0),
    ):
        build_model(
            version / precision.file_name,
            name="toyv",
            precision=precision,
            metrics=card(hela=0.90, dsb=0.85 - loss, cells3d=0.89),
            bias_shift=shift,
        )
    build_model(root / "toy" / "1" / "model.onnx", name="toy")  # no variants
    return version


def ramp() -> np.ndarray:
    """A horizontal 8-bit ramp: each model's threshold cuts it at a different column."""
    return np.tile(np.linspace(0, 255, 200).astype(np.uint8), (120, 1))


def segment(client: Any, **params: Any) -> tuple[np.ndarray, Any]:
    r = client.post("/segment", params=params, files={"image": ("r.png", png_bytes(ramp()))})
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(r.content))), r


def test_every_entry_point_runs_the_precision_asked_for(tmp_path: Path) -> None:
    version = write_version(tmp_path / "models", int8_loss=0.002, fp16_loss=0.02)
    expected = {}
    for precision, path in variant_files(version).items():
        model = load_model("toyv", path, [CPU], 1, 2)
        expected[precision] = predict_mask(
            ramp()[..., None], model.meta, model.predict, overlap=0.25
        )
        assert model.meta.precision is precision
    # The three files give three different masks: which one ran is visible.
    assert len({m.sum() for m in expected.values()}) == 3
    host = CpuFeatures.read()
    auto = Precision.INT8 if host.int8_dot else Precision.FP32

    with running_app(tmp_path / "models", default_model="toyv") as client:
        info = client.get("/models/toyv").json()
        assert [v["precision"] for v in info["variants"]] == ["fp32", "int8", "fp16"]
        int8 = info["variants"][1]
        assert int8["file"] == "model.int8.onnx" and int8["provider"] == CPU
        assert int8["iou_loss"] == pytest.approx({"hela": 0, "dsb": 0.002, "cells3d (held out)": 0})
        assert info["auto"]["precision"] == auto
        assert ("within" if host.int8_dot else "no 8-bit") in info["auto"]["reason"]
        assert info["metadata"]["precision"] == "fp32" and info["default"] is True

        for asked in ("fp32", "int8", "fp16", "auto"):
            ran = auto if asked == "auto" else Precision(asked)
            mask, r = segment(client, precision=asked, overlap=0.25)
            assert r.headers["X-Precision"] == ran
            np.testing.assert_array_equal(mask > 0, expected[ran] > 0)
        r = client.post(
            "/segment", params={"precision": "int8", "format": "json"},
            files={"image": ("r.png", png_bytes(ramp()))},
        )  # fmt: skip
        assert r.json()["precision"] == "int8" and r.json()["version"] == "1"

        # /jobs takes the same parameter and says what ran.
        job = client.post(
            "/jobs", params={"precision": "fp16"}, files={"image": ("r.png", png_bytes(ramp()))}
        ).json()
        for _ in range(200):
            status = client.get(f"/jobs/{job['id']}").json()
            if status["state"] in ("succeeded", "failed"):
                break
        result = client.get(f"/jobs/{job['id']}/result")
        assert result.status_code == 200 and result.headers["X-Precision"] == "fp16"

        # A precision this version lacks, or no precision at all: 422, naming what there is.
        r = client.post(
            "/segment", params={"model": "toy", "precision": "int8"},
            files={"image": ("r.png", png_bytes(ramp()))},
        )  # fmt: skip
        assert r.status_code == 422 and "['fp32']" in r.json()["detail"]
        assert r.json()["request_id"]
        r = client.post(
            "/segment", params={"precision": "fp64"}, files={"image": ("r.png", png_bytes(ramp()))}
        )
        assert r.status_code == 422 and "'auto', 'fp32', 'fp16' or 'int8'" in r.text
        toy = client.get("/models/toy").json()
        assert [v["precision"] for v in toy["variants"]] == ["fp32"]
        assert toy["auto"]["precision"] == "fp32"


def test_a_variant_over_the_bound_is_served_but_never_chosen(tmp_path: Path) -> None:
    write_version(tmp_path / "models", int8_loss=2 * MAX_IOU_LOSS, fp16_loss=0.0)
    with running_app(tmp_path / "models", default_model="toyv") as client:
        info = client.get("/models/toyv").json()
        assert info["auto"]["precision"] == "fp32"
        if CpuFeatures.read().int8_dot:
            assert "int8 loses 0.0100 IoU on dsb" in info["auto"]["reason"]
        assert segment(client)[1].headers["X-Precision"] == "fp32"
        assert segment(client, precision="int8")[1].headers["X-Precision"] == "int8"


def test_a_variant_whose_file_is_misnamed_fails_alone(tmp_path: Path) -> None:
    """An fp32 model in ``model.int8.onnx`` is refused (it would be served as int8); the
    version still serves fp32, and /readyz says what failed."""
    version = tmp_path / "models" / "toy" / "1"
    build_model(version / "model.onnx")
    build_model(version / "model.int8.onnx")  # metadata says fp32
    with running_app(tmp_path / "models", expect_ready=503) as client:
        ready = client.get("/readyz").json()
        assert "must be model.onnx" in ready["failed"]["toy (int8)"]
        assert segment(client)[1].headers["X-Precision"] == "fp32"
        wait_ready(client, expect=503)


def test_a_precision_auto_does_not_run_here_loads_on_its_first_request(tmp_path: Path) -> None:
    """The default (``SEG_MODEL_VERSIONS=all``): the newest version's fp32 file and the one
    ``auto`` runs are loaded at start; another precision is listed from its metadata and loaded
    by the first request that asks for it, which gets its masks."""
    write_version(tmp_path / "models", int8_loss=0.0, fp16_loss=0.0)
    with running_app(tmp_path / "models", default_model="toyv") as client:
        registry = client.app.state.registry  # type: ignore[attr-defined]
        variants = registry.variants[("toyv", "1")]
        auto = registry.auto[("toyv", "1")].precision
        waiting = {p for p, m in variants.items() if isinstance(m, OnDemandModel)}
        assert waiting == set(Precision) - {Precision.FP32, auto}
        listed = [v["precision"] for v in client.get("/models/toyv").json()["variants"]]
        assert sorted(listed) == sorted(str(p) for p in Precision)
        assert not variants[Precision.FP16].loaded
        half, r = segment(client, precision="fp16")
        assert r.headers["X-Precision"] == "fp16" and variants[Precision.FP16].loaded
    with running_app(tmp_path / "models", default_model="toyv", model_versions="all-at-start") as c:
        assert np.array_equal(segment(c, precision="fp16")[0], half)


def test_newest_only_loads_the_variant_the_host_would_run(tmp_path: Path) -> None:
    """``SEG_MODEL_VERSIONS=newest`` (small containers): fp32 and the hardware's variant."""
    write_version(tmp_path / "models", int8_loss=0.0, fp16_loss=0.0)
    with running_app(tmp_path / "models", default_model="toyv", model_versions="newest") as client:
        loaded = [v["precision"] for v in client.get("/models/toyv").json()["variants"]]
    assert loaded == (["fp32", "int8"] if CpuFeatures.read().int8_dot else ["fp32"])


def test_a_variant_keeps_the_metadata_the_pipeline_needs() -> None:
    meta = ModelMetadata.from_props(
        ModelMetadata(
            name="m", task="binary", classes=["b", "f"], tile_size=64, channels=1,
            normalization=SCALE, precision=Precision.INT8,
        ).to_props()
    )  # fmt: skip
    assert meta.precision is Precision.INT8 and meta.precision.file_name == "model.int8.onnx"
    # Files written before variants existed carry no precision: they are fp32.
    props = meta.to_props()
    del props["precision"]
    assert ModelMetadata.from_props(props).precision is Precision.FP32
