"""The derived figures, the target verdicts and the Markdown report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

MIB = 1024 * 1024


def efficiency(res: dict[str, Any]) -> dict[str, Any]:
    """GFLOP/s achieved by (2) raw ORT and (3) the pipeline on the largest image vs the peak."""
    row = max(res["images"], key=lambda r: r["megapixels"])
    gflop = res["model"]["gflop"]
    peak = res["peak_gflops"]["median"]
    raw = gflop * row["service_tiles"] / row["seconds"]["raw"]
    pipe = gflop * row["service_tiles"] / row["seconds"]["pipeline"]
    out = {
        "image": row["image"],
        "gflop_per_tile": gflop,
        "raw_gflops": raw,
        "pipeline_gflops": pipe,
        "peak_gflops": peak,
        "raw_fraction": raw / peak,
        "pipeline_fraction": pipe / peak,
    }
    int8 = res["levers"].get("int8")
    if int8:
        out["int8_equivalent_gflops"] = gflop / (int8["raw_ms_per_tile"]["int8"] / 1000)
        out["int8_equivalent_fraction"] = out["int8_equivalent_gflops"] / peak
    return out


def overhead(row: dict[str, Any], stages: str = "pipeline_stages_s") -> float:
    """(3)'s wall time over its own ``session.run`` time in the same call: what decoding,
    tiling, normalising, stitching and encoding add, immune to noise between calls
    (``stages="default_stages_s"``: the same at the service's defaults)."""
    st = row[stages]
    return float(sum(st.values()) / st["infer"])


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue: the figure, the limit, met or not."""
    rows = res["images"]
    worst_overhead = max(rows, key=overhead)
    worst_speedup = min(rows, key=lambda r: r["tutorial_over_pipeline"])
    q = res["quality"]
    http = next(iter(res["http"].values()))
    eff = res["efficiency"]
    defaults = res["model"]["defaults"]
    at = f"{defaults['precision']}, overlap {defaults['overlap']}"
    worst_default = min(rows, key=lambda r: r["tutorial_over_defaults"])
    worst_default_overhead = max(rows, key=lambda r: overhead(r, "default_stages_s"))
    sources = res.get("sources") or {}
    below = [s for s, v in sources.items() if v["defaults_iou"] < v["tutorial_iou"]]
    out = [
        {
            "target": "defaults >= 2.5x faster than (1), equal or better IoU on every source",
            "value": worst_default["tutorial_over_defaults"],
            "limit": 2.5,
            "met": worst_default["tutorial_over_defaults"] >= 2.5 and bool(sources) and not below,
            "detail": f"defaults: {at}; worst image {worst_default['image']}; all: "
            + ", ".join(f"{r['tutorial_over_defaults']:.2f}" for r in rows)
            + (
                f"; nucleus IoU below (1) on: {', '.join(below) or 'no source'}"
                if sources
                else "; IoU per source not measured (--quick)"
            ),
        },
        {
            "target": "(3) at the defaults <= 1.10x (2) at the defaults, same tiles",
            "value": overhead(worst_default_overhead, "default_stages_s"),
            "limit": 1.10,
            "met": overhead(worst_default_overhead, "default_stages_s") <= 1.10,
            "detail": f"worst image {worst_default_overhead['image']}; across calls: "
            + ", ".join(f"{r['defaults_over_raw']:.3f}" for r in rows),
        },
        {
            "target": "(3) time <= 1.10x (2), same tiles",
            "value": overhead(worst_overhead),
            "limit": 1.10,
            "met": overhead(worst_overhead) <= 1.10,
            "detail": "(3) over its own session.run time, same call; worst image "
            f"{worst_overhead['image']}; (3)/(2) across calls, at the mercy of the machine's "
            "noise: " + ", ".join(f"{r['pipeline_over_raw']:.3f}" for r in rows),
        },
        {
            "target": "(3) >= 2x faster than (1), equal or better IoU",
            "value": worst_speedup["tutorial_over_pipeline"],
            "limit": 2.0,
            "met": worst_speedup["tutorial_over_pipeline"] >= 2.0
            and q["pipeline"]["mean"] >= q["tutorial"]["mean"],
            "detail": f"worst image {worst_speedup['image']}; all: "
            + ", ".join(f"{r['tutorial_over_pipeline']:.2f}" for r in rows)
            + f"; held-out mean IoU {q['pipeline']['mean']:.4f} (3) vs "
            + f"{q['tutorial']['mean']:.4f} (1)",
        },
        {
            "target": "8 clients >= 0.9x throughput of 1, no errors",
            "value": http["eight_over_one"],
            "limit": 0.9,
            "met": http["eight_over_one"] >= 0.9 and http["errors"] == 0,
            "detail": f"errors {http['errors']}",
        },
    ]
    big = [m for m in res["memory"] if m["side"] == 16384]
    if big:
        peak = big[0]["peak_kib"] * 1024 / 2**30
        out.append(
            {
                "target": "peak RSS, 16384^2 uint16 TIFF upload <= 2 GiB",
                "value": peak,
                "limit": 2.0,
                "met": peak <= 2.0,
                "detail": "GiB (VmHWM of the server process); idle "
                f"{big[0]['idle_kib'] / 2**20:.2f} GiB",
            }
        )
    out.append(
        {
            "target": "compute efficiency >= 80 % of measured peak",
            "value": eff["raw_fraction"],
            "limit": 0.8,
            "met": eff["raw_fraction"] >= 0.8,
            "detail": f"(2) raw ORT {eff['raw_gflops']:.0f} GFLOP/s, (3) pipeline "
            f"{eff['pipeline_gflops']:.0f} GFLOP/s ({eff['pipeline_fraction']:.0%}), peak "
            f"{eff['peak_gflops']:.0f} GFLOP/s",
        }
    )
    return out


def _f(v: float, digits: int = 2) -> str:
    return f"{v:.{digits}f}"


def _source_table(sources: dict[str, dict[str, Any]] | None) -> list[str]:
    """Quality per source: the tutorial way, fp32 at overlap 0.25, and the defaults."""
    if not sources:
        return ["Quality per source: not measured in this run (--quick).", ""]
    lines = [
        "### Quality per source",
        "",
        "Nucleus IoU over all of a source's test images of the default's card (every image of "
        "the held-out source), and object F1 at IoU 0.5 where the service labels the objects "
        "(the tutorial way gives a mask, not objects):",
        "",
        "| source | images | (1) IoU | (3) fp32, 0.25 IoU | (3d) defaults IoU | (3d) - (3) | "
        "(3d) - (1) | (3) F1 | (3d) F1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for source, v in sources.items():
        f1 = [("-" if x is None else f"{x:.4f}") for x in (v["fp32_f1"], v["defaults_f1"])]
        lines.append(
            f"| {source} | {v['images']} | {v['tutorial_iou']:.4f} | {v['fp32_iou']:.4f} | "
            f"{v['defaults_iou']:.4f} | {v['defaults_iou'] - v['fp32_iou']:+.4f} | "
            f"{v['defaults_iou'] - v['tutorial_iou']:+.4f} | {f1[0]} | {f1[1]} |"
        )
    return [*lines, ""]


def markdown(res: dict[str, Any]) -> str:
    """The whole of docs/benchmarks.md."""
    m = res["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Written by the harness, one run, every case side by side in one process group on the",
        "same model and the same images. Regenerate with:",
        "",
        "```bash",
        "make bench  # = .venv/bin/python -m bench.run (11-16 min on 2 cores; --quick: ~30 s)",
        "```",
        "",
        f"This run: `{res['command']}`, {res['repeats']} repeat(s) per case (medians), "
        f"{res['wall_s'] / 60:.1f} min, {time.strftime('%Y-%m-%d')}. Raw figures: "
        "[`benchmarks.json`](benchmarks.json). Held-out data: `segtrain fetch-data`.",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu']} ({m['usable_cores']} usable cores of {m['cores']}; "
        f"{', '.join(m['flags'])}), {m['memory']} RAM, {m['os']}",
        "- " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"- GPU: {m['gpu']}",
        "- Shared and noisy: ratios below are from the same run, medians of the repeats. Load "
        "average (1/5/15 min) at the start "
        + "/".join(f"{v:.2f}" for v in m.get("load_average_at_start", []))
        + ", at the end "
        + "/".join(f"{v:.2f}" for v in res.get("load_average_at_end", []))
        + ".",
        "",
        "## Model",
        "",
        f"`{res['model']['path']}` (fp32, tile {res['model']['tile']}, "
        f"{res['model']['gflop']:.2f} GFLOP per tile from the graph's convolutions); the "
        f"tutorial baseline runs the same weights in Keras (`{res['model']['keras']}`). Batch "
        f"{res['model']['batch']} tiles everywhere (SEG_TILE_BATCH_SIZE).",
        "",
        "## Cases 1-3: side by side",
        "",
        "(1) tutorial way: non-overlapping 256x256 patches, zero-padded remainder, Keras "
        "`model.predict`, patches put back; (2) raw ONNX Runtime on the tiles the service cuts "
        "(overlap 0.25), pre-cut and normalised, only `session.run` timed; (3) the service's "
        "pipeline in-process: TIFF bytes -> decode -> normalise -> tile -> infer -> stitch -> "
        "threshold -> PNG bytes. (3)/infer: the pipeline's wall time over its own "
        "`session.run` time in the same call (the overhead, free of the noise between calls).",
        "",
        "| image | MPx | tiles (3) / (1) | (1) s | (2) s | (3) s | (1) MPx/s | (2) MPx/s "
        "| (3) MPx/s | (3)/(2) | (3)/infer | (1)/(3) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["images"]:
        s, mp = r["seconds"], r["mpx_per_s"]
        lines.append(
            f"| {r['image']} | {_f(r['megapixels'])} | "
            f"{r['service_tiles']} / {r['tutorial_tiles']} "
            f"| {_f(s['tutorial'])} | {_f(s['raw'])} | {_f(s['pipeline'])} | {_f(mp['tutorial'])} "
            f"| {_f(mp['raw'])} | {_f(mp['pipeline'])} | {_f(r['pipeline_over_raw'], 3)} "
            f"| **{_f(overhead(r), 3)}** "
            f"| **{_f(r['tutorial_over_pipeline'])}** |"
        )
    d = res["model"]["defaults"]
    lines += [
        "",
        f"**At the service's defaults** (what a request that names neither gets on this host): "
        f"precision `auto` = **{d['precision']}** (`{d['file']}`; {d['why']}), overlap "
        f"**{d['overlap']}**. (2d) and (3d): cases 2 and 3 at those settings, in the same "
        "turns as the others.",
        "",
        "| image | tiles (3d) | (1) s | (2d) s | (3d) s | (3d)/(2d) | (3d)/infer | (1)/(3d) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["images"]:
        s = r["seconds"]
        lines.append(
            f"| {r['image']} | {r['default_tiles']} | {_f(s['tutorial'])} | "
            f"{_f(s['raw_defaults'])} | {_f(s['defaults'])} | {_f(r['defaults_over_raw'], 3)} | "
            f"**{_f(overhead(r, 'default_stages_s'), 3)}** | "
            f"**{_f(r['tutorial_over_defaults'])}** |"
        )
    lines += [
        "",
        "Where the time of (3) goes (median seconds; `stitch` = tiling, normalising, blending, "
        "thresholding outside `session.run`):",
        "",
        "| image | decode | infer | stitch | encode |",
        "|---|---|---|---|---|",
    ]
    for r in res["images"]:
        for label, key in (("", "pipeline_stages_s"), (" (3d)", "default_stages_s")):
            st = r[key]
            lines.append(
                f"| {r['image']}{label} | {_f(st['decode'], 3)} | {_f(st['infer'], 3)} | "
                f"{_f(st['stitch'], 3)} | {_f(st['encode'], 3)} |"
            )
    q = res["quality"]
    lines += [
        "",
        "Held-out quality (frames 017-019, one confusion matrix over all their pixels):",
        "",
        "| | nucleus IoU | mean IoU |",
        "|---|---|---|",
        f"| (1) tutorial way (seams) | {q['tutorial']['foreground']:.4f} | "
        f"{q['tutorial']['mean']:.4f} |",
        f"| (3) service pipeline | {q['pipeline']['foreground']:.4f} | "
        f"{q['pipeline']['mean']:.4f} |",
        f"| (3d) at the defaults | {q['defaults']['foreground']:.4f} | "
        f"{q['defaults']['mean']:.4f} |",
        "",
        *_source_table(res.get("sources")),
        "## Case 4: over HTTP",
        "",
        f"uvicorn on 127.0.0.1, image {res['http'].get('image')} (TIFF upload, PNG back), "
        "async httpx clients each sending one request at a time; SEG_MAX_QUEUE=8 so that 8 "
        "clients fit. Throughput is the median of the alternating rounds.",
        "",
        "| server | clients | requests | ok | errors | req/s | p50 s | p95 s | p99 s | 8 / 1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, h in res["http"].items():
        if label == "image":
            continue
        for key in ("one_client", "eight_clients"):
            c = h[key]
            ratio = f"**{_f(h['eight_over_one'], 3)}**" if key == "eight_clients" else ""
            lines.append(
                f"| {label} | {c['clients']} | {c['requests']} | {c['ok']} | "
                f"{c['errors'] + c['rejected_503']} | {_f(c['throughput_rps'], 3)} | "
                f"{_f(c['p50_s'])} | {_f(c['p95_s'])} | {_f(c['p99_s'])} | {ratio} |"
            )
    burst = next((h["burst"] for k, h in res["http"].items() if k != "image" and h["burst"]), None)
    if burst:
        rej = burst["rejected_max_s"]
        lines += [
            "",
            f"Overload: {burst['sent']} requests at once against 1 worker + 8 queue places: "
            f"{burst['ok']} served, {burst['rejected_503']} refused with 503 + Retry-After "
            f"(slowest refusal {_f(rej, 3) if rej is not None else '-'} s, before the upload "
            f"is read), {burst['other']} other.",
        ]
    lines += [
        "",
        "## Case 5: peak memory",
        "",
        "A fresh server per size (pointwise test model `bench/onnx_models.build_model`, tile "
        "256, percentile normalisation: the real model would take an hour at 16384^2), one "
        "uint16 TIFF upload; peak = `VmHWM` of the server process, idle = its `VmHWM` once "
        "ready. Formula: `service.segmentation.memory.request_memory`, what the service admits "
        "requests "
        'against (README "How it works"); ONNX Runtime\'s own buffers are not in it here (this '
        "model's are tiny): docs/memory.md measures the real models with them.",
        "",
        "| side | upload MiB | idle MiB | peak MiB | peak - idle MiB | formula MiB | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for mem in res["memory"]:
        lines.append(
            f"| {mem['side']} | {mem['file_bytes'] / MIB:.0f} | {mem['idle_kib'] / 1024:.0f} | "
            f"**{mem['peak_kib'] / 1024:.0f}** | {(mem['peak_kib'] - mem['idle_kib']) / 1024:.0f} "
            f"| {mem['predicted']['total'] / MIB:.0f} | {_f(mem['seconds'], 1)} |"
        )
    lines += [
        "",
        "The host's own work with an instant predictor (decode, normalise, cut, blend, "
        "threshold, encode), serial and overlapped side by side: `python -m bench.host_floor` "
        "-> [host_floor.md](host_floor.md).",
        "",
    ]
    e = res["efficiency"]
    lines += [
        "## Case 6: compute efficiency",
        "",
        f"Practical float32 peak: a {res['peak_gflops']['size']}^2 matrix product on all cores "
        "(the threads ORT uses), measured at the start, middle and end of this run with NumPy's "
        "BLAS and with ONNX Runtime's MatMul (MLAS, the library the model runs on); the faster "
        "of the two counts each time: "
        + ", ".join(f"{v:.0f}" for v in res["peak_gflops"]["runs"])
        + f" GFLOP/s, median **{e['peak_gflops']:.0f}**"
        + (
            " (NumPy: "
            + ", ".join(f"{v:.0f}" for v in res["peak_gflops"]["numpy"])
            + "; ORT MatMul: "
            + ", ".join(f"{v:.0f}" for v in res["peak_gflops"]["ort"])
            + ")."
            if "ort" in res["peak_gflops"]
            else "."
        ),
        "",
        "| | GFLOP/s | of peak |",
        "|---|---|---|",
        f"| (2) raw ORT, {e['image']} | {e['raw_gflops']:.0f} | **{e['raw_fraction']:.0%}** |",
        f"| (3) service pipeline, {e['image']} | {e['pipeline_gflops']:.0f} | "
        f"{e['pipeline_fraction']:.0%} |",
    ]
    if "int8_equivalent_gflops" in e:
        lines.append(
            f"| INT8 model, fp32-equivalent | {e['int8_equivalent_gflops']:.0f} | "
            f"{e['int8_equivalent_fraction']:.0%} |"
        )
    lines += ["", "## Targets", "", "| target | measured | limit | met |", "|---|---|---|---|"]
    for t in res["targets"]:
        lines.append(
            f"| {t['target']} | {_f(t['value'], 3)} ({t['detail']}) | {t['limit']} | "
            f"{'yes' if t['met'] else '**no**'} |"
        )
    lv = res["levers"]
    lines += [
        "",
        "## Levers",
        "",
        "Raw ONNX Runtime, ms per tile (lower is better), same tiles:",
        "",
        "| session configuration | ms / tile |",
        "|---|---|",
    ]
    lines += [f"| {s['config']} | {s['ms_per_tile']:.1f} |" for s in lv["session"]]
    lines += ["", "Overlap (held-out frames, the service pipeline):", ""]
    lines += [
        "| overlap | tiles / frame | s / frame | nucleus IoU | mean IoU |",
        "|---|---|---|---|---|",
    ]
    for o in lv["overlap"]:
        lines.append(
            f"| {o['overlap']} | {o['tiles_per_frame']:.1f} | {o['s_per_frame']:.3f} | "
            f"{o['iou']['foreground']:.4f} | {o['iou']['mean']:.4f} |"
        )
    inst = lv.get("instances")
    if inst:
        lines += [
            "",
            f"Instances (`output=labels`, `{inst['model']}`, version {inst['version']}): the "
            "watershed and object table against the model's time in the same request "
            "(target: at most 25 % at 2048²), at overlap 0.125, in fp32 and in the precision "
            "`auto` runs here:",
            "",
            "| image | precision | objects | infer s | instances s | instances / infer |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['image']} | {r['precision']} | {r['objects']} | "
            f"{r['seconds']['infer']:.2f} | "
            f"{r['seconds']['instances']:.2f} | {r['instances_over_infer']:.1%} |"
            for r in inst["images"]
        ]
    i8 = lv.get("int8")
    if i8:
        lines += [
            "",
            "INT8 (the default's `model.int8.onnx`, `python -m bench.variants`):",
            "",
            "| | fp32 | int8 |",
            "|---|---|---|",
            f"| raw ORT ms / tile | {i8['raw_ms_per_tile']['fp32']:.1f} | "
            f"{i8['raw_ms_per_tile']['int8']:.1f} |",
            f"| pipeline s / held-out frame | {i8['pipeline_s_per_frame']['fp32']:.3f} | "
            f"{i8['pipeline_s_per_frame']['int8']:.3f} |",
            f"| held-out nucleus IoU | {i8['iou']['fp32']['foreground']:.4f} | "
            f"{i8['iou']['int8']['foreground']:.4f} |",
            f"| held-out mean IoU | {i8['iou']['fp32']['mean']:.4f} | "
            f"{i8['iou']['int8']['mean']:.4f} |",
            "",
            f"Speed-up {i8['speedup_raw']:.2f}x (raw); mean IoU drop "
            f"{i8['mean_iou_drop']:.4f} (limit 0.005); tutorial way / INT8 pipeline = "
            f"{i8['tutorial_over_int8_pipeline']:.2f}x per held-out frame.",
        ]
    notes = Path(__file__).with_name("NOTES.md")
    if notes.is_file():  # the hand-written analysis, appended verbatim
        lines += ["", notes.read_text().rstrip()]
    return "\n".join(lines) + "\n"
