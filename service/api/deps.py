"""Dependencies the routes declare, as ``Annotated`` aliases that return domain objects.

A route that needs a model declares :data:`ModelDep` (the ``?model=`` query parameter) or
:data:`NamedModelDep` (the ``{name}`` path segment) and receives the loaded model: the 503 while
models load and the 404 for an unknown or failed model are answered here, the same everywhere.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, Query, Request

from service.core.config import Settings
from service.core.errors import ApiError, ErrorCode
from service.core.gate import InferenceGate
from service.core.metrics import ServiceMetrics
from service.core.resources import MemoryBudget
from service.registry import ModelRegistry, SegmentationModel

MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"


def _app_state(attribute: str) -> Callable[[Request], Any]:
    """A dependency returning ``request.app.state.<attribute>`` (set up by ``create_app``)."""

    def from_state(request: Request) -> Any:
        return getattr(request.app.state, attribute)

    from_state.__name__ = f"app_{attribute}"
    return from_state


# The app's settings (those it was created with, not re-read from the environment), its
# loaded models, its Prometheus metrics and its admission control (count and memory).
app_settings = _app_state("settings")
SettingsDep = Annotated[Settings, Depends(app_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(_app_state("registry"))]
MetricsDep = Annotated[ServiceMetrics, Depends(_app_state("metrics"))]
GateDep = Annotated[InferenceGate, Depends(_app_state("gate"))]
# The memory requests are admitted against (None: no budget known, nothing checked).
MemoryBudgetDep = Annotated[MemoryBudget | None, Depends(_app_state("memory_budget"))]


def lookup_model(registry: ModelRegistry, settings: Settings, name: str) -> SegmentationModel:
    """The model called ``name``; 503 with ``Retry-After`` while the models load, 404 naming
    the available models when it is unknown or failed to load."""
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
        raise ApiError(
            404, ErrorCode.UNKNOWN_MODEL, f"{detail}; available models: {sorted(registry.models)}"
        )
    return model


def model_from_query(
    registry: RegistryDep,
    settings: SettingsDep,
    model: Annotated[
        str | None,
        Query(pattern=MODEL_NAME_PATTERN, description="Model name (default: the default model)"),
    ] = None,
) -> SegmentationModel:
    """The model a request names with ``?model=``, or the default model."""
    return lookup_model(registry, settings, model or settings.default_model)


def model_from_path(name: str, registry: RegistryDep, settings: SettingsDep) -> SegmentationModel:
    """The model a path names (``/models/{name}``)."""
    return lookup_model(registry, settings, name)


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
