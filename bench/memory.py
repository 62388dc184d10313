"""Memory of the real service with the bundled models, per ONNX Runtime CPU-arena setting.

    python -m bench.memory                # idle, one 1100x700 frame, a 4096^2 image
    python -m bench.memory --side 16384   # ... and the largest image the service accepts

For each ``SEG_CPU_MEMORY_ARENA`` (off, shrink, on), a fresh ``segment-service`` process
(uvicorn, all bundled models, CPU) is measured from /proc: resident memory once ready (idle),
after each request, and the peak (``VmHWM``) of a large upload; plus the seconds per request.
The settings run one after another on the same machine in one run, so compare them with each
other, not with figures from another day. Writes the table in ``docs/memory.md`` (the analysis
around it is hand-written) and ``docs/memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.images import synthetic, tiff_bytes
from bench.live_server import REPO, LiveServer, live_server
from bench.markdown import replace_generated

ARENAS = ("shrink", "off", "on")
FRAME = (700, 1100)  # a HeLa frame's size


# What each SEG_MODEL_VERSIONS loads at start, for the report (the frames ask no earlier one).
VERSIONS = {
    "all": "each bundled model's newest version loaded in fp32 and in the precision auto "
    "runs here; the other files load when a request asks for them, and none does here",
    "all-at-start": "every bundled model, version and precision variant loaded",
    "newest": "each bundled model's newest version, in fp32 and the variant auto picks",
}


def _post(srv: LiveServer, body: bytes) -> float:
    """Seconds for one ``/segment`` request (checked to answer a mask)."""
    start = time.perf_counter()
    r = httpx.post(
        f"{srv.url}/segment", files={"image": ("image.tif", body, "image/tiff")}, timeout=3600
    )
    took = time.perf_counter() - start
    if r.status_code != 200 or not r.content.startswith(b"\x89PNG"):
        raise RuntimeError(f"/segment answered {r.status_code}: {r.text[:300]}")
    return took


def measure(
    arena: str, frame: bytes, big: bytes, big_side: int, repeats: int, versions: str = "all"
) -> dict[str, Any]:
    """One fresh service with ``arena`` and ``SEG_MODEL_VERSIONS=versions``: idle, per-frame
    and large-image memory and time."""
    mib = 1 / 1024  # /proc reports KiB
    with (
        tempfile.TemporaryDirectory() as tmp,
        live_server(
            REPO / "models",
            Path(tmp),
            {
                "cpu_memory_arena": arena,
                "model_versions": versions,
                "log_level": "WARNING",
                "max_upload_bytes": str(1 << 31),
                # A budget far above the machine's memory: nothing is refused, but each
                # request's estimated cost shows in segment_memory_reserved_bytes.
                "memory_budget": "1TiB",
            },
            graceful_stop=True,
            uvicorn_args=("--log-level", "warning"),
        ) as srv,
    ):
        idle = srv.status("VmRSS") * mib
        frame_s = [_post(srv, frame) for _ in range(repeats)]
        after_frames = srv.status("VmRSS") * mib
        frames_peak = srv.status("VmHWM") * mib
        before_big = srv.status("VmRSS") * mib
        srv.reset_peak()
        estimates: list[float] = []
        done = threading.Event()

        def watch_estimate() -> None:
            while not done.wait(0.05):
                estimates.append(srv.metric("segment_memory_reserved_bytes") or 0.0)

        watcher = threading.Thread(target=watch_estimate)
        watcher.start()
        try:
            big_s = _post(srv, big)
        finally:
            done.set()
            watcher.join()
        after_big = srv.status("VmRSS") * mib
        big_peak = srv.status("VmHWM") * mib
    return {
        "arena": arena,
        "idle_mib": round(idle),
        "after_frames_mib": round(after_frames),
        "frames_peak_mib": round(frames_peak),
        "frame_s": round(statistics.median(frame_s), 3),
        "big_side": big_side,
        "big_s": round(big_s, 1),
        "big_peak_mib": round(big_peak),
        "big_growth_mib": round(big_peak - before_big),
        "big_estimate_mib": round(max(estimates, default=0.0) / 2**20),
        "after_big_mib": round(after_big),
    }


def write_doc(data: dict[str, Any], path: Path) -> None:
    """The measurements as a Markdown table with what was run."""
    side = data["results"][0]["big_side"]
    lines = [
        f"Run: `{data['command']}` on {data['machine']}, {data['started']}. One fresh "
        f"`segment-service` per setting, `SEG_MODEL_VERSIONS={data['versions']}` "
        f"({VERSIONS[data['versions']]}), warmed at tile batch 8, CPU. Frames: synthetic uint16 "
        f"{FRAME[1]}x{FRAME[0]} TIFF, {data['repeats']} requests (median time); then one "
        f"{side}x{side} uint16 TIFF tiled from a 512² synthetic patch. Memory from /proc: "
        "VmRSS (resident now), VmHWM (peak; reset before the large image, so its peak is its "
        "own). Growth: the large image's peak above the resident memory before it. Estimate: "
        "what the service admitted it against (`service.segmentation.memory.request_memory`, "
        "read from "
        "`segment_memory_reserved_bytes` while it ran), an upper bound of the growth.",
        "",
        "| SEG_CPU_MEMORY_ARENA | idle MiB | after frames MiB | peak (frames) MiB "
        f"| s / frame | peak ({side}²) MiB | growth ({side}²) MiB | estimate ({side}²) MiB "
        f"| s / {side}² | after {side}² MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        lines.append(
            f"| `{r['arena']}` | {r['idle_mib']} | {r['after_frames_mib']} "
            f"| {r['frames_peak_mib']} | {r['frame_s']} | {r['big_peak_mib']} "
            f"| {r['big_growth_mib']} | {r['big_estimate_mib']} | {r['big_s']} "
            f"| {r['after_big_mib']} |"
        )
    replace_generated(path, "bench.memory", lines, "Memory: the real service with the models")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.memory``."""
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    parser.add_argument("--side", type=int, default=4096, help="large image side (default 4096)")
    parser.add_argument("--repeats", type=int, default=3, help="frames per setting")
    parser.add_argument("--arenas", nargs="*", default=list(ARENAS), choices=ARENAS)
    parser.add_argument(
        "--model-versions", default="all", choices=VERSIONS, help="SEG_MODEL_VERSIONS"
    )
    parser.add_argument("--doc", default="docs/memory.md")
    args = parser.parse_args(argv)
    frame = tiff_bytes(synthetic(*FRAME))
    # Large images tiled from a 512² synthetic patch, as bench.run's memory case does
    # (synthetic() itself costs pixels x blobs). Memory does not depend on the pixel values.
    patch = synthetic(512, 512, seed=1)
    reps = -(-args.side // 512)
    big = tiff_bytes(np.tile(patch, (reps, reps, 1))[: args.side, : args.side])
    data: dict[str, Any] = {
        "command": " ".join(["python -m bench.memory", *(sys.argv[1:] if argv is None else argv)]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "repeats": args.repeats,
        "versions": args.model_versions,
        "results": [],
    }
    for arena in args.arenas:
        result = measure(arena, frame, big, args.side, args.repeats, args.model_versions)
        data["results"].append(result)
        print(json.dumps(data["results"][-1]), flush=True)
    doc = Path(args.doc)
    write_doc(data, doc)
    doc.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
