"""The default model source by source: IoU, edge placement, and what ``diameter=`` changes.

    python -m bench.generalist [--baseline OLD.onnx]   # -> docs/generalist.md, .json

For every source of the ``nuclei`` preset (the test split of each training source, every image
of the held-out one), through the service's own pipeline (``predict_mask``: tiling, Gaussian
blending, threshold) with the bundled model loaded by the service's registry:

- nucleus IoU and Dice over all pixels of the source's images;
- edge placement (``training.boundary``): median predicted / true area of the nuclei found,
  mean signed edge distance, and where the source's labels sit in the intensity step;
- the same with ``diameter=`` set to the source's median labelled nucleus diameter (what a
  user measures on a few nuclei), which rescales each image to the model's training scale;
- a global Otsu threshold, the floor any model must beat;
- optionally a baseline ONNX file (e.g. the previous default) through the same path.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.markdown import replace_generated
from bench.run import machine
from training.boundary import BoundaryBias, boundary_bias, edge_profile
from training.data import Pair, object_diameters, read_image, read_mask
from training.presets import PRESETS

DOC = Path("docs/generalist.md")
TOOL = "python -m bench.generalist"


def source_pairs() -> dict[str, tuple[str, list[Pair]]]:
    """Each source's evaluation images: ``{source: (role, pairs)}``."""
    config = PRESETS["nuclei"]
    out: dict[str, tuple[str, list[Pair]]] = {}
    for pair in config.splits()["test"]:
        out.setdefault(pair.source, ("test split", []))[1].append(pair)
    for pair in config.held_out_pairs():
        out.setdefault(pair.source, ("held out", []))[1].append(pair)
    return out


def _otsu(image: np.ndarray) -> np.ndarray:
    from skimage.filters import threshold_otsu

    grey = image[..., 0] if image.ndim == 3 else image
    return (grey > threshold_otsu(grey)).astype(np.uint8)


def score(pairs: list[Pair], segment: Any, diameter: float | None = None) -> dict[str, Any]:
    """Nucleus IoU/Dice over all pixels of ``pairs`` and the edge placement of ``segment``."""
    inter = union = total = 0
    bias = BoundaryBias()
    seconds = 0.0
    for pair in pairs:
        image, labels = read_image(pair.image), read_mask(pair.mask)
        start = time.perf_counter()
        pred = segment(image, diameter) > 0
        seconds += time.perf_counter() - start
        truth = labels > 0
        inter += int((pred & truth).sum())
        union += int((pred | truth).sum())
        total += int(pred.sum() + truth.sum())
        bias = bias + boundary_bias(pred, labels)
    return {
        "iou": round(inter / max(union, 1), 4),
        "dice": round(2 * inter / max(total, 1), 4),
        **bias.as_dict(),
        "seconds_per_image": round(seconds / len(pairs), 3),
    }


def _model(path: Path) -> Any:
    from service.segmentation.registry import load_model

    return load_model("nuclei", path, ["CPUExecutionProvider"], 0, 1)


def run(models: dict[str, Path]) -> dict[str, Any]:
    """Every source under every model (and Otsu); with diameter= for the bundled model."""
    from service.inference.pipeline import predict_mask

    loaded = {name: _model(path) for name, path in models.items()}
    result: dict[str, Any] = {"machine": machine(), "sources": {}}
    for source, (role, pairs) in source_pairs().items():
        masks = [read_mask(p.mask) for p in pairs]
        diameter = float(np.median(np.concatenate([object_diameters(m) for m in masks])))
        found = [edge_profile(read_image(p.image), m) for p, m in zip(pairs, masks, strict=True)]
        profiles = [f for f in found if f is not None]
        profile = {
            d: round(float(np.mean([f[d] for f in profiles if d in f])), 3) for d in profiles[0]
        }
        entry: dict[str, Any] = {
            "role": role,
            "images": len(pairs),
            "median_nucleus_diameter_px": round(diameter, 1),
            "label_edge_level": profile[0],
            "edge_profile": profile,
            "otsu": score(pairs, lambda image, _d: _otsu(image)),
        }
        for name, model in loaded.items():

            def segment(image: np.ndarray, d: float | None, model: Any = model) -> np.ndarray:
                return predict_mask(image, model.meta, model.predict, diameter=d)

            entry[name] = score(pairs, segment)
            if model.meta.object_diameter is not None:
                entry[f"{name} + diameter"] = score(pairs, segment, diameter)
        result["sources"][source] = entry
        print(json.dumps({source: entry}), flush=True)
    result["object_diameter"] = {n: m.meta.object_diameter for n, m in loaded.items()}
    return result


ZOOMS = (0.33, 0.5, 2.0, 3.0)


def _zoomed(pair: Pair, zoom: float) -> tuple[np.ndarray, np.ndarray]:
    """A test image and its labels as if imaged at ``zoom`` times the magnification (image
    bilinear with antialiasing by Pillow, labels nearest)."""
    from PIL import Image

    image, labels = read_image(pair.image)[..., 0], read_mask(pair.mask)
    size = (round(image.shape[1] * zoom), round(image.shape[0] * zoom))
    grey = Image.fromarray(image.astype(np.float32), mode="F").resize(
        size, Image.Resampling.BILINEAR
    )
    label_img = Image.fromarray(labels.astype(np.int32), mode="I").resize(
        size, Image.Resampling.NEAREST
    )
    return np.asarray(grey)[..., None], np.asarray(label_img)


