"""Liveness and readiness, always open (no API key): orchestrators and load balancers poll them."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from service.api.deps import RegistryDep

router = APIRouter(tags=["health"])


class Health(BaseModel):
    """Liveness answer."""

    status: str


class Readiness(BaseModel):
    """Readiness answer: which models serve, which failed and why."""

    status: str
    models: list[str]
    failed: dict[str, str]


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process is up and answering (says nothing about the models)."""
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Models still loading, or one failed"}},
)
def readyz(registry: RegistryDep) -> JSONResponse:
    """200 once every model in the model directory is loaded and warmed up; 503 before that,
    and also while any model failed to load (the others still serve)."""
    loading = not registry.ready.is_set()
    ok = not loading and not registry.failed and bool(registry.models)
    body = Readiness(
        status="ready" if ok else ("loading" if loading else "degraded"),
        models=sorted(registry.models),
        failed=dict(registry.failed),
    )
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)
