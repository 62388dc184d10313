"""The benchmark, side by side in one process group: ``python -m bench.run`` (``make bench``).

Cases, on the same model and the same images (held-out HeLa frames and mosaics tiled from them):

1. the tutorial way: non-overlapping patches, Keras ``model.predict``, patches put back;
2. raw ONNX Runtime on the very tiles the service runs, pre-cut (the ceiling);
3. the service's pipeline in-process: TIFF bytes to PNG bytes (``service.segmentation.usecase``);
4. over HTTP: a real uvicorn, 1 and 8 concurrent clients, and an overload burst;
5. peak RSS of a fresh server against the image size, up to a 16384x16384 uint16 upload;
6. compute efficiency: model GFLOP per tile x tiles/s against a float32 matmul measured here.

Plus the levers (batch size, threads, execution mode, graph optimisation, INT8, overlap, worker
split). Writes ``docs/benchmarks.md`` and ``docs/benchmarks.json``. ``--quick`` runs everything
on tiny inputs (the smoke test uses it).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench import cases, flops, report, server
from bench.images import BenchImage, load_images, synthetic
from bench.live_server import REPO
from service.core.config import DEFAULT_OVERLAP
from service.inference.precision import Precision, variant_files
from service.segmentation.images import ImageHeader
from service.segmentation.registry import (
    LoadedModel,
    choose_variant,
    load_model,
)
from service.segmentation.usecase import SegmentParams, Upload, request_memory, segment

# The default's newest version (6: version 4's network with its int8 and fp16 variants) and the
# Keras weights that network was exported from, which ship with version 4
# (tests/test_bundled_quality.py checks that version 6's weights are version 4's): the benchmark
# pins the pair it measures.
MODEL = Path("models/nuclei/6/model.onnx")
INT8_MODEL = MODEL.parent / Precision.INT8.file_name
KERAS_MODEL = Path("models/nuclei/4/keras/model.keras")
BATCH = 8  # SEG_TILE_BATCH_SIZE default
CPU = ["CPUExecutionProvider"]


def log(msg: str) -> None:
    """Progress on stderr."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    """CPU model, cores, SIMD flags and the versions that matter."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next(
        (ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")),
        platform.processor(),
    )
    flags_line = next((ln for ln in cpuinfo.splitlines() if ln.startswith("flags")), "")
    flags = [
        f
        for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
        if f" {f}" in flags_line
    ]
    import onnxruntime

    versions = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    try:
        import keras
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
        versions["keras"] = keras.__version__
    except ImportError:
        pass
    mem = Path("/proc/meminfo").read_text().split("\n")[0] if Path("/proc/meminfo").exists() else ""
    return {
        "load_average_at_start": os.getloadavg(),
        "cpu": model,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "flags": flags,
        "memory": " ".join(mem.split()[1:]),
        "os": platform.platform(),
        "versions": versions,
        "gpu": gpu_description(),
    }


def gpu_description() -> str:
    """The GPUs this run had, as ``nvidia-smi`` names them (with the driver), or ``none``."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "none"
    query = ["--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    try:
        out = subprocess.run([smi, *query], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({smi} failed: {exc})"
    gpus = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return "; ".join(gpus) if out.returncode == 0 and gpus else "none"


def settle() -> None:
    """Let TensorFlow's worker threads stop spinning before ONNX Runtime is timed again."""
    time.sleep(0.3)


def median(values: list[float]) -> float:
    """Median (the machine is shared and noisy)."""
    return float(statistics.median(values))


