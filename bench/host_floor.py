"""Host floor: everything the service does for a request except ``session.run``.

    python -m bench.host_floor            # 2048², 4096², 8192² uint16, 5 repeats
    python -m bench.host_floor --quick    # 512², 1 repeat (CI)

On a GPU the model is fast enough that the host's own work (decode, normalise, cut, blend,
threshold, encode) decides the throughput. This case measures it with an *instant* predictor
(a constant probability map, no model), in-process, through the service's own functions:
``decode_image`` → ``predict_mask`` → ``encode_png``. The serial path
(``overlapped=False``, the tiler before the host work was overlapped) and the overlapped one run
alternately in one process, so their ratio is measured side by side on the same machine. Each
stage's cost is also timed on its own (ns per pixel) to show where the time goes. Writes
``docs/host_floor.md`` and ``docs/host_floor.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.images import synthetic, tiff_bytes
from bench.markdown import replace_generated
from service.inference.modelmeta import ModelMetadata, Normalization, Task
from service.inference.normalize import compute_intensity_stats
from service.inference.pipeline import make_reducer, predict_mask
from service.inference.tiling import iter_tile_batches, sliding_window_inference
from service.segmentation.images import decode_image, encode_png

BATCH = 8
TILE = 256
OVERLAP = 0.25
META = ModelMetadata(
    name="instant",
    version="1",
    task=Task.BINARY,
    classes=["background", "nucleus"],
    tile_size=TILE,
    channels=1,
    normalization=Normalization(method="percentile", low=1.0, high=99.8),
)


def instant(tiles: np.ndarray) -> np.ndarray:
    """A predictor that costs nothing: probability 0.7 everywhere (one class)."""
    return np.full((*tiles.shape[:3], 1), 0.7, np.float32)


def request(data: bytes, overlapped: bool) -> bytes:
    """One request's host work: decode the upload, tile/normalise/blend/threshold, encode."""
    decoded = decode_image(io.BytesIO(data), max_pixels=1 << 31)
    mask = predict_mask(
        decoded.pixels, META, instant, batch_size=BATCH, overlap=OVERLAP, overlapped=overlapped
    )
    return encode_png(mask * np.uint8(255))


def _best(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def stages(data: bytes, repeats: int) -> dict[str, float]:
    """Seconds per stage, each timed on its own (serial), best of ``repeats``. Blending and
    thresholding have no function of their own: they are the serial tiler's time less cutting
    and the instant predictor."""
    image = decode_image(io.BytesIO(data), max_pixels=1 << 31).pixels
    stats = compute_intensity_stats(image, META.normalization)
    raw = [tiles for tiles, _ in iter_tile_batches(image, TILE, BATCH, OVERLAP)]
    mask = predict_mask(image, META, instant, batch_size=BATCH, overlap=OVERLAP)
    reducer = make_reducer(META)
    cut = _best(lambda: list(iter_tile_batches(image, TILE, BATCH, OVERLAP)), repeats)
    predict = _best(lambda: [instant(t) for t in raw], repeats)
    tiler = _best(
        lambda: sliding_window_inference(
            image, TILE, BATCH, instant, OVERLAP, reduce=reducer, overlapped=False
        ),
        repeats,
    )
    return {
        "decode": _best(lambda: decode_image(io.BytesIO(data), max_pixels=1 << 31), repeats),
        "statistics": _best(lambda: compute_intensity_stats(image, META.normalization), repeats),
        "cut": cut,
        "normalise": _best(lambda: [stats.apply(t) for t in raw], repeats),
        "blend + threshold": max(tiler - cut - predict, 0.0),
        "encode": _best(lambda: encode_png(mask * np.uint8(255)), repeats),
    }


def measure(side: int, repeats: int) -> dict[str, Any]:
    """Serial and overlapped host floor for a ``side``² uint16 TIFF, side by side."""
    patch = synthetic(512, 512, seed=1)
    reps = -(-side // 512)
    data = tiff_bytes(np.tile(patch, (reps, reps, 1))[:side, :side])
    serial_png, overlapped_png = request(data, False), request(data, True)
    assert serial_png == overlapped_png, "the overlapped path must give the same PNG"
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):
        for path in (False, True):  # alternately: the same machine state for both
            start = time.perf_counter()
            request(data, path)
            times[path].append(time.perf_counter() - start)
    mpx = side * side / 1e6
    per_stage = stages(data, repeats)
    serial, overlapped = statistics.median(times[False]), statistics.median(times[True])
    return {
        "side": side,
        "megapixels": mpx,
        "serial_s": serial,
        "overlapped_s": overlapped,
        "serial_mpx_s": mpx / serial,
        "overlapped_mpx_s": mpx / overlapped,
        "speedup": serial / overlapped,
        "stages_ns_per_px": {k: v / (side * side) * 1e9 for k, v in per_stage.items()},
    }


def write_doc(data: dict[str, Any], path: Path) -> None:
    """The measurements as Markdown between the generated markers of ``path``."""
    rows = data["results"]
    stage_names = list(rows[0]["stages_ns_per_px"])
    lines = [
        f"Run: `{data['command']}` on {data['machine']}, {data['started']}. In-process, an "
        f"instant predictor, uint16 TIFF uploads (tiled from a 512² synthetic patch), tile "
        f"{TILE}, batch {BATCH}, overlap {OVERLAP}, Gaussian blend, binary threshold, PNG "
        f"encode. Median of {data['repeats']} alternating runs per path.",
        "",
        "| image | serial s | overlapped s | serial MPx/s | overlapped MPx/s | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['side']}² | {r['serial_s']:.3f} | {r['overlapped_s']:.3f} "
            f"| {r['serial_mpx_s']:.1f} | **{r['overlapped_mpx_s']:.1f}** | {r['speedup']:.2f}x |"
        )
    lines += [
        "",
        "Each stage on its own (serial), ns per image pixel:",
        "",
        "| image | " + " | ".join(stage_names) + " |",
        "|---|" + "---|" * len(stage_names),
    ]
    for r in rows:
        lines.append(
            f"| {r['side']}² | "
            + " | ".join(f"{r['stages_ns_per_px'][k]:.2f}" for k in stage_names)
            + " |"
        )
    replace_generated(path, "bench.host_floor", lines, "Host floor: the service minus the model")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.host_floor``."""
    parser = argparse.ArgumentParser(prog="python -m bench.host_floor", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="512², one repeat (CI)")
    parser.add_argument("--sides", type=int, nargs="*", default=[2048, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--doc", default="docs/host_floor.md")
    args = parser.parse_args(argv)
    sides, repeats = ([512], 1) if args.quick else (args.sides, args.repeats)
    data: dict[str, Any] = {
        "command": " ".join(
            ["python -m bench.host_floor", *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "repeats": repeats,
        "results": [],
    }
    for side in sides:
        data["results"].append(measure(side, repeats))
        print(json.dumps(data["results"][-1]), flush=True)
    doc = Path(args.doc)
    write_doc(data, doc)
    doc.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
