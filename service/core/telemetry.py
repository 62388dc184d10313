"""Model metrics for Prometheus, on the app's own registry (HTTP metrics come from
prometheus-fastapi-instrumentator on the same registry).

Names follow Prometheus conventions (base units, ``_seconds``/``_total``/``_bytes``); label values
are bounded: model names come from the model directory, reasons and stages from fixed sets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from service.core.codes import ErrorCode
from service.core.resources import MemoryBudget

# A 256x256 tile batch takes tens of milliseconds on a GPU and up to seconds on a CPU; a
# gigapixel image minutes. Buckets span that range roughly geometrically.
INFERENCE_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

# segment_errors_total's reasons: every error code but ``overloaded``, which has its own counter
# (segment_requests_rejected_total) because a refusal to queue is not a failed request.
ERROR_REASONS = tuple(code for code in ErrorCode if code is not ErrorCode.OVERLOADED)
STAGES = ("decode", "normalize", "infer", "stitch", "encode", "score")


class ServiceMetrics:
    """The service's hand-made metrics; one instance per app, on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # What GET /metrics answers: this registry. A service of several processes (the Ray
        # Serve ingress replicas) puts the merge of all of theirs here instead.
        self.exposition: Callable[[], bytes] = lambda: generate_latest(self.registry)
        # process_resident_memory_bytes, CPU seconds, open fds; python_info. On the app's own
        # registry, since prometheus_client puts them on its global one only.
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        histogram = partial(Histogram, registry=registry)
        counter = partial(Counter, registry=registry)
        gauge = partial(Gauge, registry=registry)
        self.inference_seconds = histogram(
            "segment_inference_seconds",
            "Time in the model (all tile batches of one request).",
            ["model"],
            buckets=INFERENCE_BUCKETS,
        )
        self.stage_seconds = histogram(
            "segment_stage_seconds",
            "Time per pipeline stage of a /segment request.",
            ["stage"],
            buckets=INFERENCE_BUCKETS,
        )
        self.tiles = counter("segment_tiles_total", "Tiles run through the model.", ["model"])
        self.pixels = counter("segment_pixels_total", "Image pixels segmented.", ["model"])
        self.image_bytes = counter("segment_image_bytes_total", "Bytes of images received.")
        self.tile_batch_size = histogram(
            "segment_tile_batch_size", "Tiles per model call.", ["model"], buckets=BATCH_BUCKETS
        )
        self.in_flight = gauge(
            "segment_requests_in_flight",
            "Segmentation requests admitted (running or waiting for a worker).",
        )
        self.queued = gauge(
            "segment_requests_queued",
            "Segmentation requests admitted and waiting for a worker (the queue's depth).",
        )
        self.rejected = counter(
            "segment_requests_rejected_total",
            "Segmentation requests refused with 503 because the service was saturated.",
        )
        self.errors = counter(
            "segment_errors_total", "Failed segmentation requests by reason.", ["reason"]
        )
        for reason in ERROR_REASONS:
            self.errors.labels(reason.value)
        self.model_info = gauge(
            "segment_model_info",
            "Loaded models (value 1) with their version and the execution provider really used.",
            ["model", "version", "provider"],
        )
        self.models_ready = gauge(
            "segment_models_ready", "1 when every model is loaded and warmed up."
        )
        self.memory_budget = gauge(
            "segment_memory_budget_bytes",
            "The memory budget (SEG_MEMORY_BUDGET or the cgroup limit): part=total, what the "
            "loaded models hold (models), and what is left for requests (requests).",
            ["part"],
        )
        self.memory_reserved = gauge(
            "segment_memory_reserved_bytes",
            "Memory the admitted requests may hold at once, by their estimated costs.",
        )

    def watch_jobs(self, kept: Callable[[], float], held_bytes: Callable[[], float]) -> None:
        """Gauges read from the job store at each scrape: jobs kept (waiting, running or
        finished) and the bytes their results hold or reserve."""
        Gauge(
            "segment_jobs_kept", "Jobs kept: waiting, running or finished.", registry=self.registry
        ).set_function(kept)
        Gauge(
            "segment_job_result_bytes",
            "Bytes held (or reserved) by the results of the jobs kept.",
            registry=self.registry,
        ).set_function(held_bytes)

    def record_admitted(self, admitted: int, workers: int) -> None:
        """The admission gate's count changed: in flight, and those beyond the workers wait."""
        self.in_flight.set(admitted)
        self.queued.set(max(0, admitted - workers))

    def record_models(self, loaded: Iterable[tuple[str, str, str]], all_loaded: bool) -> None:
        """Once loading is over: each loaded model's (name, version, provider), and whether
        all of them loaded.

        Each model's series start at 0 here rather than at its first request, so that rate()
        and increase() see that request (a series born with its first sample has no increase).
        """
        for name, version, provider in loaded:
            self.model_info.labels(name, version, provider).set(1)
            for per_model in (
                self.inference_seconds,
                self.tiles,
                self.pixels,
                self.tile_batch_size,
            ):
                per_model.labels(name)
        self.models_ready.set(1 if all_loaded else 0)

    def record_memory_budget(self, budget: MemoryBudget) -> None:
        """The budget requests are admitted against, and a live view of what they reserve."""
        self.memory_budget.labels("total").set(budget.total)
        self.memory_budget.labels("models").set(budget.baseline)
        self.memory_budget.labels("requests").set(budget.capacity)
        self.memory_reserved.set_function(lambda: budget.reserved)

    def record_segmentation(
        self,
        model: str,
        timings: Mapping[str, float],
        tiles: int,
        pixels: int,
        batches: Sequence[int],
        upload_bytes: int,
    ) -> None:
        """One segmentation done, whichever entry point it came by: time per stage, tiles,
        pixels (every plane of a stack), bytes received, tiles per model call."""
        self.inference_seconds.labels(model).observe(timings["infer"])
        for stage, seconds in timings.items():
            self.stage_seconds.labels(stage).observe(seconds)
        self.tiles.labels(model).inc(tiles)
        self.pixels.labels(model).inc(pixels)
        self.image_bytes.inc(upload_bytes)
        for size in batches:
            self.tile_batch_size.labels(model).observe(size)

    def record_error(self, code: ErrorCode) -> None:
        """One failed ``/segment`` request (refusals to queue are counted in ``rejected``)."""
        if code in ERROR_REASONS:
            self.errors.labels(code.value).inc()