def scale_sweep(models: dict[str, Path], source: str = "hela") -> dict[str, Any]:
    """The test images of ``source`` zoomed 0.33-3x, each model with and without diameter=
    (the zoomed nuclei's true median diameter): where the training scale starts to matter."""
    from service.inference.pipeline import predict_mask

    loaded = {name: _model(path) for name, path in models.items()}
    pairs = source_pairs()[source][1]
    out: dict[str, Any] = {}
    for zoom in ZOOMS:
        zoomed = [_zoomed(p, zoom) for p in pairs]
        diameter = float(np.median(np.concatenate([object_diameters(m) for _, m in zoomed])))
        row: dict[str, Any] = {"median_nucleus_diameter_px": round(diameter, 1)}
        for name, model in loaded.items():
            for d in (None, diameter) if model.meta.object_diameter is not None else (None,):
                inter = union = 0
                for image, labels in zoomed:
                    pred = predict_mask(image, model.meta, model.predict, diameter=d) > 0
                    inter += int((pred & (labels > 0)).sum())
                    union += int((pred | (labels > 0)).sum())
                row[name if d is None else f"{name} + diameter"] = round(inter / max(union, 1), 4)
        out[str(zoom)] = row
        print(json.dumps({f"{source} x{zoom}": row}), flush=True)
    return out


def _cell(entry: dict[str, Any]) -> str:
    d = entry.get("mean_signed_distance_px")
    ratio = entry.get("median_area_ratio")
    edge = "n/a" if d is None else f"{d:+.2f}"
    return f"{entry['iou']:.3f} | {'n/a' if ratio is None else f'{ratio:.2f}'} | {edge}"


def write_doc(result: dict[str, Any]) -> None:
    """Tables into docs/generalist.md between the generated markers."""
    names = [k for k in next(iter(result["sources"].values())) if isinstance(k, str)]
    columns = [
        k
        for k in names
        if k
        not in ("role", "images", "median_nucleus_diameter_px", "label_edge_level", "edge_profile")
    ]
    m = result["machine"]
    lines = [
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {m.get('cpu', 'this CPU')} "
        f"({m.get('cores', '?')} cores), ONNX Runtime on the CPU, through "
        "`service.inference.pipeline.predict_mask` (tile 256, overlap 0.25, Gaussian blending).",
        "Training scale (`object_diameter`) of each model: "
        + ", ".join(f"{n}: {d} px" for n, d in result["object_diameter"].items())
        + ".",
        "",
        "Each cell: nucleus IoU / median predicted:true area of the nuclei found / mean signed "
        "edge distance in px (positive: a halo outside the true edge).",
        "",
        "| source | role | images | nucleus diameter (px) | label edge level | "
        + " | ".join(columns)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(columns),
    ]
    for source, e in result["sources"].items():
        cells = " | ".join(_cell(e[c]).replace(" | ", " / ") for c in columns)
        lines.append(
            f"| {source} | {e['role']} | {e['images']} | {e['median_nucleus_diameter_px']} | "
            f"{e['label_edge_level']:.2f} | {cells} |"
        )
    distances = list(next(iter(result["sources"].values()))["edge_profile"])
    lines += [
        "",
        "Intensity across the labels' edges (0: background, 1: nucleus) at each distance from "
        "the labels' outermost pixel (0; negative inside, positive outside):",
        "",
        "| source | " + " | ".join(f"{int(d):+d}" for d in distances) + " |",
        "|---|" + "---|" * len(distances),
    ]
    for source, e in result["sources"].items():
        lines.append(
            f"| {source} | " + " | ".join(f"{e['edge_profile'][d]:.2f}" for d in distances) + " |"
        )
    sweep = result.get("scale_sweep")
    if sweep:
        names = [k for k in next(iter(sweep.values())) if k != "median_nucleus_diameter_px"]
        lines += [
            "",
            "The HeLa test frames zoomed as if imaged at another magnification (image bilinear, "
            "labels nearest); nucleus IoU without and with `diameter=` set to the zoomed nuclei's "
            "median diameter:",
            "",
            "| zoom | nucleus diameter (px) | " + " | ".join(names) + " |",
            "|---|---|" + "---|" * len(names),
        ]
        for zoom, row in sweep.items():
            cells = " | ".join(f"{row[n]:.3f}" for n in names)
            lines.append(f"| {zoom}x | {row['median_nucleus_diameter_px']} | {cells} |")
    replace_generated(DOC, TOOL, lines, "The default model, source by source")
    DOC.with_suffix(".json").write_text(json.dumps(result, indent=2))


def main() -> None:
    """Measure the bundled model (and a baseline, if given) on every source; write the doc."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/nuclei/1/model.onnx")
    parser.add_argument("--baseline", help="another ONNX file measured the same way")
    parser.add_argument("--baseline-name", default="baseline")
    parser.add_argument(
        "--baseline-scale",
        type=float,
        help="measure the baseline with diameter= too, taking this as its training scale "
        "(for a model released before object_diameter existed)",
    )
    args = parser.parse_args()
    models = {"nuclei": Path(args.model)}
    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline:
            models[args.baseline_name] = Path(args.baseline)
            if args.baseline_scale:
                models[args.baseline_name] = _with_scale(
                    Path(args.baseline), args.baseline_scale, Path(tmp)
                )
        result = run(models)
        result["scale_sweep"] = scale_sweep(models)
        write_doc(result)


def _with_scale(path: Path, diameter: float, tmp: Path) -> Path:
    """A copy of an ONNX model whose metadata says its training scale is ``diameter`` px."""
    import onnx

    proto = onnx.load(str(path))
    for prop in [p for p in proto.metadata_props if p.key == "object_diameter"]:
        proto.metadata_props.remove(prop)
    proto.metadata_props.add(key="object_diameter", value=json.dumps(diameter))
    out = tmp / "baseline.onnx"
    onnx.save(proto, str(out))
    return out


if __name__ == "__main__":
    main()
