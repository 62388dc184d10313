"""The segmentation service as a Ray Serve application: the same API, run by an existing engine.

Two kinds of deployment:

- :class:`SegmentIngress` serves the service's own FastAPI app (``service.main.create_app``:
  the same routes, requests, responses, errors, request IDs and ``/metrics``). It decodes,
  normalises, tiles, stitches and encodes on CPU replicas, with the same pipeline as the
  standalone service; only the models in its registry are :class:`RemoteModel` s, whose
  ``predict`` sends a tile batch to a model deployment through a ``DeploymentHandle``.
- :class:`ModelDeployment`, one per model (deployment ``model-<name>``), holds the ONNX Runtime
  session on a GPU (``ray_actor_options.num_gpus``, a fraction is fine) or a CPU. Tile batches
  from concurrent requests are gathered by ``@serve.batch`` into one model call of up to
  ``max_batch_tiles`` tiles, waiting at most ``batch_wait_timeout_s`` for more.

Scaling, queueing and back-pressure are Ray Serve's: replicas autoscale on ongoing requests
(``autoscaling_config``), ``max_ongoing_requests`` bounds each replica's work, and beyond
``max_queued_requests`` Serve refuses with 503 and ``Retry-After`` (``backpressure_config``).
A model deployment that refuses, or a model replica lost in the middle of a request, reaches the
client as the service's own JSON 503 with ``Retry-After``; a lost replica's tile batch is first
retried on another replica (a model call has no side effects).

Run it with ``serve run deploy/ray/serve.yaml`` (see docs/scaling.md); ``build_app`` is the
builder that file names, its ``args`` are :class:`AppArgs`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
from fastapi import FastAPI
from pydantic import BaseModel, Field
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from ray.util import metrics as ray_metrics
from starlette.types import Message, Receive, Scope, Send

from service.api.middleware import HttpMiddleware
from service.core.config import Settings, settings_from_env
from service.core.telemetry import BATCH_BUCKETS, ServiceMetrics, merge_expositions
from service.inference.modelmeta import ModelMetadata
from service.inference.precision import Choice, CpuFeatures, Precision, variant_files
from service.main import create_app
from service.segmentation.errors import ModelUnavailableError
from service.segmentation.registry import (
    LoadedModel,
    ModelRegistry,
    OnDemandModel,
    SegmentationModel,
    find_model_files,
    load_choice_now,
    resolve_providers,
    session_loader,
)

log = logging.getLogger("service.rayserve")

INGRESS = "SegmentIngress"
MODEL_PREFIX = "model-"


def model_deployment_name(model: str) -> str:
    """The Serve deployment that runs ``model`` (e.g. ``model-nuclei``)."""
    return f"{MODEL_PREFIX}{model}"


class AppArgs(BaseModel):
    """The application's ``args`` in a Serve config file (``deploy/ray/serve.yaml``).

    Replica counts, autoscaling, resources and queue limits are Serve's own deployment options
    (the file's ``deployments:``); these are the choices Serve has no field for.
    """

    model_config = {"extra": "forbid"}

    model_dir: Path | None = Field(
        None,
        description="<name>/<version>/model.onnx, readable by every replica (default: "
        "SEG_MODEL_DIR, as in the standalone service)",
    )
    models: list[str] | None = Field(
        None, description="Models to serve (default: every model in model_dir)"
    )
    max_batch_tiles: int = Field(
        32, ge=1, le=1024, description="Most tiles in one model call, gathered across requests"
    )
    batch_wait_timeout_s: float = Field(
        0.01, ge=0.0, le=10.0, description="How long a model waits to fill a batch"
    )
    predict_timeout_s: float = Field(
        300.0, gt=0.0, description="A tile batch not answered by then is a 503"
    )
    predict_attempts: int = Field(
        3, ge=1, le=10, description="Tries of a tile batch whose model replica was lost"
    )
    describe_timeout_s: float = Field(
        600.0, gt=0.0, description="How long the ingress waits for a model deployment at start"
    )


# --- the model deployment ---------------------------------------------------------------------


@dataclass(frozen=True)
class ModelReport:
    """What a model replica tells the ingress about its model (or why it could not load it)."""

    name: str
    meta: ModelMetadata | None
    provider: str
    description: dict[str, object]
    max_batch_tiles: int
    failed: str | None = None
    # The precision variants the replica loaded beside fp32 (whose figures are the fields
    # above), each as its own report, and what precision=auto runs on the replica's host.
    variants: dict[Precision, ModelReport] = field(default_factory=dict)
    auto: Choice | None = None

    def variant(self, precision: Precision) -> ModelReport:
        """The report of one precision (fp32: this one)."""
        return self if precision is Precision.FP32 else self.variants[precision]


@dataclass
class BatchStats:
    """What the model replica's batcher did: model calls, tile batches (one request's each)
    merged into them, tiles. A call holding two or more batches merged different requests: a
    request's tiler sends its next batch only once the previous one is answered."""

    replica: str = ""
    calls: int = 0
    batches: int = 0
    tiles: int = 0
    max_batches_per_call: int = 0
    max_tiles_per_call: int = 0
    merged_calls: int = 0  # calls holding tile batches of more than one request

    def record(self, batches: int, tiles: int) -> None:
        """One model call of ``tiles`` tiles from ``batches`` tile batches."""
        self.calls += 1
        self.batches += batches
        self.tiles += tiles
        self.max_batches_per_call = max(self.max_batches_per_call, batches)
        self.max_tiles_per_call = max(self.max_tiles_per_call, tiles)
        self.merged_calls += batches > 1