# Families that describe one process: kept apart per process (a `replica` label), not added up.
PER_PROCESS = ("process_", "python_")
# Gauges that say whether something holds everywhere or somewhere: combined with min or max.
ALL_OF = ("segment_models_ready",)
ANY_OF = ("segment_model_info",)


def merge_expositions(texts: Mapping[str, str]) -> bytes:
    """One Prometheus exposition for a service made of several processes, from each process's
    own (``texts``: process name -> its exposition text).

    Counters, histograms and the other gauges (requests in flight, queued) are added up, so the
    totals are the service's whichever process answers; ``*_created`` timestamps take the
    earliest; readiness holds only where it holds for every process; per-process families
    (``process_*``, ``python_*``) keep one series per process, labelled ``replica``.
    """
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            name = family.name
            if name not in families:
                families[name] = Metric(name, family.documentation, family.type, family.unit)
                values[name] = {}
            per_process = name.startswith(PER_PROCESS)
            if name.endswith("_created") or name in ALL_OF:
                combine: Callable[[float, float], float] = min
            elif name in ANY_OF:
                combine = max
            else:
                combine = float.__add__
            for sample in family.samples:
                labels = dict(sample.labels, replica=replica) if per_process else sample.labels
                key = (sample.name, tuple(sorted(labels.items())))
                seen = values[name].get(key)
                values[name][key] = sample.value if seen is None else combine(seen, sample.value)
    for name, family in families.items():
        for (sample_name, label_pairs), value in values[name].items():
            family.add_sample(sample_name, dict(label_pairs), value)

    class Merged:
        def collect(self) -> Iterator[Metric]:
            yield from families.values()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry)
