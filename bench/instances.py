"""How touching nuclei are separated, chosen by measurement: the default model's outputs through
the service's tiling, turned into objects three ways, scored object by object per source.

    python -m bench.instances [--model models/nuclei/2/model.onnx]   # -> docs/instances.md, .json

For every source of the ``nuclei`` preset (each training source's test split, every image of
the held-out cells3d), the model runs once per image (``predict_mask`` with the cores: tiling,
Gaussian blending, thresholds), and its foreground and cores become objects by:

- **cores**: the service's way (``service.inference.instances``): the predicted cores seed a
  watershed over the foreground (each pixel to its nearest core in its component);
- **distance**: the classic way for a mask-only model: seeds at the maxima of the foreground's
  distance transform (at least a quarter of the training diameter apart), a watershed on the
  inverted distance (scikit-image), which needs no second output channel;
- **components**: connected components of the foreground, what a mask gives without more.

All three drop specks by the same rule (``speck_area``). Scores: F1, precision and recall at
IoU 0.5, AP at 0.5 and mean AP over 0.5:0.95 (``service.inference.matching``), each from the
counts summed over the source's images; and the time each method takes per megapixel.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from bench.generalist import source_pairs
from bench.markdown import replace_generated
from bench.run import machine
from service.core.config import REPO_MODELS
from service.inference.instances import CORE, label_instances, speck_area
from service.inference.matching import image_counts, object_scores
from service.inference.pipeline import predict_mask
from service.segmentation.registry import find_model_files, load_model
from training.data import read_image, read_mask

DOC = Path("docs/instances.md")
TOOL = "python -m bench.instances"
METHODS = ("cores", "distance", "components")


def _drop_specks(labels: np.ndarray, min_area: float) -> np.ndarray:
    areas = np.bincount(labels.ravel())
    keep = areas >= min_area
    keep[0] = False
    lut = np.zeros(areas.size, np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1)
    return lut[labels]


def by_distance(fg: np.ndarray, diameter: float, min_area: float) -> np.ndarray:
    """Seeds at the distance transform's maxima, a watershed on the inverted distance."""
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    distance = ndimage.distance_transform_edt(fg)
    parts, _ = ndimage.label(fg)
    peaks = peak_local_max(
        distance, min_distance=max(1, int(diameter / 4)), labels=parts, exclude_border=False
    )
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-distance, markers, mask=fg)
    return _drop_specks(labels.astype(np.int32), min_area)


def by_components(fg: np.ndarray, min_area: float) -> np.ndarray:
    """Connected components of the foreground."""
    return _drop_specks(ndimage.label(fg)[0], min_area)


def run(model_path: Path) -> dict[str, Any]:
    """Every source, every method: counts summed per source, scores, seconds per megapixel."""
    model = load_model("nuclei", model_path, ["CPUExecutionProvider"], 0, 8)
    meta = model.meta
    if meta.instances is None or meta.object_diameter is None:
        raise SystemExit(f"{model_path} gives no instances (no cores channel in its metadata)")
    diameter = meta.object_diameter
    min_area = speck_area(diameter, meta.instances.min_area_fraction)
    sources: dict[str, Any] = {}
    for source, (role, pairs) in source_pairs().items():
        counts: dict[str, list[Any]] = {m: [] for m in METHODS}
        seconds = dict.fromkeys(METHODS, 0.0)
        pixels = 0
        for pair in pairs:
            image, truth = read_image(pair.image), read_mask(pair.mask)
            codes = predict_mask(image, meta, model.predict, cores=True)
            fg = codes > 0
            pixels += fg.size
            for method in METHODS:
                start = time.perf_counter()
                if method == "cores":
                    labels = label_instances(codes, min_area=min_area)[0]
                elif method == "distance":
                    labels = by_distance(fg, diameter, min_area)
                else:
                    labels = by_components(fg, min_area)
                seconds[method] += time.perf_counter() - start
                counts[method].append(image_counts(truth, labels))
        sources[source] = {
            "role": role,
            "images": len(pairs),
            "methods": {
                m: {
                    **object_scores(counts[m]).as_dict(),
                    "seconds_per_mpx": seconds[m] / (pixels / 1e6),
                }
                for m in METHODS
            },
        }
        cores = sources[source]["methods"]["cores"]
        print(f"{source}: cores F1 {cores['f1']:.3f} AP50 {cores['ap50']:.3f}", flush=True)
    assert CORE == 2
    return {
        "model": str(model_path),
        "version": meta.version,
        "diameter": diameter,
        "min_area": min_area,
        "sources": sources,
        "machine": machine(),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def write_doc(result: dict[str, Any], path: Path = DOC) -> None:
    """The tables of the generated block of ``docs/instances.md``."""
    lines = [
        f"Run: `{TOOL}` with `{result['model']}` (version {result['version']}), "
        f"{result['started']}; {result['machine']['cpu']}. Speck rule: objects under "
        f"{result['min_area']:.0f} px (10 % of a {result['diameter']:.1f} px disc) dropped, "
        "by every method.",
        "",
        "| source | images | method | F1@0.5 | precision | recall | AP@0.5 | mAP 0.5:0.95 "
        "| mean matched IoU | true / predicted objects | s per Mpx |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for source, entry in result["sources"].items():
        for method, s in entry["methods"].items():
            lines.append(
                f"| {source} ({entry['role']}) | {entry['images']} | {method} | {_f(s['f1'])} "
                f"| {_f(s['precision'])} | {_f(s['recall'])} | {_f(s['ap50'])} "
                f"| {_f(s['mean_ap'])} | {_f(s['mean_matched_iou'])} "
                f"| {s['true_objects']} / {s['predicted_objects']} "
                f"| {s['seconds_per_mpx']:.3f} |"
            )
    replace_generated(path, "bench.instances", lines, "Instances: how touching nuclei part")


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m bench.instances``."""
    parser = argparse.ArgumentParser(prog=TOOL, description=__doc__)
    parser.add_argument("--model", type=Path, default=find_model_files(REPO_MODELS)["nuclei"])
    parser.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args(argv)
    result = run(args.model)
    write_doc(result, args.doc)
    args.doc.with_suffix(".json").write_text(json.dumps(result, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