def _tiles_in(items: list[tuple[Precision, np.ndarray]]) -> int:
    """``@serve.batch``'s size of a batch: tiles, not calls."""
    return sum(int(tiles.shape[0]) for _, tiles in items)


def open_variants(
    name: str, path: Path, settings: Settings, model_dir: str
) -> tuple[dict[Precision, SegmentationModel], Choice | None, str | None]:
    """A model replica's files, as the standalone service opens a newest version: fp32 loaded
    now (without it the model does not serve: the third value says why), the other precisions'
    metadata read now and their sessions made by the first request that asks (a file that
    cannot be read is left out), and the one ``precision=auto`` runs loaded now."""
    providers = resolve_providers(settings.providers)
    load_now = partial(session_loader(settings, providers), name)

    def failure(file: Path, exc: Exception) -> str:
        failed = f"{type(exc).__name__}: {exc}".replace(model_dir, "<model_dir>")
        log.error("model %s could not be loaded from %s: %s", name, file, failed)
        return failed

    files = variant_files(path.parent)
    fp32 = files.pop(Precision.FP32)
    try:
        variants: dict[Precision, SegmentationModel] = {Precision.FP32: load_now(fp32)}
    except Exception as exc:  # reported by describe(); the other models still serve
        return {}, None, failure(fp32, exc)
    for precision, file in files.items():
        try:
            key = f"{name} ({precision})"
            later = partial(load_now, file)
            variants[precision] = OnDemandModel.read(name, key, file, providers, later, 0)
        except Exception as exc:  # left out; the other precisions serve
            failure(file, exc)

    def load_waiting(model: OnDemandModel) -> SegmentationModel | None:
        try:
            return model.session_model()
        except ModelUnavailableError:  # logged by the model
            return None

    return variants, load_choice_now(variants, CpuFeatures.read(), load_waiting), None


