"""The service's workers and budgets around the use case: every entry point runs its work
through one :class:`Runner`, so every one is held to the same admission.

A request is admitted by memory first (its estimate from the headers against the budget: an
:class:`~service.segmentation.errors.ImageTooLargeError` when it could never fit, a
:class:`~service.segmentation.errors.ServiceBusyError` when it cannot fit now), then by the
:class:`~service.core.gate.InferenceGate` (a worker place, or busy). Its reservation is given
back however the work ends: done, failed, cancelled, or never started.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from service.core.gate import InferenceGate, OverloadedError
from service.core.resources import (
    BudgetBusyError,
    MemoryBudget,
    OverBudgetError,
    Reservation,
    mib,
)
from service.core.telemetry import ServiceMetrics
from service.segmentation.errors import (
    ImageTooLargeError,
    SegmentationCancelledError,
    ServiceBusyError,
)
from service.segmentation.usecase import Plan, ProgressHook, Segmentation, Upload, run

T = TypeVar("T")


def describe_plan(plan: Plan) -> str:
    """``segmenting this 4000x3000 image (23 MiB decoded) with model 'nuclei'``, for the
    memory refusals."""
    image = plan.image
    planes = f"{image.planes} planes of " if image.planes > 1 else ""
    rescaled = (
        "" if plan.params.diameter is None else f" rescaled for diameter={plan.params.diameter:g}"
    )
    return (
        f"segmenting this {planes}{image.width}x{image.height} image ({mib(image.nbytes)} "
        f"decoded){rescaled} with model {plan.model.name!r}"
    )


class Runner:
    """Runs work on the gate's workers within the memory budget (``budget()``: None while none
    is known) and records what each segmentation did in ``metrics``."""

    def __init__(
        self,
        gate: InferenceGate,
        metrics: ServiceMetrics,
        budget: Callable[[], MemoryBudget | None],
        retry_after: int,
    ) -> None:
        self.gate = gate
        self.metrics = metrics
        self.budget = budget
        self.retry_after = retry_after

    def _too_large(self, nbytes: int, what: str, budget: MemoryBudget) -> ImageTooLargeError:
        return ImageTooLargeError(
            f"{what} needs about {mib(nbytes)} of memory; this service has "
            f"{mib(budget.capacity)} for a request ({budget.source} {mib(budget.total)}, of "
            f"which the loaded models hold {mib(budget.baseline)}). Send a smaller image or "
            "a crop, or give the service more memory"
        )

    def check_fits(self, plan: Plan) -> None:
        """An :class:`ImageTooLargeError` when the planned request could never fit the
        memory budget: for work queued later (a job), so that a 413 comes before any 503."""
        budget = self.budget()
        if budget is not None and plan.memory > budget.capacity:
            raise self._too_large(plan.memory, describe_plan(plan), budget)

    def reserve(self, nbytes: int, what: str) -> Reservation | None:
        """Reserve ``nbytes`` of the memory budget for the work ``what`` describes."""
        budget = self.budget()
        if budget is None:
            return None
        try:
            return budget.admit(nbytes)
        except OverBudgetError:
            raise self._too_large(nbytes, what, budget) from None
        except BudgetBusyError as exc:
            raise ServiceBusyError(
                f"the service's memory is taken by the requests in progress (this one needs "
                f"about {mib(nbytes)}, {mib(max(exc.free, 0))} is free); retry in "
                f"{self.retry_after} s"
            ) from None

    def submit(self, work: Callable[[], T], *, memory: int, what: str) -> Future[T]:
        """Admit ``work`` (memory, then a worker place) and queue it; the reservation is given
        back when its future is done, cancelled while waiting included."""
        reservation = self.reserve(memory, what)
        try:
            future = self.gate.submit(work)
        except OverloadedError:
            if reservation is not None:
                reservation.release()
            raise ServiceBusyError(
                f"the service is busy ({self.gate.limit} requests admitted); retry in "
                f"{self.retry_after} s"
            ) from None
        if reservation is not None:
            future.add_done_callback(lambda _: reservation.release())
        return future

    async def call(self, work: Callable[[], T], *, memory: int, what: str) -> T:
        """:meth:`submit` and wait for the answer."""
        return await asyncio.wrap_future(self.submit(work, memory=memory, what=what))

    def _segmentation(
        self,
        plan: Plan,
        upload: Upload,
        then: Callable[[Segmentation], T],
        progress: ProgressHook | None,
        on_start: Callable[[], None] | None,
    ) -> Callable[[], T]:
        model = plan.model

        def work() -> T:
            try:
                if on_start is not None:
                    on_start()
                segmentation = run(plan, upload, progress)
                answer = then(segmentation)
                self.metrics.record_segmentation(
                    model.name,
                    segmentation.timings,
                    segmentation.tiles,
                    segmentation.pixels,
                    segmentation.batches,
                    plan.upload_bytes,
                )
                return answer
            finally:
                # The arrays are freed by now: only now can SEG_CPU_MEMORY_ARENA=shrink give
                # the request's memory back, whether or not its client is still there.
                model.release_memory()

        return work

    def submit_segmentation(
        self,
        plan: Plan,
        upload: Upload,
        then: Callable[[Segmentation], T],
        *,
        progress: ProgressHook | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> Future[T]:
        """Segment ``upload`` as planned on a worker, then ``then`` (render, keep) there too;
        ``progress`` hears the tiles done and may stop the work by raising."""
        work = self._segmentation(plan, upload, then, progress, on_start)
        return self.submit(work, memory=plan.memory, what=describe_plan(plan))

    async def segment(
        self,
        plan: Plan,
        upload: Upload,
        then: Callable[[Segmentation], T],
        *,
        cancel: threading.Event | None = None,
    ) -> T:
        """:meth:`submit_segmentation` and wait; setting ``cancel`` (the client went away)
        stops the work at its next tile batch with :class:`SegmentationCancelledError`."""

        def progress(done: int, total: int) -> None:
            if cancel is not None and cancel.is_set():
                raise SegmentationCancelledError

        future = self.submit_segmentation(plan, upload, then, progress=progress)
        return await asyncio.wrap_future(future)
