"""Dependencies the routes declare, as ``Annotated`` aliases."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from service.core.config import Settings
from service.core.errors import ApiError
from service.core.gate import InferenceGate
from service.core.metrics import ServiceMetrics
from service.registry import ModelRegistry


def get_settings(request: Request) -> Settings:
    """The app's settings."""
    settings: Settings = request.app.state.settings
    return settings


def get_registry(request: Request) -> ModelRegistry:
    """The loaded models."""
    registry: ModelRegistry = request.app.state.registry
    return registry


def get_metrics(request: Request) -> ServiceMetrics:
    """The app's Prometheus metrics."""
    metrics: ServiceMetrics = request.app.state.metrics
    return metrics


def get_gate(request: Request) -> InferenceGate:
    """Admission control for inference."""
    gate: InferenceGate = request.app.state.gate
    return gate


def presented_key(request: Request) -> str | None:
    """The API key from ``Authorization: Bearer <key>`` or ``X-API-Key``."""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key")


def require_api_key(request: Request) -> None:
    """401 unless the configured API key is presented (compared in constant time)."""
    settings = get_settings(request)
    if settings.api_key is None:
        return
    given = presented_key(request) or ""
    expected = settings.api_key.get_secret_value()
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(
            401,
            "unauthorized",
            "this service needs an API key: send 'Authorization: Bearer <key>' "
            "or 'X-API-Key: <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
GateDep = Annotated[InferenceGate, Depends(get_gate)]
ApiKeyDep = Depends(require_api_key)