@serve.deployment(
    max_ongoing_requests=64,
    max_queued_requests=256,
    backpressure_config={"status_code": 503, "retry_after_s": 2},
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=60,
    ray_actor_options={"num_cpus": 1},
)
class ModelDeployment:
    """One model's ONNX Runtime session, fed tile batches gathered across requests.

    The session options come from the replica's ``SEG_*`` environment (providers, threads,
    CPU arena), as in the standalone service. A file that cannot be loaded is reported to the
    ingress, which lists the model as failed (``/readyz`` 503 "degraded", 404 for it) while the
    other models serve; restarting the replica would not fix the file, so its health check
    does not fail for it. A loaded model's health check runs the session on the smallest input.
    """

    def __init__(
        self, name: str, path: str, model_dir: str, max_batch_tiles: int, wait_s: float
    ) -> None:
        settings = Settings(model_dir=Path(model_dir))
        self.name = name
        self.max_batch_tiles = max_batch_tiles
        self.stats = BatchStats(replica=serve.get_replica_context().replica_id.unique_id)
        self.variants, self.auto, self.failed = open_variants(name, Path(path), settings, model_dir)
        fp32 = self.variants.get(Precision.FP32)
        self.model = fp32 if isinstance(fp32, LoadedModel) else None
        batcher: Any = self._predict_batch  # @serve.batch's wrapper: sizes set per app
        batcher.set_max_batch_size(max_batch_tiles)
        batcher.set_batch_wait_timeout_s(wait_s)
        tags = {"model": name}
        self._tiles_per_call = ray_metrics.Histogram(
            "segment_model_call_tiles",
            description="Tiles per model call on a model replica (gathered across requests).",
            boundaries=[float(b) for b in BATCH_BUCKETS],
            tag_keys=("model",),
        )
        self._batches_per_call = ray_metrics.Histogram(
            "segment_model_call_batches",
            description="Tile batches (one request's each) merged into one model call.",
            boundaries=[1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0],
            tag_keys=("model",),
        )
        self._tiles_per_call.set_default_tags(tags)
        self._batches_per_call.set_default_tags(tags)

    def describe(self) -> ModelReport:
        """The model's metadata and provider (each precision's), or why it failed to load."""
        if self.model is None:
            return ModelReport(self.name, None, "", {}, self.max_batch_tiles, self.failed)
        reports = {
            p: ModelReport(self.name, m.meta, m.provider, m.describe(), self.max_batch_tiles)
            for p, m in self.variants.items()
        }
        fp32 = reports.pop(Precision.FP32)
        return replace(fp32, variants=reports, auto=self.auto)

    def batch_stats(self) -> BatchStats:
        """This replica's batching so far (tests and operators read it through a handle)."""
        return self.stats

    async def predict(self, tiles: np.ndarray, precision: Precision = Precision.FP32) -> np.ndarray:
        """Probabilities for one request's tile batch, run together with other requests'
        (those in the same precision: one model call per precision gathered)."""
        if self.model is None:
            raise RuntimeError(f"model {self.name!r} failed to load: {self.failed}")
        if precision not in self.variants:
            raise RuntimeError(f"model {self.name!r} has no {precision} variant loaded")
        return await self._predict_batch((precision, tiles))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=_tiles_in)
    async def _predict_batch(self, items: list[tuple[Precision, np.ndarray]]) -> list[np.ndarray]:
        answers: list[np.ndarray] = [np.empty(0)] * len(items)
        for precision in dict.fromkeys(p for p, _ in items):
            picked = [i for i, (p, _) in enumerate(items) if p is precision]
            answered = await self._run_batches(precision, [items[i][1] for i in picked])
            for i, out in zip(picked, answered, strict=True):
                answers[i] = out
        return answers

    async def _run_batches(
        self, precision: Precision, batches: list[np.ndarray]
    ) -> list[np.ndarray]:
        tiles = batches[0] if len(batches) == 1 else np.concatenate(batches)
        # In a thread: the replica's event loop keeps gathering the next batch meanwhile.
        out = await asyncio.to_thread(self.run_model, tiles, precision)
        self.stats.record(len(batches), int(tiles.shape[0]))
        self._tiles_per_call.observe(float(tiles.shape[0]))
        self._batches_per_call.observe(float(len(batches)))
        if len(batches) > 1:
            log.debug(
                "model %s: one call of %d tiles from %d requests",
                self.name,
                len(tiles),
                len(batches),
            )
        bounds = np.cumsum([len(b) for b in batches])[:-1]
        return list(np.split(out, bounds))

    def run_model(self, tiles: np.ndarray, precision: Precision = Precision.FP32) -> np.ndarray:
        """One model call on the gathered tiles (in a worker thread)."""
        model = self.variants[precision]
        out = model.predict(tiles)
        model.release_memory()  # SEG_CPU_MEMORY_ARENA=shrink: after every model call
        return out

    def check_health(self) -> None:
        """Serve's health check: a loaded model must still run (a broken CUDA context, say,
        fails here and Serve replaces the replica)."""
        if self.model is None:
            return
        meta = self.model.meta
        side = meta.tile_multiple
        out = self.model.predict(np.zeros((1, side, side, meta.channels), np.float32))
        if out.shape != (1, side, side, meta.output_channels):
            raise RuntimeError(f"model {self.name!r} answered shape {out.shape} to a probe")


