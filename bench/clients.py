"""What the client side costs, measured on the real service with the bundled ``nuclei`` model.

    python -m bench.clients            # ~2 min on 2 cores

1. One large image, side by side in one run: a synchronous ``POST /segment`` against a job
   (``POST /jobs``, polled until done, then ``GET /jobs/{id}/result``) through
   ``SegmentClient``: what progress reporting costs in wall time, and how many progress
   updates a person sees.
2. ``segment-client`` on a folder of HeLa-sized frames with ``--concurrency`` 1, 2 and 4
   against a service with one inference worker: whether overlapping uploads helps.

Writes the table in ``docs/clients.md`` (the text around it is hand-written).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from segment_client import JobStatus, SegmentClient
from segment_client.cli import run as client_cli

from bench.images import mosaic, synthetic, tiff_bytes
from bench.live_server import REPO, live_server
from bench.markdown import replace_generated

DOC = REPO / "docs" / "clients.md"


def big_image_sync_vs_job(url: str, body: bytes, repeats: int) -> dict[str, Any]:
    """Seconds for the same image through /segment and through a job, alternating."""
    sync, job, updates = [], [], []
    with SegmentClient(url, timeout=3600) as client:
        for _ in range(repeats):
            start = time.perf_counter()
            r = httpx.post(f"{url}/segment", files={"image": body}, timeout=3600)
            sync.append(time.perf_counter() - start)
            assert r.status_code == 200, r.text
            seen: list[JobStatus] = []
            start = time.perf_counter()
            client.segment(body, progress=seen.append)
            job.append(time.perf_counter() - start)
            updates.append(sum(1 for s in seen if s.state == "running"))
    return {
        "sync_s": statistics.median(sync),
        "job_s": statistics.median(job),
        "running_updates": statistics.median(updates),
        "tiles": seen[-1].tiles_total,
    }


def folder_throughput(url: str, folder: Path, levels: tuple[int, ...]) -> dict[int, float]:
    """Images per second of segment-client on ``folder`` at each concurrency."""
    rates = {}
    n = len(list(folder.iterdir()))
    for level in levels:
        with tempfile.TemporaryDirectory() as out:
            args = [str(folder), "--out", out, "--url", url, "-j", str(level), "--no-progress"]
            start = time.perf_counter()
            status = client_cli(args, console=Console(file=io.StringIO()))
            took = time.perf_counter() - start
        assert status == 0
        rates[level] = n / took
    return rates


def main() -> None:
    """Run both measurements and write docs/clients.md."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--side", type=int, default=2048, help="large image side (2048)")
    parser.add_argument("--frames", type=int, default=16, help="folder size (16)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tile = synthetic(512, 512, seed=3)[..., 0]
    big = tiff_bytes(mosaic([tile], args.side))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / "frames"
        folder.mkdir()
        for i in range(args.frames):
            (folder / f"frame_{i:03d}.tif").write_bytes(tiff_bytes(synthetic(700, 1100, seed=i)))
        models = root / "models"
        models.mkdir()
        (models / "nuclei").symlink_to(REPO / "models" / "nuclei")
        with live_server(models, root / "server", {"log_level": "WARNING"}) as srv:
            big_result = big_image_sync_vs_job(srv.url, big, args.repeats)
            rates = folder_throughput(srv.url, folder, (1, 2, 4))
    result = {"big": big_result, "side": args.side, "frames": args.frames, "rates": rates}
    print(json.dumps(result, indent=2))
    lines = [
        f"Measured by `python -m bench.clients` (bundled `nuclei`, CPU, one inference worker, "
        f"medians of {args.repeats}).",
        "",
        "| What | Result |",
        "|---|---|",
        f"| {args.side}² image, `POST /segment` | {big_result['sync_s']:.2f} s |",
        f"| same image as a job, polled every 0.5 s until done, result fetched | "
        f"{big_result['job_s']:.2f} s ({big_result['job_s'] / big_result['sync_s']:.2f}x), "
        f"{big_result['running_updates']:.0f} progress updates over {big_result['tiles']} tiles |",
    ]
    for level, rate in rates.items():
        lines.append(
            f"| `segment-client -j {level}`, {args.frames} frames 1100x700 | "
            f"{rate:.2f} images/s ({rate / rates[1]:.2f}x of -j 1) |"
        )
    replace_generated(DOC, "bench.clients", lines, "The client side, measured")


if __name__ == "__main__":
    main()
