"""``GET /models``: what is loaded, with its metadata and the execution provider really in use."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from service.api.deps import ApiKeyDep, NamedModelDep, RegistryDep, SettingsDep
from service.api.problems import error_responses
from service.core.config import Settings
from service.inference.precision import Precision, iou_loss, source_ious
from service.segmentation.registry import ModelRegistry, SegmentationModel

router = APIRouter(
    tags=["models"],
    dependencies=[ApiKeyDep],
    responses=error_responses({401: "API key required"}),
)


class VariantInfo(BaseModel):
    """One precision of a model version, with what its card measured."""

    precision: Precision
    file: str
    provider: str
    iou: dict[str, dict[str, float]] = Field(
        description="Foreground-class IoU per source, measured through the service's tiling "
        "on the fp32 model's test images (and its held-out sources)"
    )
    iou_loss: dict[str, float] = Field(
        description="Per source, the most IoU this variant loses against fp32 on any class "
        "(negative: it gains)"
    )
    speed: dict[str, Any] | None = Field(
        None, description="Its speed against fp32, measured side by side where it was built"
    )


class AutoChoice(BaseModel):
    """What ``precision=auto`` runs of this version on this host, and why."""

    precision: Precision
    reason: str


class ModelInfo(BaseModel):
    """One loaded model."""

    name: str
    version: str
    default: bool
    provider: str
    providers: list[str]
    versions: list[str] = Field(
        description="Loaded versions, oldest first: `model=NAME@VERSION` pins one; "
        "`model=NAME` is the newest"
    )
    instances: bool = Field(
        description="Separates touching objects: takes output=labels, and scores objects "
        "against an instance ground truth"
    )
    variants: list[VariantInfo] = Field(
        description="The precisions of this version loaded here (`precision=` picks one)"
    )
    auto: AutoChoice
    input: dict[str, str]
    output: dict[str, str]
    metadata: dict[str, Any]


class ModelList(BaseModel):
    """Every loaded model, and those that failed to load."""

    models: list[ModelInfo]
    failed: dict[str, str]


def _variant(model: SegmentationModel, fp32: SegmentationModel) -> VariantInfo:
    metrics = model.meta.metrics
    return VariantInfo(
        precision=model.meta.precision,
        file=model.meta.precision.file_name,
        provider=model.provider,
        iou=source_ious(metrics),
        iou_loss=iou_loss(metrics, fp32.meta.metrics),
        speed=metrics.get("speed"),
    )


def _info(model: SegmentationModel, registry: ModelRegistry, settings: Settings) -> ModelInfo:
    choice = registry.choice(model)
    return ModelInfo(
        **model.describe(),
        variants=[_variant(v, model) for v in registry.precisions(model).values()],
        auto=AutoChoice(precision=choice.precision, reason=choice.reason),
        # the newest version is the default's (a pinned earlier one is not)
        default=model.name == settings.default_model and registry.models.get(model.name) is model,
        versions=registry.versions(model.name),
        instances=model.meta.instances is not None,
    )


@router.get("/models", response_model=ModelList)
@router.get("/v1/models", response_model=ModelList, include_in_schema=False)
def list_models(registry: RegistryDep, settings: SettingsDep) -> ModelList:
    """Every loaded model with classes, tile size, channels, normalisation, threshold, version
    and provider."""
    return ModelList(
        models=[_info(m, registry, settings) for _, m in sorted(registry.models.items())],
        failed=dict(registry.failed),
    )


@router.get(
    "/models/{name}",
    response_model=ModelInfo,
    responses=error_responses(
        {404: "No such model", 422: "Invalid request", 503: "Models still loading"}
    ),
)
@router.get("/v1/models/{name}", response_model=ModelInfo, include_in_schema=False)
def get_model(model: NamedModelDep, registry: RegistryDep, settings: SettingsDep) -> ModelInfo:
    """One model's description (``NAME@VERSION``: that version's)."""
    return _info(model, registry, settings)
