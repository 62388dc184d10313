"""Bounded concurrency for inference: a fixed pool of worker threads and a bounded waiting room.

A request is admitted only while fewer than ``workers + max_queue`` are admitted; otherwise it is
refused at once (503 with ``Retry-After``) instead of queuing without limit. A request whose
client went away still holds its place until its worker finishes, because the thread cannot be
interrupted: the count always matches the work really in progress.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class OverloadedError(Exception):
    """The service is saturated; the client should retry later."""


class InferenceGate:
    """Admission control in front of a thread pool."""

    def __init__(self, workers: int, max_queue: int) -> None:
        self.workers = workers
        self.limit = workers + max_queue
        self._admitted = 0
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="inference")
        self.on_change: Callable[[int], None] = lambda n: None

    @property
    def admitted(self) -> int:
        """Requests running or waiting for a worker."""
        return self._admitted

    @property
    def saturated(self) -> bool:
        """True when the next request would be refused."""
        return self._admitted >= self.limit

    def _release(self, _: Future[Any] | None = None) -> None:
        with self._lock:
            self._admitted -= 1
            n = self._admitted
        self.on_change(n)

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on a worker thread, or raise :class:`OverloadedError` immediately."""
        with self._lock:
            if self._admitted >= self.limit:
                raise OverloadedError
            self._admitted += 1
            n = self._admitted
        self.on_change(n)
        try:
            # With the caller's context: the request ID stays on the worker's log lines.
            future = self._executor.submit(contextvars.copy_context().run, fn)
        except RuntimeError:  # the pool is shut down: the service is stopping
            self._release()  # never keep a place that no work will give back
            raise OverloadedError from None
        future.add_done_callback(self._release)
        return await asyncio.wrap_future(future)

    def shutdown(self) -> None:
        """Let running work finish, then stop the threads."""
        self._executor.shutdown(wait=True, cancel_futures=False)