def side_by_side(
    images: list[BenchImage],
    model: LoadedModel,
    keras_model: Any,
    repeats: int,
    default: LoadedModel,
) -> list[dict[str, Any]]:
    """Cases 1-3 on each image, interleaved per repeat, medians: (2) and (3) at fp32 and
    overlap 0.25, and again at the service's defaults (``default``: the precision ``auto``
    runs here, at ``DEFAULT_OVERLAP``)."""
    meta = model.meta
    rows = []
    for img in images:
        batches = cases.service_batches(img.pixels, meta, 0.25, BATCH)
        default_batches = cases.service_batches(img.pixels, meta, DEFAULT_OVERLAP, BATCH)
        tiles = sum(len(b) for b in batches)
        times: dict[str, list[float]] = {
            "raw": [], "pipeline": [], "tutorial": [], "raw_defaults": [], "defaults": []
        }  # fmt: skip
        stages: list[dict[str, float]] = []
        default_stages: list[dict[str, float]] = []
        mask = tutorial_mask = default_mask = None
        for _ in range(repeats):
            t, _n = cases.timed(partial(cases.run_raw, model, batches))
            times["raw"].append(t)
            t, (result, _png, enc) = cases.timed(
                partial(cases.run_pipeline, model, img.tiff, BATCH)
            )
            times["pipeline"].append(t)
            stages.append({**result.timings, "encode": enc})
            mask = result.mask[0]
            t, _n = cases.timed(partial(cases.run_raw, default, default_batches))
            times["raw_defaults"].append(t)
            t, (result, _png, enc) = cases.timed(
                partial(cases.run_pipeline, default, img.tiff, BATCH, DEFAULT_OVERLAP)
            )
            times["defaults"].append(t)
            default_stages.append({**result.timings, "encode": enc})
            default_mask = result.mask[0]
            t, tutorial_mask = cases.timed(
                partial(cases.tutorial_predict, keras_model, img.pixels, meta, BATCH)
            )
            times["tutorial"].append(t)
            settle()
        med = {k: median(v) for k, v in times.items()}
        stage_med = {k: median([s[k] for s in stages]) for k in stages[0]}
        default_stage_med = {k: median([s[k] for s in default_stages]) for k in stages[0]}
        mp = img.megapixels
        rows.append(
            {
                "image": img.name,
                "shape": list(img.pixels.shape[:2]),
                "megapixels": mp,
                "service_tiles": tiles,
                "default_tiles": sum(len(b) for b in default_batches),
                "tutorial_tiles": cases.tutorial_tiles(img.pixels.shape, meta.tile_size),
                "seconds": med,
                "all_seconds": times,
                "pipeline_stages_s": stage_med,
                "default_stages_s": default_stage_med,
                "mpx_per_s": {k: mp / v for k, v in med.items()},
                "raw_tiles_per_s": tiles / med["raw"],
                "pipeline_over_raw": med["pipeline"] / med["raw"],
                "tutorial_over_pipeline": med["tutorial"] / med["pipeline"],
                "defaults_over_raw": med["defaults"] / med["raw_defaults"],
                "tutorial_over_defaults": med["tutorial"] / med["defaults"],
                "_mask": mask,
                "_tutorial_mask": tutorial_mask,
                "_default_mask": default_mask,
            }
        )
        log(
            f"{img.name}: raw {med['raw']:.2f}s pipeline {med['pipeline']:.2f}s "
            f"tutorial {med['tutorial']:.2f}s defaults {med['defaults']:.2f}s"
        )
    return rows


def quality(
    frames: list[BenchImage], rows: list[dict[str, Any]], classes: list[str]
) -> dict[str, Any]:
    """Held-out IoU of the service's pipeline and of the tutorial way."""
    truths = [f.truth for f in frames if f.truth is not None]
    by_name = {r["image"]: r for r in rows}
    service_masks = [by_name[f.name]["_mask"] for f in frames]
    tutorial_masks = [by_name[f.name]["_tutorial_mask"] for f in frames]
    default_masks = [by_name[f.name]["_default_mask"] for f in frames]
    return {
        "pipeline": cases.iou(service_masks, truths, classes),
        "tutorial": cases.iou(tutorial_masks, truths, classes),
        "defaults": cases.iou(default_masks, truths, classes),
    }