# --- metrics across ingress replicas -------------------------------------------------------------

METRICS_HUB = "MetricsHub"
METRICS_PUSH_S = 2.0


@serve.deployment(
    name=METRICS_HUB,
    num_replicas=1,
    max_ongoing_requests=256,
    ray_actor_options={"num_cpus": 0},
)
class MetricsHub:
    """The latest metrics text of every ingress replica, so that ``GET /metrics`` answers for
    the whole service whichever replica Serve's proxy picks (each replica alone would answer
    its own counters, which go up and down from one scrape to the next).

    Ingress replicas push every :data:`METRICS_PUSH_S` seconds and when asked for
    ``/metrics``; a replica silent for ``stale_after_s`` (stopped, scaled down) is dropped.
    """

    def __init__(self, stale_after_s: float = 5 * METRICS_PUSH_S) -> None:
        self.stale_after_s = stale_after_s
        self.texts: dict[str, tuple[float, str]] = {}

    def push(self, replica: str, text: str) -> dict[str, str]:
        """Keep ``replica``'s text; answer every replica's current text."""
        now = time.monotonic()
        self.texts[replica] = (now, text)
        self.texts = {r: v for r, v in self.texts.items() if now - v[0] <= self.stale_after_s}
        return {r: text for r, (_, text) in self.texts.items()}


# --- the ingress ------------------------------------------------------------------------------


