"""Sliding-window inference: cut an image into overlapping fixed-shape tiles, run them in batches,
blend the outputs with a weight window and stitch them back without seams.

Memory stays bounded for very large images: outputs are accumulated in a strip one tile high and
the full width of the image, and each finished strip is handed to ``reduce`` (threshold, argmax)
before the window moves on. With ``reduce`` the only full-size array is the reduced result (e.g.
uint8); see docs/design.md for the bound.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from enum import StrEnum
from functools import lru_cache

import numpy as np

Predictor = Callable[[np.ndarray], np.ndarray]
Reducer = Callable[[np.ndarray], np.ndarray]


class BlendMode(StrEnum):
    """How overlapping tile outputs are weighted before they are averaged."""

    CONSTANT = "constant"  # plain mean of the overlapping tiles
    GAUSSIAN = "gaussian"  # centre of each tile trusted most: no seams at tile borders
    COSINE = "cosine"  # Hann window, floored so that image borders keep a weight


def _as_pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int | np.integer) else tuple(value)
    if len(pair) != 2 or any(int(v) < 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def compute_scan_interval(roi_size: tuple[int, int], overlap: float) -> tuple[int, int]:
    """Step between neighbouring tiles so that they overlap by ``overlap`` of the tile side."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    return tuple(max(1, round(side * (1.0 - overlap))) for side in roi_size)  # type: ignore[return-value]


def compute_window_starts(length: int, window: int, step: int) -> list[int]:
    """Start offsets along one axis: evenly stepped, the last window flush with the image end.

    An axis shorter than the window gets one window at 0 that is padded when it is cut.
    """
    if length <= window:
        return [0]
    starts = list(range(0, length - window, step))
    starts.append(length - window)
    return starts


@lru_cache(maxsize=32)
def compute_importance_map(
    roi_size: tuple[int, int], mode: BlendMode, sigma_scale: float = 0.125
) -> np.ndarray:
    """Blending weights of one tile, shape ``roi_size``, float32, strictly positive.

    Weights are floored at a small positive value so that every pixel keeps a usable weight even
    where only a tile's edge covers it (image borders).
    """
    mode = BlendMode(mode)
    if mode is BlendMode.CONSTANT:
        return np.ones(roi_size, np.float32)
    axes = []
    for side in roi_size:
        centre = (side - 1) / 2.0
        pos = np.arange(side, dtype=np.float64) - centre
        if mode is BlendMode.GAUSSIAN:
            sigma = max(side * sigma_scale, 1e-3)
            axes.append(np.exp(-0.5 * (pos / sigma) ** 2))
        else:
            axes.append(0.5 * (1.0 + np.cos(np.pi * pos / (side / 2.0 + 0.5))))
    weights = np.outer(axes[0], axes[1])
    weights /= weights.max()
    return np.maximum(weights, 1e-3).astype(np.float32)


def _cut_tile(image: np.ndarray, y: int, x: int, roi: tuple[int, int]) -> np.ndarray:
    """The ``roi`` window at ``(y, x)``, reflect-padded where the image is smaller than it."""
    tile = image[y : y + roi[0], x : x + roi[1]]
    pad_y, pad_x = roi[0] - tile.shape[0], roi[1] - tile.shape[1]
    if pad_y or pad_x:
        # numpy's reflect repeats the reflection for pads longer than the axis, and copes with a
        # 1-pixel axis, so every tile has the same fixed shape whatever the image size.
        tile = np.pad(tile, ((0, pad_y), (0, pad_x), (0, 0)), mode="reflect")
    return tile


def count_tiles(
    height: int, width: int, roi_size: int | tuple[int, int], overlap: float = 0.25
) -> int:
    """How many tiles :func:`sliding_window_inference` cuts from an image of this size (what
    progress is counted against)."""
    roi = _as_pair(roi_size, "roi_size")
    step = compute_scan_interval(roi, overlap)
    ys = compute_window_starts(height, roi[0], step[0])
    xs = compute_window_starts(width, roi[1], step[1])
    return len(ys) * len(xs)