def source_quality(
    model: LoadedModel, default: LoadedModel, keras_model: Any
) -> dict[str, dict[str, Any]]:
    """Nucleus IoU (and object F1 where the service labels objects) per source, on the
    default's test images and held-out sources (those of its card): the tutorial way, the
    service at fp32 and overlap 0.25 (what the card measured), and at its defaults."""
    from bench.variants import measured
    from service.inference.precision import source_ious
    from service.inference.scores import get_stats, scores_from_stats, total_stats
    from training.data import mask_to_classes, read_image, read_mask
    from training.presets import PRESETS

    config = PRESETS["nuclei"]
    pairs = {p.key: p for p in config.splits()["test"]}
    tested = [pairs[key] for key in model.meta.metrics["test_images"]]
    counts: dict[str, list[Any]] = {}
    labelled = [(p, p.source) for p in tested]
    labelled += [(p, f"{p.source} (held out)") for p in config.held_out_pairs()]
    for pair, source in labelled:  # named as source_ious names them
        truth = mask_to_classes(read_mask(pair.mask), "binary")
        pred = cases.tutorial_predict(keras_model, read_image(pair.image), model.meta, BATCH)
        counts.setdefault(source, []).append(get_stats(pred, truth, 2))
    classes = model.meta.classes
    tutorial = {
        s: float(scores_from_stats(total_stats(c), classes).iou[classes[1]] or 0.0)
        for s, c in counts.items()
    }
    fp32 = measured(model, 0.25)
    defaults = measured(default, DEFAULT_OVERLAP)

    def f1s(metrics: dict[str, Any]) -> dict[str, float | None]:
        out = {}
        for group, suffix in (("per_source", ""), ("held_out", " (held out)")):
            for s, v in (metrics.get(group) or {}).items():
                out[s + suffix] = (v.get("objects") or {}).get("f1")
        return out

    iou32, iou_def = source_ious(fp32), source_ious(defaults)
    f1_32, f1_def = f1s(fp32), f1s(defaults)
    return {
        s: {
            "images": len(counts[s]),
            "tutorial_iou": tutorial[s],
            "fp32_iou": iou32[s][classes[1]],
            "defaults_iou": iou_def[s][classes[1]],
            "fp32_f1": f1_32.get(s),
            "defaults_f1": f1_def.get(s),
        }
        for s in tutorial
    }


def session_levers(
    path: Path, tiles: np.ndarray, repeats: int, quick: bool
) -> list[dict[str, Any]]:
    """Raw ONNX Runtime ms per tile for batch sizes, threads, execution mode, graph optimisation."""
    import onnxruntime as ort

    level = ort.GraphOptimizationLevel
    configs: list[tuple[str, int, dict[str, Any]]] = [
        (f"batch {b}", b, {}) for b in ((1, 8) if quick else (1, 2, 4, 8, 16))
    ]
    configs += [
        ("batch 8, intra_op 1 thread", 8, {"intra": 1}),
        ("batch 8, ORT_PARALLEL execution", 8, {"parallel": True}),
        ("batch 8, graph opt BASIC", 8, {"opt": level.ORT_ENABLE_BASIC}),
        ("batch 8, graph opt EXTENDED", 8, {"opt": level.ORT_ENABLE_EXTENDED}),
        ("batch 8, graph opt DISABLED", 8, {"opt": level.ORT_DISABLE_ALL}),
        ("batch 8, no thread spinning", 8, {"spin": False}),
    ]
    if quick:
        configs = configs[:3]
    out = []
    for label, batch, cfg in configs:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = cfg.get("intra", 0)
        opts.graph_optimization_level = cfg.get("opt", level.ORT_ENABLE_ALL)
        if cfg.get("parallel"):
            opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        if cfg.get("spin") is False:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(path), opts, providers=CPU)
        name = sess.get_inputs()[0].name
        chunks = [tiles[i : i + batch] for i in range(0, len(tiles), batch)]
        sess.run(None, {name: chunks[0]})
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for c in chunks:
                sess.run(None, {name: c})
            times.append(time.perf_counter() - start)
        out.append({"config": label, "ms_per_tile": 1000 * median(times) / len(tiles)})
        log(f"lever {label}: {out[-1]['ms_per_tile']:.1f} ms/tile")
    return out