@dataclass
class RemoteModel:
    """A model deployment seen from the ingress: the same interface as a local
    :class:`~service.segmentation.registry.LoadedModel`, so the pipeline does not know the
    difference."""

    report: ModelReport  # this precision's
    handle: DeploymentHandle
    timeout_s: float
    attempts: int

    @property
    def name(self) -> str:
        """The name the model is served under."""
        return self.report.name

    @property
    def meta(self) -> ModelMetadata:
        """The model's metadata, read from its ONNX file by the model replica."""
        assert self.report.meta is not None
        return self.report.meta

    @property
    def provider(self) -> str:
        """The execution provider the model replica really uses."""
        return self.report.provider

    @property
    def precision(self) -> Precision:
        """The variant of the model version this stands for."""
        return self.meta.precision

    @property
    def request_bytes(self) -> int:
        """0: ONNX Runtime's buffers live in the model replica, not in this ingress process."""
        return 0

    def describe(self) -> dict[str, object]:
        """What ``GET /models`` reports: the model replica's own description."""
        return dict(self.report.description)

    def release_memory(self) -> None:
        """Nothing here: the model replica manages its arena after each model call."""

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        """Send the tiles to the model deployment (in chunks it accepts) and wait."""
        step = self.report.max_batch_tiles
        if tiles.shape[0] <= step:
            return self._call(tiles)
        return np.concatenate([self._call(tiles[i : i + step]) for i in range(0, len(tiles), step)])

    def _call(self, tiles: np.ndarray) -> np.ndarray:
        last = ""
        for attempt in range(1, self.attempts + 1):
            response = self.handle.predict.remote(tiles, self.precision)
            try:
                return np.asarray(response.result(timeout_s=self.timeout_s))
            except BackPressureError:
                raise ModelUnavailableError(
                    f"model {self.name!r} has more tiles queued than it accepts", busy=True
                ) from None
            except RayTaskError as exc:
                if isinstance(exc.cause, ModelUnavailableError):  # a file loaded on demand
                    raise exc.cause from None
                raise
            except TimeoutError:
                response.cancel()
                raise ModelUnavailableError(
                    f"model {self.name!r} did not answer within {self.timeout_s:.0f} s", busy=True
                ) from None
            except (RayActorError, DeploymentUnavailableError) as exc:
                # The replica died or is being replaced: the tiles have no side effects, so
                # they go again, to a replica Serve still has.
                last = type(exc).__name__
                log.warning(
                    "model %s: a replica was lost during a tile batch (%s), attempt %d of %d",
                    self.name,
                    last,
                    attempt,
                    self.attempts,
                )
                time.sleep(0.2 * attempt)
        raise ModelUnavailableError(
            f"model {self.name!r} is being restarted ({last} {self.attempts} times)", busy=False
        )


class ProxyRequestIdMiddleware(HttpMiddleware):
    """One ``X-Request-ID`` per response, as the standalone service sends.

    Serve's proxy already passes the request ID it answers with in the request's
    ``x-request-id`` header (the client's, or one it made) and adds it to the response; the
    app adopts that ID for its log lines and error bodies, so the app's own copy of the
    header is dropped here. An ID the app did not adopt (not a safe token) stays, so the
    error body's ID is always among the headers.
    """

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        proxy_id = dict(scope["headers"]).get(b"x-request-id")

        async def send_once(message: Message) -> None:
            if message["type"] == "http.response.start" and proxy_id is not None:
                message["headers"] = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if not (k.lower() == b"x-request-id" and v == proxy_id)
                ]
            await send(message)

        await self.app(scope, receive, send_once)