def iter_tile_batches(
    image: np.ndarray,
    roi_size: int | tuple[int, int],
    sw_batch_size: int,
    overlap: float = 0.25,
    prepare: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Iterator[tuple[np.ndarray, list[tuple[int, int]]]]:
    """The tiles :func:`sliding_window_inference` runs, in its order: row-major,
    ``sw_batch_size`` at a time (the last batch may be smaller), each batch with the ``(y, x)``
    positions of its tiles, and passed through ``prepare`` (e.g. normalisation) if given."""
    roi = _as_pair(roi_size, "roi_size")
    step = compute_scan_interval(roi, overlap)
    ys = compute_window_starts(image.shape[0], roi[0], step[0])
    xs = compute_window_starts(image.shape[1], roi[1], step[1])
    positions = [(y, x) for y in ys for x in xs]
    for i in range(0, len(positions), sw_batch_size):
        chunk = positions[i : i + sw_batch_size]
        tiles = np.stack([_cut_tile(image, y, x, roi) for y, x in chunk])
        yield (tiles if prepare is None else prepare(tiles)), chunk


# Tile batches alive at once when the stages overlap: one being cut and prepared, one ready,
# one in the predictor, one being blended (docs/design.md: the memory formula counts them).
BATCHES_IN_FLIGHT = 4


class _Prefetcher:
    """Runs a batch iterator one step ahead on its own thread: while the caller's predictor
    works on batch *k*, batch *k+1* is cut and prepared (NumPy and ONNX Runtime release the
    GIL). Stops early, and re-raises the iterator's error in the caller, in order."""

    _DONE = object()

    def __init__(self, batches: Iterator[tuple[np.ndarray, list[tuple[int, int]]]]) -> None:
        self._batches = batches
        self._queue: queue.Queue[object] = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tiles-cut", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for batch in self._batches:
                if not self._put(batch):
                    return
            self._put(self._DONE)
        except BaseException as exc:  # handed to the caller, raised there
            self._put(exc)

    def __iter__(self) -> Iterator[tuple[np.ndarray, list[tuple[int, int]]]]:
        while True:
            item = self._queue.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]

    def close(self) -> None:
        """Stop the thread (after an error downstream, or at the end) and wait for it."""
        self._stop.set()
        self._thread.join()


class _Stitcher:
    """Accumulates weighted tile outputs in a strip one tile high and the full image wide, and
    hands each finished strip to ``reduce``; the one place the blending arithmetic lives, so the
    serial and the overlapped paths give bit-identical results."""

    def __init__(
        self,
        height: int,
        width: int,
        roi: tuple[int, int],
        weights: np.ndarray,
        reduce: Reducer,
        out_rows: int | None = None,
    ) -> None:
        self.height, self.width, self.roi = height, width, roi
        self.weights = weights
        self.reduce = reduce
        self.strip_rows = min(roi[0], height)
        self.acc: np.ndarray | None = None
        self.wsum = np.zeros((self.strip_rows, width), np.float32)
        self.strip_top = 0
        # Rows of the result, and how many ``reduce`` has handed back so far: as many as it is
        # given, unless it resamples (service.inference.rescale.StripResampler).
        self.out_rows = height if out_rows is None else out_rows
        self.out_top = 0
        # The result is written in place strip by strip (no list of pieces concatenated at the
        # end: that would hold the reduced image twice at its peak).
        self.result: np.ndarray | None = None

    def _flush(self, until: int) -> None:
        """Hand rows [strip_top, until) to ``reduce`` and slide the strip down to ``until``."""
        acc, wsum = self.acc, self.wsum
        assert acc is not None
        n = until - self.strip_top
        if n <= 0:
            return
        piece = self.reduce(acc[:n] / wsum[:n, :, None])
        if self.result is None:
            self.result = np.empty((self.out_rows, *piece.shape[1:]), piece.dtype)
        self.result[self.out_top : self.out_top + piece.shape[0]] = piece
        self.out_top += piece.shape[0]
        acc[:-n], wsum[:-n] = acc[n:].copy(), wsum[n:].copy()
        acc[-n:], wsum[-n:] = 0.0, 0.0
        self.strip_top = until

    def add(self, out: np.ndarray, positions: list[tuple[int, int]]) -> None:
        """Blend one batch of tile outputs ``(N, h, w, K)`` at their ``(y, x)`` positions."""
        roi, weights = self.roi, self.weights
        if self.acc is None:
            self.acc = np.zeros((self.strip_rows, self.width, out.shape[3]), np.float32)
        acc, wsum = self.acc, self.wsum
        weighted = out * weights[None, :, :, None]  # the whole batch in one NumPy call
        for tile_out, (y, x) in zip(weighted, positions, strict=True):
            if y > self.strip_top:  # a new row of tiles: everything above it is final
                self._flush(y)
            h, w = min(roi[0], self.height - y), min(roi[1], self.width - x)
            r0 = y - self.strip_top
            acc[r0 : r0 + h, x : x + w] += tile_out[:h, :w]
            wsum[r0 : r0 + h, x : x + w] += weights[:h, :w]

    def finish(self) -> np.ndarray:
        """Reduce what is left and return the whole result."""
        self._flush(self.height)
        assert self.result is not None
        if self.out_top != self.out_rows:
            raise ValueError(f"reduce gave {self.out_top} rows in all, expected {self.out_rows}")
        return self.result


