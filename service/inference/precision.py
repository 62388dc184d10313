"""Precision variants of one model version, and which one ``precision=auto`` runs on this host.

A version folder holds the fp32 network (``model.onnx``) and may hold variants of the same
network beside it: ``model.int8.onnx`` (statically quantized) and ``model.fp16.onnx`` (float16
weights and activations, float32 input and output). Each variant carries its own metadata,
measured on the fp32 model's test images through the service's own tiling, so the choice below
is made from measurements that ship with the model, never from a guess about the hardware:

- **int8** on a CPU whose instruction set has 8-bit dot products (AVX512-VNNI, AVX-VNNI or AMX),
  where ONNX Runtime's u8 x s8 convolutions beat fp32;
- **fp16** on CUDA (Tensor Cores);
- **fp32** otherwise,

and a variant only where its IoU is within :data:`MAX_IOU_LOSS` of fp32's on every source the
card measured. Framework-free (standard library only), like the rest of ``service.inference``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

MAX_IOU_LOSS = 0.005  # a variant may cost at most this much IoU on any source, any class
# The x86 flags (as Linux's /proc/cpuinfo spells them) of 8-bit dot-product instructions.
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"


class Precision(StrEnum):
    """The arithmetic a model file runs in."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"

    @property
    def file_name(self) -> str:
        """The file of this variant in a version folder."""
        return "model.onnx" if self is Precision.FP32 else f"model.{self.value}.onnx"


AUTO = "auto"  # what requests send to let the service choose


def variant_files(version_dir: Path) -> dict[Precision, Path]:
    """The variants a version folder holds, fp32 first (``model.onnx`` whether present or not:
    a version without it is reported as broken by whoever loads it)."""
    files = {Precision.FP32: version_dir / Precision.FP32.file_name}
    for precision in (Precision.INT8, Precision.FP16):
        path = version_dir / precision.file_name
        if path.is_file():
            files[precision] = path
    return files


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU's instruction-set flags that matter for the choice."""

    model: str
    flags: frozenset[str]

    @property
    def int8_dot(self) -> list[str]:
        """The 8-bit dot-product extensions present (empty: none)."""
        return [flag for flag in INT8_DOT_FLAGS if flag in self.flags]

    @classmethod
    def read(cls, cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuFeatures:
        """From Linux's ``/proc/cpuinfo`` (no flags where it cannot be read: fp32 then)."""
        try:
            text = cpuinfo.read_text(errors="replace")
        except OSError:
            return cls("unknown", frozenset())
        fields: dict[str, str] = {}
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() not in fields:
                fields[key.strip()] = value.strip()
        return cls(fields.get("model name", "unknown"), frozenset(fields.get("flags", "").split()))


def _foreground_iou(entry: Mapping[str, Any]) -> dict[str, float]:
    iou = entry.get("iou") or {}
    # The background class is where every model is near 1: the classes that matter are the rest.
    return {cls: float(v) for i, (cls, v) in enumerate(iou.items()) if i > 0}


def source_ious(metrics: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Foreground-class IoU per source of a card's metrics (test split and held-out sources)."""
    out: dict[str, dict[str, float]] = {}
    for group in ("per_source", "held_out"):
        for source, entry in (metrics.get(group) or {}).items():
            out[f"{source} (held out)" if group == "held_out" else source] = _foreground_iou(entry)
    return out


def iou_loss(variant: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, float]:
    """Per source, the largest IoU the variant loses against the reference on any foreground
    class (negative: it gains). Sources the variant was not measured on are left out."""
    ref, got = source_ious(reference), source_ious(variant)
    return {
        source: max(ref[source][cls] - got[source][cls] for cls in ref[source])
        for source in ref
        if source in got and ref[source] and set(ref[source]) <= set(got[source])
    }


@dataclass(frozen=True)
class Choice:
    """What ``precision=auto`` runs, and why (logged at start-up, shown by ``GET /models``)."""

    precision: Precision
    reason: str


def _within_bound(
    precision: Precision, variants: Mapping[Precision, Mapping[str, Any]]
) -> tuple[bool, str]:
    """Whether the variant's measured IoU loss is within :data:`MAX_IOU_LOSS` on every source."""
    losses = iou_loss(variants[precision], variants[Precision.FP32])
    if not losses or len(losses) < len(source_ious(variants[Precision.FP32])):
        return False, f"{precision} was not measured on every source of the fp32 card"
    worst = max(losses, key=lambda s: losses[s])
    if losses[worst] > MAX_IOU_LOSS:
        return False, (
            f"{precision} loses {losses[worst]:.4f} IoU on {worst} (more than {MAX_IOU_LOSS})"
        )
    return True, (
        f"{precision}'s IoU is within {MAX_IOU_LOSS} of fp32's on all {len(losses)} sources "
        f"(worst: {losses[worst]:+.4f} on {worst})"
    )


def preferred(provider: str, cpu: CpuFeatures) -> Precision:
    """The precision this hardware runs fastest, measured or not: int8 on a CPU with 8-bit dot
    products, fp16 on CUDA, else fp32."""
    if provider == CUDA_PROVIDER:
        return Precision.FP16
    if provider == CPU_PROVIDER and cpu.int8_dot:
        return Precision.INT8
    return Precision.FP32


def choose(
    variants: Mapping[Precision, Mapping[str, Any]], provider: str, cpu: CpuFeatures
) -> Choice:
    """The precision ``auto`` runs, given each variant's card metrics (``metadata.metrics``),
    the execution provider that really runs the model, and the CPU."""
    wanted = preferred(provider, cpu)
    if wanted is Precision.FP32:
        if provider == CPU_PROVIDER:
            return Choice(
                Precision.FP32,
                "fp32: this CPU has no 8-bit dot-product instructions (AVX512-VNNI, AVX-VNNI "
                "or AMX), without which INT8 is not measured to pay",
            )
        return Choice(Precision.FP32, f"fp32: no variant is measured for {provider}")
    hardware = "CUDA" if wanted is Precision.FP16 else f"a CPU with {'/'.join(cpu.int8_dot)}"
    if wanted not in variants:
        return Choice(
            Precision.FP32,
            f"fp32: on {hardware} {wanted} would run, but this version has no {wanted} variant",
        )
    ok, why = _within_bound(wanted, variants)
    if not ok:
        return Choice(Precision.FP32, f"fp32: {why}")
    return Choice(wanted, f"{wanted} on {hardware}: {why}")