def int8_lever(
    frames: list[BenchImage],
    fp32: LoadedModel,
    keras_model: Any,
    repeats: int,
    quality_fp32: dict[str, Any],
    tiles: np.ndarray,
) -> dict[str, Any] | None:
    """The default's INT8 variant (made by ``python -m bench.variants``) against fp32."""
    if not INT8_MODEL.is_file():
        return None
    int8 = load_model("nuclei", INT8_MODEL, CPU, 0, BATCH)
    raw: dict[str, list[float]] = {"fp32": [], "int8": []}
    pipe: dict[str, list[float]] = {"fp32": [], "int8": [], "tutorial": []}
    masks: list[np.ndarray] = []
    chunks = [np.ascontiguousarray(tiles[i : i + BATCH]) for i in range(0, len(tiles), BATCH)]
    for r in range(repeats):
        for key, m in (("fp32", fp32), ("int8", int8)):
            raw[key].append(cases.timed(partial(cases.run_raw, m, chunks))[0])
        for f in frames:
            t_fp, _ = cases.timed(partial(cases.run_pipeline, fp32, f.tiff, BATCH))
            t_q, (res, _png, _e) = cases.timed(partial(cases.run_pipeline, int8, f.tiff, BATCH))
            t_k, _ = cases.timed(
                partial(cases.tutorial_predict, keras_model, f.pixels, fp32.meta, BATCH)
            )
            pipe["fp32"].append(t_fp)
            pipe["int8"].append(t_q)
            pipe["tutorial"].append(t_k)
            settle()
            if r == 0:
                masks.append(res.mask[0])
    truths = [f.truth for f in frames if f.truth is not None]
    q = cases.iou(masks, truths, fp32.meta.classes)
    n = len(tiles)
    result = {
        "raw_ms_per_tile": {k: 1000 * median(v) / n for k, v in raw.items()},
        "pipeline_s_per_frame": {k: median(v) for k, v in pipe.items()},
        "iou": {"fp32": quality_fp32, "int8": q},
        "mean_iou_drop": quality_fp32["mean"] - q["mean"],
        "foreground_iou_drop": quality_fp32["foreground"] - q["foreground"],
        "size_bytes": INT8_MODEL.stat().st_size,
    }
    result["speedup_raw"] = result["raw_ms_per_tile"]["fp32"] / result["raw_ms_per_tile"]["int8"]
    result["tutorial_over_int8_pipeline"] = (
        result["pipeline_s_per_frame"]["tutorial"] / result["pipeline_s_per_frame"]["int8"]
    )
    log(f"int8: {result['raw_ms_per_tile']} mean IoU drop {result['mean_iou_drop']:.4f}")
    return result


def overlap_lever(
    frames: list[BenchImage], model: LoadedModel, repeats: int
) -> list[dict[str, Any]]:
    """Held-out IoU and time per frame against the tiling overlap (fewer tiles, more seams)."""
    truths = [f.truth for f in frames if f.truth is not None]
    out = []
    for overlap in (0.25, 0.125, 0.0625):
        times, masks = [], []
        for r in range(repeats):
            for f in frames:
                t, (res, _png, _e) = cases.timed(
                    partial(cases.run_pipeline, model, f.tiff, BATCH, overlap)
                )
                times.append(t)
                if r == 0:
                    masks.append(res.mask[0])
        tiles = sum(
            len(b)
            for f in frames
            for b in cases.service_batches(f.pixels, model.meta, overlap, BATCH)
        )
        out.append(
            {
                "overlap": overlap,
                "tiles_per_frame": tiles / len(frames),
                "s_per_frame": median(times),
                "iou": cases.iou(masks, truths, model.meta.classes),
            }
        )
        log(f"overlap {overlap}: {out[-1]}")
    return out