def _checked(tiles: np.ndarray, out: np.ndarray) -> np.ndarray:
    out = np.asarray(out)
    if out.ndim != 4 or out.shape[:3] != tiles.shape[:3]:
        raise ValueError(
            f"predictor must map (N, h, w, C) to (N, h, w, K): got {tiles.shape} -> {out.shape}"
        )
    return out


def sliding_window_inference(
    image: np.ndarray,
    roi_size: int | tuple[int, int],
    sw_batch_size: int,
    predictor: Predictor,
    overlap: float = 0.25,
    mode: BlendMode | str = BlendMode.GAUSSIAN,
    sigma_scale: float = 0.125,
    reduce: Reducer | None = None,
    *,
    prepare: Callable[[np.ndarray], np.ndarray] | None = None,
    overlapped: bool = False,
    out_rows: int | None = None,
) -> np.ndarray:
    """Run ``predictor`` over ``image`` in overlapping tiles and stitch the outputs.

    Args:
        image: ``(H, W, C)`` array of any dtype; tiles are cut from it as they are needed.
        roi_size: tile side(s); every tile handed to ``predictor`` has exactly this shape.
        sw_batch_size: tiles per ``predictor`` call.
        predictor: ``(N, h, w, C) -> (N, h, w, K)`` (a fully convolutional network), always
            called from the calling thread, one batch at a time, in order.
        overlap: fraction of the tile side shared by neighbouring tiles, in ``[0, 1)``.
        mode: blending window, see :class:`BlendMode`.
        sigma_scale: Gaussian sigma as a fraction of the tile side.
        reduce: applied to each finished ``(rows, W, K)`` float32 strip (e.g. threshold or
            argmax); its outputs are concatenated. Without it the blended ``(H, W, K)`` float32
            map is returned.
        prepare: applied to each tile batch before ``predictor`` (e.g. normalisation).
        overlapped: cut and prepare batch *k+1* and blend batch *k-1* on two helper threads
            while ``predictor`` runs batch *k*, so the host keeps up with a fast accelerator
            (a predictor on the CPU would only compete with them for the cores).
            The result is bit-identical to the serial path (``False``): the same operations in
            the same order.
        out_rows: for a ``reduce`` that resamples (hands back a different number of rows
            than it is given, in order, all of them by the last strip): the rows of the
            result. Default: the image's height.

    Returns:
        The stitched output, ``(H, W, K)`` float32 or whatever ``reduce`` makes of it.
    """
    if image.ndim != 3:
        raise ValueError(f"expected an (H, W, C) image, got shape {image.shape}")
    height, width = image.shape[:2]
    if height < 1 or width < 1:
        raise ValueError(f"image must have at least one pixel, got shape {image.shape}")
    if sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    roi = _as_pair(roi_size, "roi_size")
    weights = compute_importance_map(roi, BlendMode(mode), sigma_scale)
    stitcher = _Stitcher(
        height,
        width,
        roi,
        weights,
        reduce if reduce is not None else (lambda strip: strip),
        out_rows,
    )
    batches = iter_tile_batches(image, roi, sw_batch_size, overlap, prepare)
    if not overlapped:
        for tiles, positions in batches:
            stitcher.add(_checked(tiles, predictor(tiles)), positions)
        return stitcher.finish()

    prefetcher = _Prefetcher(batches)
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tiles-blend") as blender:
            blending: Future[None] | None = None
            for tiles, positions in prefetcher:
                out = _checked(tiles, predictor(tiles))
                if blending is not None:
                    blending.result()  # in order, and at most one batch waiting to be blended
                blending = blender.submit(stitcher.add, out, positions)
            if blending is not None:
                blending.result()
            return blender.submit(stitcher.finish).result()
    finally:
        prefetcher.close()
