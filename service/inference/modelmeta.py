"""The metadata a segmentation model carries inside its ONNX file (`metadata_props`).

The training pipeline writes it with :meth:`ModelMetadata.to_props`; the service reads it with
:meth:`ModelMetadata.from_props`. One schema for both sides is what lets the service serve a model
with no side configuration. ONNX metadata values are strings, so structured fields are JSON.
"""

from __future__ import annotations

import json
import re
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from service.inference.precision import Precision

SCHEMA_VERSION = "1"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class Task(StrEnum):
    """Binary models emit one sigmoid channel; multiclass ones a softmax channel per class."""

    BINARY = "binary"
    MULTICLASS = "multiclass"


class Normalization(BaseModel):
    """Intensity normalisation, computed once on the whole image (never per tile: that makes seams).

    ``percentile``: ``(x - p_low) / (p_high - p_low)`` with the percentiles taken per channel over
    the whole image. ``scale``: ``x / scale`` (e.g. 255 for 8-bit data with a known range).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = Field("percentile", pattern="^(percentile|scale)$")
    low: float = Field(1.0, ge=0.0, le=100.0)
    high: float = Field(99.8, ge=0.0, le=100.0)
    scale: float = Field(255.0, gt=0.0)

    @model_validator(mode="after")
    def _low_below_high(self) -> Normalization:
        if self.method == "percentile" and not self.low < self.high:
            raise ValueError(f"percentile low ({self.low}) must be below high ({self.high})")
        return self


class Instances(BaseModel):
    """How a model's output separates touching objects into instances (``output=labels``).

    Binary models emit a second sigmoid channel, the probability of an object's core (its
    interior, away from any edge it shares with a neighbour): cores above ``seed_threshold``
    seed a watershed that grows them over the foreground mask. Multiclass models name the
    class that seeds (e.g. ``interior``); every non-background class is foreground.
    Objects smaller than ``min_area_fraction`` of a typical object at the training scale
    (a disc of ``object_diameter``) are specks and dropped.
    """

    model_config = ConfigDict(extra="forbid")

    method: str = Field("seeded-watershed", pattern="^seeded-watershed$")
    seed_channel: int = Field(
        1, ge=1, description="Output channel (binary) or class index (multiclass) of the cores."
    )
    seed_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    min_area_fraction: float = Field(0.1, ge=0.0, lt=1.0)


class ModelMetadata(BaseModel):
    """Everything the service needs to serve a model, and what a person needs to trust it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str = "1"
    task: Task
    classes: list[str] = Field(min_length=2)
    tile_size: int = Field(
        ge=16, le=4096, description="Side of the square tiles the model runs on."
    )
    tile_multiple: int = Field(
        16, ge=1, description="Tile sides must be a multiple of this (2**depth for a U-Net)."
    )
    channels: int = Field(ge=1, le=4)
    normalization: Normalization = Normalization()
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    object_diameter: float | None = Field(
        None,
        gt=0.0,
        allow_inf_nan=False,
        description="Median object diameter in pixels (equivalent-circle diameter) in the "
        "training data: the model's training scale. Requests that give the diameter of their "
        "objects (diameter=) are rescaled to it; without it a model cannot rescale.",
    )
    input_layout: str = Field("NHWC", pattern="^NHWC$")
    label_values: list[int] | None = Field(
        None, description="Pixel value of each class in the training masks, if not 0..K-1."
    )
    instances: Instances | None = Field(
        None, description="Set when the model separates touching objects (output=labels)."
    )
    precision: Precision = Field(
        Precision.FP32,
        description="The arithmetic of this file: fp32, or a variant of the same network "
        "(int8, fp16) beside it in its version folder.",
    )
    architecture: str = "unet"
    description: str = ""
    training_data: str = ""
    metrics: dict[str, Any] = Field(default_factory=dict)
    commit: str = ""

    @field_validator("name")
    @classmethod
    def _name_is_safe(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"model name {v!r} must match {_NAME_RE.pattern}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ModelMetadata:
        if self.task is Task.BINARY and len(self.classes) != 2:
            raise ValueError(
                f"a binary model has 2 classes (background, foreground), got {self.classes}"
            )
        if self.tile_size % self.tile_multiple:
            raise ValueError(
                f"tile_size {self.tile_size} is not a multiple of {self.tile_multiple}"
            )
        if self.label_values is not None and len(self.label_values) != len(self.classes):
            raise ValueError("label_values needs one value per class")
        if self.instances is not None:
            seed = self.instances.seed_channel
            if self.task is Task.BINARY and seed != 1:
                raise ValueError(f"a binary model's cores are output channel 1, got {seed}")
            if self.task is Task.MULTICLASS and seed >= self.num_classes:
                raise ValueError(f"seed class {seed} is not one of the {self.num_classes} classes")
        return self

    @property
    def num_classes(self) -> int:
        """Number of classes, background included."""
        return len(self.classes)

    @property
    def output_channels(self) -> int:
        """Channels the network emits: 1 sigmoid for binary (2 with instances: foreground and
        cores), one softmax channel per class otherwise."""
        if self.task is Task.BINARY:
            return 1 if self.instances is None else 2
        return self.num_classes

    def to_props(self) -> dict[str, str]:
        """Flatten to ONNX ``metadata_props``: strings only, structured values as JSON."""
        props: dict[str, str] = {"segmentation_schema": SCHEMA_VERSION}
        for key, value in self.model_dump(mode="json").items():
            props[key] = value if isinstance(value, str) else json.dumps(value)
        return props

    @classmethod
    def from_props(cls, props: dict[str, str]) -> ModelMetadata:
        """Parse ONNX ``metadata_props``; raise ``ValueError`` naming what is missing or wrong."""
        if props.get("segmentation_schema") != SCHEMA_VERSION:
            raise ValueError(
                f"not a segmentation model of schema {SCHEMA_VERSION}: metadata_props has "
                f"segmentation_schema={props.get('segmentation_schema')!r}"
            )
        data: dict[str, Any] = {}
        for key, raw in props.items():
            if key == "segmentation_schema" or key not in cls.model_fields:
                continue
            if cls.model_fields[key].annotation is str:
                data[key] = raw
            else:
                try:
                    data[key] = json.loads(raw)
                except json.JSONDecodeError:
                    data[key] = raw
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ValueError(f"invalid model metadata: {exc}") from exc