def instance_lever(
    images: list[BenchImage], repeats: int, model: LoadedModel, default: LoadedModel
) -> dict[str, Any] | None:
    """What labelling the objects (``output=labels``) costs beside the model (``MODEL``, if it
    gives instances): the ``instances`` stage (watershed and object table) against the
    ``infer`` stage of the same request, medians per image; in fp32 (``model``) and in the
    precision ``auto`` runs here (``default``), where the model's time is shorter."""
    if model.meta.instances is None:
        log(f"{MODEL}: no instances; the instance case is left out")
        return None
    rows = []
    runs = [model] if default.meta.precision is Precision.FP32 else [model, default]
    for img, run in ((i, m) for i in images for m in runs):
        stages: list[dict[str, float]] = []
        for _ in range(repeats):
            result = segment(
                run,
                Upload(io.BytesIO(img.tiff)),
                SegmentParams(batch_size=BATCH, labels=True),
                max_pixels=1 << 31,
            )
            stages.append(result.timings)
            objects = result.objects
        assert objects is not None
        med = {k: median([s[k] for s in stages]) for k in ("infer", "instances", "stitch")}
        rows.append(
            {
                "image": img.name,
                "precision": str(run.meta.precision),
                "objects": sum(objects.counts),
                "seconds": med,
                "instances_over_infer": med["instances"] / med["infer"],
            }
        )
        log(f"instances on {img.name}: {rows[-1]}")
    return {"model": str(MODEL), "version": model.meta.version, "images": rows}


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The load run with the median throughput."""
    return sorted(runs, key=lambda r: float(r["throughput_rps"]))[len(runs) // 2]


def http_cases(model_dir: Path, tmp: Path, body: bytes, quick: bool) -> dict[str, Any]:
    """1 client vs 8 concurrent clients (alternating, medians), an overload burst, worker split."""
    one_n, eight_n, rounds = (3, 8, 1) if quick else (10, 24, 2)
    out: dict[str, Any] = {}
    configs = [
        ("workers 1 x intra_op 2 (default)", {"inference_workers": "1", "intra_op_threads": "0"}),
        ("workers 2 x intra_op 1", {"inference_workers": "2", "intra_op_threads": "1"}),
    ]
    for label, settings in configs[:1] if quick else configs:
        with server.quiet_server(
            model_dir, tmp / "http", max_queue="8", tile_batch_size=str(BATCH), **settings
        ) as srv:
            server.load(srv.url, body, 2, 1)  # warm connections and allocator
            ones, eights = [], []
            for _ in range(rounds):
                ones.append(server.load(srv.url, body, one_n, 1))
                eights.append(server.load(srv.url, body, eight_n, 8))
            burst = server.burst(srv.url, body, 20) if label.endswith("(default)") else None
        one, eight = _median_run(ones), _median_run(eights)
        out[label] = {
            "one_client": one,
            "eight_clients": eight,
            "all_throughputs": {
                "one": [r["throughput_rps"] for r in ones],
                "eight": [r["throughput_rps"] for r in eights],
            },
            "eight_over_one": eight["throughput_rps"] / one["throughput_rps"],
            "errors": sum(r["errors"] + r["rejected_503"] for r in ones + eights),
            "burst": burst,
        }
        log(
            f"http {label}: 1 client {one['throughput_rps']:.2f} rps, "
            f"8 clients {eight['throughput_rps']:.2f} rps"
        )
    return out


def memory_cases(tmp: Path, sides: list[int]) -> list[dict[str, Any]]:
    """Peak RSS of a fresh server per upload size, with a pointwise model (tile 256)."""
    import tifffile

    from bench.onnx_models import build_model
    from service.inference.modelmeta import Normalization

    model_dir = tmp / "memory-models"
    (model_dir / "toy" / "1").mkdir(parents=True, exist_ok=True)
    toy = model_dir / "toy" / "1" / "model.onnx"
    build_model(
        toy,
        name="toy",
        tile_size=256,
        normalization=Normalization(method="percentile", low=1.0, high=99.8),
    )
    meta = load_model("toy", toy, ["CPUExecutionProvider"], 1, BATCH).meta
    base = synthetic(512, 512)[..., 0]
    out = []
    for side in sides:
        path = tmp / f"upload_{side}.tif"
        reps = -(-side // 512)
        tifffile.imwrite(path, np.tile(base, (reps, reps))[:side, :side])
        r = server.upload_peak_rss(
            model_dir,
            tmp / "memory",
            path,
            default_model="toy",
            tile_batch_size=str(BATCH),
            max_upload_bytes=str(1 << 31),
        )
        r.update(
            side=side,
            file_bytes=path.stat().st_size,
            predicted={
                "total": request_memory(
                    meta,
                    ImageHeader("TIFF", side, side, 1, side * side * 2, path.stat().st_size),
                    BATCH,
                )
            },
        )
        path.unlink()
        out.append(r)
        log(
            f"memory {side}^2: idle {r['idle_kib'] / 1024:.0f} MiB, "
            f"peak {r['peak_kib'] / 1024:.0f} MiB"
        )
    return out


def main(argv: list[str] | None = None) -> None:
    """Run every case and write the report."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny inputs, one repeat (smoke test)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per case (default 3)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--json", type=Path, default=None, help="default: --out with .json")
    parser.add_argument("--skip-memory", action="store_true", help="leave out case 5")
    parser.add_argument(
        "--from-json", type=Path, default=None, help="only re-render --out from a results JSON"
    )
    args = parser.parse_args(argv)
    json_path = args.json or args.out.with_suffix(".json")
    if args.from_json is not None:
        res = json.loads(args.from_json.read_text())
        res["efficiency"] = report.efficiency(res)
        res["targets"] = report.targets(res)  # the verdicts as report.py now computes them
        if args.from_json.resolve() == json_path.resolve():
            json_path.write_text(json.dumps(res, indent=2, default=float))
        args.out.write_text(report.markdown(res))
        return
    repeats = args.repeats or (1 if args.quick else 3)
    started = time.perf_counter()
    os.chdir(REPO)
    command = (
        "python -m bench.run"
        + (" --quick" if args.quick else "")
        + (f" --repeats {args.repeats}" if args.repeats else "")
    )

    facts = machine()
    log(f"machine: {facts['cpu']}, {facts['usable_cores']} cores")
    peaks = [flops.matmul_peak(1024 if args.quick else 4096, 2 if args.quick else 5)]
    variants = {
        p: load_model("nuclei", path, CPU, 0, BATCH)
        for p, path in variant_files(MODEL.parent).items()
    }
    model = variants[Precision.FP32]
    auto = choose_variant(variants)
    default = variants[auto.precision]
    log(f"defaults: {auto.precision} (auto: {auto.reason}), overlap {DEFAULT_OVERLAP}")
    import keras

    import training.export  # noqa: F401  (registers the instance head's layer for loading)

    keras_model = keras.models.load_model(KERAS_MODEL, compile=False)
    frames, large = load_images(args.quick)
    keras_model.predict(np.zeros((1, 256, 256, 1), np.float32), verbose=0)

    rows = side_by_side(frames + large, model, keras_model, repeats, default)
    q = quality(frames, rows, model.meta.classes)
    sources = None if args.quick else source_quality(model, default, keras_model)
    peaks.append(flops.matmul_peak(1024 if args.quick else 4096, 2 if args.quick else 5))
    gflop = flops.conv_flops(MODEL, model.meta.tile_size, model.meta.channels)

    lever_tiles = np.concatenate(cases.service_batches(large[-1].pixels, model.meta, 0.25, BATCH))[
        : 16 if args.quick else 48
    ]
    levers: dict[str, Any] = {"session": session_levers(MODEL, lever_tiles, repeats, args.quick)}
    levers["int8"] = int8_lever(frames, model, keras_model, repeats, q["pipeline"], lever_tiles)
    levers["overlap"] = overlap_lever(frames, model, 1 if args.quick else 2)
    levers["instances"] = instance_lever(large, repeats, model, default)

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = tmp / "models"
        (model_dir / "nuclei" / "1").mkdir(parents=True)
        for path in variant_files(MODEL.parent).values():  # served at its defaults
            shutil.copy(path, model_dir / "nuclei" / "1" / path.name)
        http_img = (
            frames[0]
            if not args.quick
            else BenchImage("synthetic 256x256", synthetic(256, 256), None, b"")
        )
        if not http_img.tiff:
            from bench.images import tiff_bytes

            http_img.tiff = tiff_bytes(http_img.pixels)
        http = http_cases(model_dir, tmp, http_img.tiff, args.quick)
        http["image"] = http_img.name
        memory = (
            []
            if args.skip_memory
            else memory_cases(tmp, [512, 1024] if args.quick else [2048, 4096, 8192, 16384])
        )
    peaks.append(flops.matmul_peak(1024 if args.quick else 4096, 2 if args.quick else 5))

    for r in rows:
        r.pop("_mask")
        r.pop("_tutorial_mask")
        r.pop("_default_mask")
    results = {
        "command": command,
        "quick": args.quick,
        "repeats": repeats,
        "machine": facts,
        "model": {
            "path": str(MODEL),
            "keras": str(KERAS_MODEL),
            "defaults": {
                "precision": auto.precision,
                "why": auto.reason,
                "overlap": DEFAULT_OVERLAP,
                "file": str(MODEL.parent / auto.precision.file_name),
            },
            "tile": model.meta.tile_size,
            "batch": BATCH,
            **gflop,
        },
        "peak_gflops": {
            "runs": [p["gflops"] for p in peaks],
            "median": median([p["gflops"] for p in peaks]),
            "numpy": [p["numpy_gflops"] for p in peaks],
            "ort": [p["ort_gflops"] for p in peaks],
            "size": peaks[0]["size"],
        },
        "images": rows,
        "quality": q,
        "sources": sources,
        "http": http,
        "memory": memory,
        "levers": levers,
        "wall_s": time.perf_counter() - started,
        "load_average_at_end": os.getloadavg(),
    }
    results["efficiency"] = report.efficiency(results)
    results["targets"] = report.targets(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2, default=float))
    args.out.write_text(report.markdown(results))
    log(f"wrote {args.out} and {json_path} in {results['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
