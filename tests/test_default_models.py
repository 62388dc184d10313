"""The bundled models: they load as the service loads them, carry valid metadata, stay small,
and tiled inference through the service's stitching agrees with a single whole-image pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.core.config import DEFAULT_OVERLAP, REPO_MODELS
from service.inference.modelmeta import Task
from service.inference.pipeline import predict_mask
from service.inference.precision import variant_files
from service.segmentation.registry import find_model_files, load_model

BUNDLED = ["nuclei", "nuclei-3class"]
# Every file the service may run: each bundled model's newest version in each of its precisions.
FILES = {
    f"{name}:{precision}": path
    for name, newest in find_model_files(REPO_MODELS).items()
    for precision, path in variant_files(newest.parent).items()
}


def synthetic_nuclei(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Bright blurred ellipses on a noisy dark background, 16-bit like the HeLa frames."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: size[0], : size[1]]
    image = np.zeros(size, np.float64)
    for _ in range(size[0] * size[1] // 3000):
        cy, cx = rng.uniform(0, size[0]), rng.uniform(0, size[1])
        ry, rx = rng.uniform(6, 14), rng.uniform(6, 14)
        edge = 8 * (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 - 1)
        # 1 / (1 + exp(edge)), written so that far from the nucleus exp does not overflow.
        image += rng.uniform(0.6, 1.0) * np.exp(-np.logaddexp(0, edge))
    image = image.clip(0, 1) * 3000 + 200 + rng.normal(0, 40, size)
    return image.clip(0, 65535).astype(np.uint16)


@pytest.fixture(scope="module")
def models() -> dict[str, object]:
    return {
        key: load_model(key.split(":")[0], path, ["CPUExecutionProvider"], 0, 2)
        for key, path in FILES.items()
    }


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_model_is_complete_and_small(name: str) -> None:
    folder = REPO_MODELS / name
    onnx_file = find_model_files(REPO_MODELS)[name]
    assert onnx_file.stat().st_size < 8 * 2**20, "bundled models must stay a few MB"
    assert (folder / "config.pbtxt").is_file(), "the folder must be a Triton model repository"
    assert (folder / "README.md").is_file(), "every bundled model has a model card"


def test_metadata_is_what_the_service_needs(models: dict[str, object]) -> None:
    nuclei, three = models["nuclei:fp32"], models["nuclei-3class:fp32"]
    assert nuclei.meta.task is Task.BINARY and nuclei.meta.num_classes == 2  # type: ignore[attr-defined]
    # The default's network (version 2's) gives instances: 2 channels, foreground and cores.
    assert nuclei.meta.instances is not None and nuclei.meta.output_channels == 2  # type: ignore[attr-defined]
    assert three.meta.task is Task.MULTICLASS and three.meta.num_classes == 3  # type: ignore[attr-defined]
    # The default's newest version has its int8 and fp16 variants; earlier ones stay.
    assert {k for k in FILES if k.startswith("nuclei:")} == {
        "nuclei:fp32",
        "nuclei:int8",
        "nuclei:fp16",
    }
    assert (REPO_MODELS / "nuclei" / "1" / "model.onnx").is_file()
    for key, m in models.items():
        meta = m.meta  # type: ignore[attr-defined]
        assert meta.precision == key.split(":")[1]
        assert meta.tile_size % meta.tile_multiple == 0 and meta.channels == 1
        assert meta.metrics, "held-out test metrics travel with the model"
        if key.startswith("nuclei:"):  # a variant is served exactly as its fp32 file
            own = {"precision", "metrics"}
            assert meta.model_dump(exclude=own) == nuclei.meta.model_dump(exclude=own)  # type: ignore[attr-defined]


@pytest.mark.parametrize("overlap", [0.25, DEFAULT_OVERLAP])
@pytest.mark.parametrize("key", list(FILES))
def test_tiled_inference_agrees_with_whole_image(
    models: dict[str, object], key: str, overlap: float
) -> None:
    """The U-Net sees 2**depth-aligned context either way; stitched tiles (overlap, Gaussian
    blending) must reproduce the whole-image mask except for a sliver of border pixels: at
    the overlap the cards were measured at, and at the service's default (no seams)."""
    model = models[key]
    meta = model.meta  # type: ignore[attr-defined]
    side = 2 * meta.tile_size + meta.tile_multiple * 3  # several tiles, a multiple of 2**depth
    image = synthetic_nuclei((side, side - meta.tile_multiple))
    tiled = predict_mask(image, meta, model.predict, batch_size=4, overlap=overlap)  # type: ignore[attr-defined]
    whole_meta = meta.model_copy(update={"tile_size": side})
    whole = predict_mask(image, whole_meta, model.predict, batch_size=1)  # type: ignore[attr-defined]
    agreement = float((tiled == whole).mean())
    assert agreement > 0.995, f"tiled and whole-image masks agree on only {agreement:.4%}"
    assert 0.02 < float((tiled > 0).mean()) < 0.9, "the model finds the synthetic nuclei"


def test_real_model_file_paths_are_under_models() -> None:
    for name, path in find_model_files(REPO_MODELS).items():
        assert Path(path).relative_to(REPO_MODELS).parts[0] == name
