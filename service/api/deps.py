"""Dependencies the routes declare, as ``Annotated`` aliases that return domain objects.

A route that needs a model declares :data:`ModelDep` (the ``?model=`` query parameter) or
:data:`NamedModelDep` (the ``{name}`` path segment) and receives the loaded model: the 503 while
models load and the 404 for an unknown or failed model are answered here, the same everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import threading
from collections.abc import AsyncIterator, Callable
from enum import StrEnum
from typing import Annotated, Any

from fastapi import Depends, Query, Request

from service.api.problems import ApiError, ErrorCode
from service.core.config import Settings
from service.core.telemetry import ServiceMetrics
from service.inference.precision import AUTO, Precision
from service.segmentation.jobs import JobStore
from service.segmentation.registry import ModelRegistry, SegmentationModel
from service.segmentation.runner import Runner

MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}(@[0-9]{1,9})?$"


def _app_state(attribute: str) -> Callable[[Request], Any]:
    """A dependency returning ``request.app.state.<attribute>`` (set up by ``create_app``)."""

    def from_state(request: Request) -> Any:
        return getattr(request.app.state, attribute)

    from_state.__name__ = f"app_{attribute}"
    return from_state


# The app's settings (those it was created with, not re-read from the environment), its
# loaded models, its Prometheus metrics, the runner that admits and runs every segmentation
# (workers and memory), and its background jobs.
app_settings = _app_state("settings")
SettingsDep = Annotated[Settings, Depends(app_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(_app_state("registry"))]
MetricsDep = Annotated[ServiceMetrics, Depends(_app_state("metrics"))]
RunnerDep = Annotated[Runner, Depends(_app_state("runner"))]
JobStoreDep = Annotated[JobStore, Depends(_app_state("jobs"))]


async def _watch_disconnect(request: Request, gone: threading.Event) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    gone.set()


@contextlib.asynccontextmanager
async def watch_disconnect(request: Request) -> AsyncIterator[threading.Event]:
    """An event set when the client disconnects before its answer is sent: the work it asked
    for stops at its next tile batch instead of holding a worker for nobody. Enter it once the
    request's body has been read: what ``receive`` gives after that is the disconnect."""
    gone = threading.Event()
    watcher = asyncio.create_task(_watch_disconnect(request, gone))
    try:
        yield gone
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def client_gone(request: Request) -> AsyncIterator[threading.Event]:
    """:func:`watch_disconnect` for a route whose body FastAPI reads (form fields and files),
    which it has done before dependencies run."""
    async with watch_disconnect(request) as gone:
        yield gone


ClientGoneDep = Annotated[threading.Event, Depends(client_gone)]


class PrecisionChoice(StrEnum):
    """What a request may ask for: ``auto`` (the host's measured choice) or one precision."""

    AUTO = AUTO
    FP32 = Precision.FP32.value
    FP16 = Precision.FP16.value
    INT8 = Precision.INT8.value


def lookup_model(
    registry: ModelRegistry, settings: Settings, name: str, precision: str = AUTO
) -> SegmentationModel:
    """The model called ``name`` in ``precision``; 503 with ``Retry-After`` while the models
    load, 404 naming the available models when it is unknown or failed to load, 422 naming
    the loaded precisions when the one asked for is not among them."""
    if not registry.ready.is_set():
        raise ApiError(
            503,
            ErrorCode.NOT_READY,
            "the models are still loading; try again shortly",
            headers={"Retry-After": str(settings.retry_after_seconds)},
        )
    model = registry.get(name)
    if model is None:
        reason = registry.failed.get(name)
        detail = f"model {name!r} failed to load" if reason else f"no model named {name!r}"
        base = name.partition("@")[0]
        if not reason and base in registry.models:
            detail += f"; versions of {base!r}: {registry.versions(base)}"
        raise ApiError(
            404, ErrorCode.UNKNOWN_MODEL, f"{detail}; available models: {sorted(registry.models)}"
        )
    variant = registry.variant(model, precision)
    if variant is None:
        loaded = [str(p) for p in registry.precisions(model)]
        raise ApiError(
            422,
            ErrorCode.INVALID_PARAMETER,
            f"precision {precision!r}: model {name!r} (version {model.meta.version}) runs in "
            f"{loaded} here; use one of those, or auto",
        )
    return variant


def model_from_query(
    registry: RegistryDep,
    settings: SettingsDep,
    model: Annotated[
        str | None,
        Query(
            pattern=MODEL_NAME_PATTERN,
            description="Model name (default: the default model), its newest version; "
            "NAME@VERSION pins a version (GET /models lists them)",
        ),
    ] = None,
    precision: Annotated[
        PrecisionChoice,
        Query(
            description="auto: the precision measured to pay on this host without costing "
            "accuracy (GET /models says which and why); fp32, fp16, int8: that variant of the "
            "model, where its version has it",
        ),
    ] = PrecisionChoice.AUTO,
) -> SegmentationModel:
    """The model a request names with ``?model=`` (or the default model), in ``?precision=``."""
    return lookup_model(registry, settings, model or settings.default_model, precision.value)


def model_from_path(name: str, registry: RegistryDep, settings: SettingsDep) -> SegmentationModel:
    """The model a path names (``/models/{name}``): its fp32 file, which stands for its
    version (the route picks another precision where it takes one)."""
    return lookup_model(registry, settings, name, Precision.FP32.value)


ModelDep = Annotated[SegmentationModel, Depends(model_from_query)]
NamedModelDep = Annotated[SegmentationModel, Depends(model_from_path)]


def presented_key(request: Request) -> str | None:
    """The API key from ``Authorization: Bearer <key>`` or ``X-API-Key``."""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key")


def require_api_key(request: Request) -> None:
    """401 unless the configured API key is presented (compared in constant time)."""
    settings: Settings = app_settings(request)
    if settings.api_key is None:
        return
    given = presented_key(request) or ""
    expected = settings.api_key.get_secret_value()
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(
            401,
            ErrorCode.UNAUTHORIZED,
            "this service needs an API key: send 'Authorization: Bearer <key>' "
            "or 'X-API-Key: <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


ApiKeyDep = Depends(require_api_key)
