"""Background segmentation jobs: where each stands (tiles done of the total, ETA) and its result,
kept for a bounded time.

A job is one ``/segment`` request whose answer is fetched later: it is admitted by the same
:class:`~service.segmentation.runner.Runner` (the same workers, waiting room and memory budget),
reports its progress between tile batches, and can be cancelled there. The store is bounded
three ways: jobs kept at once, bytes their results hold (reserved when a job is admitted, from
the image's header, so a result never has to be dropped to make room; given back as soon as a
job fails or is cancelled), and a time to live after a job finishes. A result is removed only
when its TTL is over or its owner deletes it; when the store is full, new jobs are refused
(busy) rather than older results evicted.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from enum import StrEnum

from service.segmentation.errors import (
    ImageTooLargeError,
    SegmentationCancelledError,
    SegmentationInputError,
    ServiceBusyError,
)
from service.segmentation.usecase import PackedSegmentation

log = logging.getLogger(__name__)


class JobState(StrEnum):
    """Where a job is in its life."""

    QUEUED = "queued"  # admitted, waiting for a worker
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """Nothing more will happen to the job."""
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass
class Job:
    """One background segmentation."""

    id: str
    model: str
    request_id: str
    reserved_bytes: int
    per_class: bool = False  # its JSON answer carries one PNG per class
    created: float = field(default_factory=time.time)
    state: JobState = JobState.QUEUED
    tiles_done: int = 0
    tiles_total: int | None = None
    started: float | None = None
    inference_started: float | None = None
    finished: float | None = None
    result: PackedSegmentation | None = None
    error: Exception | None = None  # a SegmentationInputError, or what broke unexpectedly
    future: Future[PackedSegmentation] | None = None
    on_finish: Callable[[], None] | None = None
    _cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def ended_empty(self) -> bool:
        """Failed or cancelled: only its record (why it ended) is kept, no result."""
        return self.state.finished and self.result is None

    @property
    def cancel_requested(self) -> bool:
        """DELETE was asked while the job ran; it stops at its next tile batch."""
        return self._cancel.is_set()

    def report(self, done: int, total: int) -> None:
        """The segmenter's progress hook: count tiles, or stop here when cancelled."""
        if self._cancel.is_set():
            raise SegmentationCancelledError
        now = time.monotonic()
        if self.inference_started is None:
            self.inference_started = now
        self.tiles_done, self.tiles_total = done, total

    def eta_seconds(self) -> float | None:
        """Seconds left at the rate of the tiles done so far (None before the first batch)."""
        if self.state is not JobState.RUNNING or not self.tiles_total or not self.tiles_done:
            return None
        assert self.inference_started is not None
        elapsed = time.monotonic() - self.inference_started
        left = self.tiles_total - self.tiles_done
        return round(elapsed / self.tiles_done * left, 3)


