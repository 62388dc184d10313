"""Load on a real uvicorn (:mod:`bench.live_server`): concurrent clients, bursts, peak RSS."""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.live_server import LiveServer, live_server


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
    arr = np.asarray(values)
    return {f"p{q}": float(np.percentile(arr, q)) for q in (50, 95, 99)}


async def _load(url: str, body: bytes, requests: int, clients: int) -> dict[str, Any]:
    """``requests`` POSTs of ``body`` by ``clients`` concurrent clients, each one at a time."""
    latencies: list[float] = []
    rejected: list[float] = []
    errors: list[str] = []
    remaining = requests

    async def client() -> None:
        nonlocal remaining
        async with httpx.AsyncClient(timeout=600) as http:
            while remaining > 0:
                remaining -= 1
                start = time.perf_counter()
                try:
                    r = await http.post(
                        f"{url}/segment", files={"image": ("image.tif", body, "image/tiff")}
                    )
                except httpx.HTTPError as exc:
                    errors.append(type(exc).__name__)
                    continue
                took = time.perf_counter() - start
                if r.status_code == 200 and r.content.startswith(b"\x89PNG"):
                    latencies.append(took)
                elif r.status_code == 503:
                    rejected.append(took)
                else:
                    errors.append(str(r.status_code))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - start
    return {
        "clients": clients,
        "requests": requests,
        "ok": len(latencies),
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
        "rejected_503": len(rejected),
        "rejected_p95_s": _percentiles(rejected)["p95"] if rejected else None,
        "wall_s": wall,
        "throughput_rps": len(latencies) / wall,
        **{f"{k}_s": v for k, v in _percentiles(latencies).items()},
    }


def load(url: str, body: bytes, requests: int, clients: int) -> dict[str, Any]:
    """Synchronous wrapper around the async driver."""
    return asyncio.run(_load(url, body, requests, clients))


async def _burst(url: str, body: bytes, clients: int) -> dict[str, Any]:
    """``clients`` requests all at once: those beyond the admission limit must get quick 503s."""

    async def one(http: httpx.AsyncClient) -> tuple[int, float]:
        start = time.perf_counter()
        r = await http.post(f"{url}/segment", files={"image": ("image.tif", body, "image/tiff")})
        return r.status_code, time.perf_counter() - start

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        results = await asyncio.gather(*(one(http) for _ in range(clients)))
    codes = [c for c, _ in results]
    slow_503 = [t for c, t in results if c == 503]
    return {
        "sent": clients,
        "ok": codes.count(200),
        "rejected_503": codes.count(503),
        "other": len(codes) - codes.count(200) - codes.count(503),
        "rejected_max_s": max(slow_503) if slow_503 else None,
        "ok_max_s": max((t for c, t in results if c == 200), default=None),
    }


def burst(url: str, body: bytes, clients: int) -> dict[str, Any]:
    """Synchronous wrapper around the burst."""
    return asyncio.run(_burst(url, body, clients))


def quiet_server(
    model_dir: Path, workdir: Path, **settings: str
) -> AbstractContextManager[LiveServer]:
    """The service for measuring: warnings only in its log (no access log), stopped gracefully."""
    return live_server(
        model_dir,
        workdir,
        {"log_level": "WARNING", **settings},
        graceful_stop=True,
        uvicorn_args=("--log-level", "warning"),
    )


def upload_peak_rss(
    model_dir: Path, workdir: Path, image_path: Path, **settings: str
) -> dict[str, Any]:
    """Fresh server, one upload of ``image_path``: the server's RSS before and its peak (VmHWM)."""
    with quiet_server(model_dir, workdir, **settings) as server:
        idle = server.status("VmHWM")
        start = time.perf_counter()
        with image_path.open("rb") as f, httpx.Client(timeout=1800) as http:
            r = http.post(f"{server.url}/segment", files={"image": ("big.tif", f, "image/tiff")})
        took = time.perf_counter() - start
        peak = server.status("VmHWM")
    if r.status_code != 200:
        raise RuntimeError(f"upload failed: {r.status_code} {r.text[:300]}")
    return {"idle_kib": idle, "peak_kib": peak, "seconds": took, "png_bytes": len(r.content)}