@serve.deployment(
    name=INGRESS,
    max_ongoing_requests=16,
    max_queued_requests=64,
    backpressure_config={"status_code": 503, "retry_after_s": 2},
    health_check_period_s=10,
    graceful_shutdown_timeout_s=60,
    ray_actor_options={"num_cpus": 1},
)
@serve.ingress()
class SegmentIngress:
    """The service's FastAPI app on a Serve replica, its models reached through handles.

    Settings come from the replica's ``SEG_*`` environment as in the standalone service
    (``SEG_INFERENCE_WORKERS`` threads run requests; keep ``SEG_INFERENCE_WORKERS`` +
    ``SEG_MAX_QUEUE`` at or above the deployment's ``max_ongoing_requests``, so that Serve's
    queue, not the app's gate, decides when to refuse).
    """

    def __init__(
        self, models: dict[str, DeploymentHandle], args: dict[str, Any], hub: DeploymentHandle
    ) -> None:
        self.app_args = AppArgs.model_validate(args)
        self.handles = models
        self.hub = hub
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.settings = (
            Settings(model_dir=self.app_args.model_dir) if self.app_args.model_dir else Settings()
        )
        self.fastapi_app: FastAPI | None = None
        self.loaded = threading.Event()

    def __serve_build_asgi_app__(self) -> FastAPI:
        self.fastapi_app = create_app(self.settings, load_models=self.load_models)
        self.fastapi_app.add_middleware(ProxyRequestIdMiddleware)
        metrics: ServiceMetrics = self.fastapi_app.state.metrics
        own = metrics.exposition
        metrics.exposition = lambda: self.service_exposition(own)
        threading.Thread(
            target=self.push_metrics, args=(own,), name="metrics-push", daemon=True
        ).start()
        return self.fastapi_app

    def push_metrics(self, own: Callable[[], bytes]) -> None:
        """Every few seconds, this replica's metrics to the hub."""
        while True:
            try:
                self.hub.push.remote(self.replica, own().decode()).result(timeout_s=10)
            except Exception as exc:  # the hub restarting: the next push will do
                log.debug("metrics push failed: %s", exc)
            time.sleep(METRICS_PUSH_S)

    def service_exposition(self, own: Callable[[], bytes]) -> bytes:
        """``GET /metrics``: every ingress replica's metrics merged (this one's as of now), or
        this replica's alone, with a warning, when the hub does not answer."""
        mine = own()
        try:
            texts = self.hub.push.remote(self.replica, mine.decode()).result(timeout_s=5)
        except Exception as exc:
            log.warning("metrics hub unavailable (%s): /metrics shows this replica only", exc)
            return mine
        return merge_expositions(texts)

    def load_models(self, registry: ModelRegistry, settings: Settings) -> None:
        """Ask each model deployment what it serves (waits for its replicas to be up)."""
        for name, handle in sorted(self.handles.items()):
            try:
                report: ModelReport = handle.describe.remote().result(
                    timeout_s=self.app_args.describe_timeout_s
                )
            except Exception as exc:
                registry.failed[name] = f"model deployment did not answer: {type(exc).__name__}"
                log.error("model %s: %s", name, registry.failed[name])
                continue
            if report.failed is not None:
                registry.failed[name] = report.failed
                continue
            args = (handle, self.app_args.predict_timeout_s, self.app_args.predict_attempts)
            variants: dict[Precision, SegmentationModel] = {
                Precision.FP32: RemoteModel(report, *args)
            }
            variants |= {p: RemoteModel(v, *args) for p, v in report.variants.items()}
            assert report.auto is not None
            registry.add(name, variants, report.auto)
            log.info("model %s served by deployment %s", name, model_deployment_name(name))
        registry.ready.set()
        self.loaded.set()

    def check_health(self) -> None:
        """Serve's health check: unhealthy when a model deployment could not be reached at
        start, so that Serve replaces this replica and it asks again (a model that failed to
        load is reported by /readyz instead: a restart would not fix its file)."""
        if self.fastapi_app is None or not self.loaded.is_set():
            return
        registry: ModelRegistry = self.fastapi_app.state.registry
        unreachable = [n for n, why in registry.failed.items() if why.startswith("model deploy")]
        if unreachable:
            raise RuntimeError(f"model deployments not reachable at start: {unreachable}")


# --- the application --------------------------------------------------------------------------


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application ``serve run``/``serve deploy`` start: the ingress and one model
    deployment per model of ``model_dir`` (or per name in ``models``)."""
    parsed = AppArgs.model_validate(args)
    if parsed.model_dir is None:
        parsed.model_dir = settings_from_env().model_dir
    files = find_model_files(parsed.model_dir)
    names = parsed.models if parsed.models is not None else sorted(files)
    unknown = sorted(set(names) - set(files))
    if unknown:
        raise ValueError(f"models {unknown} are not in {parsed.model_dir} (found: {sorted(files)})")
    # What @serve.deployment made of the classes (mypy sees the classes).
    model_deployment = cast(serve.Deployment, ModelDeployment)
    ingress = cast(serve.Deployment, SegmentIngress)
    hub = cast(serve.Deployment, MetricsHub)
    handles = {
        name: model_deployment.options(name=model_deployment_name(name)).bind(
            name,
            str(files[name]),
            str(parsed.model_dir),
            parsed.max_batch_tiles,
            parsed.batch_wait_timeout_s,
        )
        for name in names
    }
    return ingress.bind(handles, parsed.model_dump(mode="json"), hub.bind())