class JobStore:
    """Every job the service keeps, bounded in count, result bytes and age."""

    def __init__(self, max_jobs: int, max_bytes: int, ttl_seconds: float) -> None:
        self.max_jobs = max_jobs
        self.max_bytes = max_bytes
        self.ttl_seconds = ttl_seconds
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            self._purge()
            return len(self._jobs)

    def _held_bytes(self) -> int:
        """Results kept, and the reservations of jobs still waiting or running (a failed or
        cancelled job holds nothing)."""
        return sum(
            j.result.nbytes if j.result is not None else (0 if j.ended_empty else j.reserved_bytes)
            for j in self._jobs.values()
        )

    @property
    def held_bytes(self) -> int:
        """Bytes kept or reserved for results."""
        with self._lock:
            self._purge()
            return self._held_bytes()

    def expires_at(self, job: Job) -> float | None:
        """When a finished job is forgotten (wall-clock seconds)."""
        return None if job.finished is None else job.finished + self.ttl_seconds

    def purge(self) -> None:
        """Forget the results whose TTL is over (also done on every access)."""
        with self._lock:
            self._purge()

    def _purge(self) -> None:
        now = time.time()
        gone = [
            jid
            for jid, j in self._jobs.items()
            if j.finished is not None and j.finished + self.ttl_seconds <= now
        ]
        for jid in gone:
            del self._jobs[jid]

    def _retry_after(self, jobs: list[Job]) -> int:
        """Seconds until the first of ``jobs`` expires (5 while none has finished)."""
        ends = [self.expires_at(j) for j in jobs]
        soonest = min((e for e in ends if e is not None), default=None)
        return 5 if soonest is None else max(1, int(soonest - time.time()) + 1)

    def _holding(self) -> list[Job]:
        """The jobs that count toward ``max_jobs``: those waiting, running or holding a result.
        A failed or cancelled job keeps only its record (why it ended) until its TTL."""
        return [j for j in self._jobs.values() if not j.ended_empty]

    def _forget_ended_beyond(self, keep: int) -> None:
        """Keep the records of at most ``keep`` failed or cancelled jobs, the newest: failures
        never lock the store, and their records stay bounded."""
        ended = sorted(
            (j for j in self._jobs.values() if j.ended_empty), key=lambda j: j.finished or 0.0
        )
        for job in ended[: max(0, len(ended) - keep)]:
            del self._jobs[job.id]

    def admit(
        self, model: str, request_id: str, reserved_bytes: int, per_class: bool = False
    ) -> Job:
        """A new queued job holding ``reserved_bytes`` of the result budget, or
        :class:`ServiceBusyError` when the count or the bytes would go over their limit."""
        if reserved_bytes > self.max_bytes:
            raise ImageTooLargeError(
                f"this image's mask may take {reserved_bytes:,} bytes, more than the job store "
                f"keeps in all ({self.max_bytes:,}, setting SEG_MAX_JOB_RESULT_BYTES): send it "
                "to /segment, or a smaller image"
            )
        with self._lock:
            self._purge()
            holding = self._holding()
            if len(holding) >= self.max_jobs:
                raise ServiceBusyError(
                    f"{len(holding)} jobs wait, run or hold results (the limit, setting "
                    "SEG_MAX_JOBS); fetch and DELETE finished ones, or retry when the oldest "
                    "result expires",
                    self._retry_after(holding),
                )
            held = self._held_bytes()
            if held + reserved_bytes > self.max_bytes:
                raise ServiceBusyError(
                    f"job results hold {held:,} bytes and this image's mask may take "
                    f"{reserved_bytes:,}; the limit is {self.max_bytes:,} (setting "
                    "SEG_MAX_JOB_RESULT_BYTES): fetch and DELETE finished jobs, or retry later",
                    self._retry_after(holding),
                )
            self._forget_ended_beyond(self.max_jobs)
            job = Job(uuid.uuid4().hex, model, request_id, reserved_bytes, per_class)
            self._jobs[job.id] = job
            return job

    def get(self, job_id: str) -> Job | None:
        """The job, unless unknown or expired."""
        with self._lock:
            self._purge()
            return self._jobs.get(job_id)

    def discard(self, job: Job) -> None:
        """Forget a job (never admitted by the gate, or deleted by its owner)."""
        with self._lock:
            self._jobs.pop(job.id, None)

    def begin(self, job: Job) -> None:
        """A worker takes the job; :class:`SegmentationCancelledError` if it was cancelled while it
        waited."""
        with self._lock:
            if job.cancel_requested or job.state is not JobState.QUEUED:
                raise SegmentationCancelledError
            job.state = JobState.RUNNING
            job.started = time.time()

    def _finish(self, job: Job, state: JobState) -> None:
        if job.state.finished:
            return
        job.state = state
        job.finished = time.time()
        callback, job.on_finish = job.on_finish, None
        if callback is not None:
            callback()

    def succeed(self, job: Job, result: PackedSegmentation) -> None:
        """Keep the result (its bytes replace the reservation) until the TTL."""
        with self._lock:
            job.result = result
            job.tiles_done = job.tiles_total or job.tiles_done
            self._finish(job, JobState.SUCCEEDED)

    def fail(self, job: Job, error: Exception) -> None:
        """The job ended with ``error`` (``/segment`` would have answered its refusal)."""
        with self._lock:
            job.error = error
            self._finish(job, JobState.FAILED)

    def cancel(self, job: Job) -> None:
        """Stop a job: at once if it waits (its worker place is given back), at its next tile
        batch if it runs (:meth:`Job.report` raises there)."""
        with self._lock:
            if job.state.finished:
                return
            job._cancel.set()
            queued = job.state is JobState.QUEUED
        # Outside the lock: cancelling the future runs its done callbacks (:meth:`settle`) here.
        if queued and (job.future is None or job.future.cancel()):
            self.cancelled(job)  # idempotent, whether or not settle got there first

    def cancelled(self, job: Job) -> None:
        """The worker stopped at a cancellation."""
        with self._lock:
            self._finish(job, JobState.CANCELLED)

    def settle(self, job: Job, future: Future[PackedSegmentation]) -> None:
        """The job's work is over (a done callback of its future): keep its result, or say
        why there is none."""
        try:
            self.succeed(job, future.result())
        except (CancelledError, SegmentationCancelledError):
            self.cancelled(job)
        except SegmentationInputError as exc:
            self.fail(job, exc)
        except Exception as exc:
            log.error("job %s failed", job.id, exc_info=exc)
            self.fail(job, exc)

    def cancel_all(self) -> None:
        """Stop every unfinished job (the service is shutting down)."""
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            self.cancel(job)
