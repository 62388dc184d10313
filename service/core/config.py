"""Typed settings from environment variables (prefix ``SEG_``), validated at start-up.

A wrong value stops the service before it accepts traffic, with pydantic's message naming the
variable, rather than surfacing later as a failed request.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import ByteSize, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.core.logs import LogFormat

# The tiles' overlap when a request names none: 0.125 rather than 0.25 runs ~30 % fewer tiles,
# and the nucleus IoU it gives is within 0.003 of 0.25's on every source of the default model's
# card (docs/benchmarks.md, "Quality per source"), with no seams (tests/test_default_models.py).
DEFAULT_OVERLAP = 0.125

REPO_MODELS = Path(__file__).resolve().parents[2] / "models"

# ONNX Runtime's CPU memory arena. "on" keeps every buffer a model call ever needed (hundreds of
# MB per U-Net after one tile batch, for as long as the process lives); "shrink" keeps them for
# the tile batches of one request and gives them back when it is over; "off" allocates and frees
# per model call (page faults every batch). docs/memory.md measures the three.
CpuArena = Literal["off", "shrink", "on"]


class Settings(BaseSettings):
    """Service configuration; every field can be set as ``SEG_<FIELD>`` (lists as JSON)."""

    model_config = SettingsConfigDict(env_prefix="SEG_", env_file=".env", extra="ignore")

    host: str = Field("0.0.0.0", description="Address segment-service listens on")
    port: int = Field(8000, ge=1, le=65535, description="Port segment-service listens on")
    model_dir: Path = Field(
        REPO_MODELS, description="Folder laid out as <name>/<version>/model.onnx"
    )
    default_model: str = Field("nuclei", description="Model used when a request names none")
    model_versions: Literal["all", "all-at-start", "newest"] = Field(
        "all",
        description="all: every version of every model is served (model=NAME@VERSION pins "
        "one), each model's newest loaded at start in fp32 and in the precision auto runs, every "
        "other file by the first request that asks for it; all-at-start: every file loaded at "
        "start; newest: each model's newest version only (a small container's memory)",
    )
    providers: list[str] = Field(
        ["CUDAExecutionProvider", "CPUExecutionProvider"],
        description="ONNX Runtime execution providers, in order of preference",
    )
    intra_op_threads: int = Field(
        0, ge=0, description="ONNX Runtime threads per session; 0 = all cores"
    )
    ort_spinning: bool = Field(
        True,
        description="ONNX Runtime's threads spin while they wait for work: keep on a host whose "
        "cores the service has to itself; false where it shares them (docs/deployment.md)",
    )
    tile_batch_size: int = Field(8, ge=1, le=256, description="Tiles per model call")
    cpu_memory_arena: CpuArena = Field(
        "shrink",
        description="ONNX Runtime's CPU arena: on (kept), shrink (given back per request), off",
    )
    default_overlap: float = Field(
        DEFAULT_OVERLAP,
        ge=0.0,
        le=0.75,
        description="Tile overlap when a request names none (see DEFAULT_OVERLAP)",
    )
    inference_workers: int = Field(
        1, ge=1, le=64, description="Requests processed at the same time"
    )
    max_queue: int = Field(8, ge=0, description="Requests allowed to wait; beyond that: 503")
    retry_after_seconds: int = Field(2, ge=1)
    max_upload_bytes: int = Field(1 << 30, ge=1024, description="Whole request body limit")
    memory_budget: ByteSize | None = Field(
        None,
        description="Memory the process may use (e.g. 4GiB); default: the cgroup's limit, if any",
    )
    memory_admission: bool = Field(
        True, description="Refuse requests whose estimated memory does not fit the budget"
    )
    spool_budget: ByteSize | None = Field(
        None,
        description="Space for spooled uploads (e.g. 2GiB); default: the spool folder's free space",
    )
    max_uploads: int = Field(
        64, ge=1, description="Uploads received at the same time; beyond that: 503"
    )
    upload_timeout_s: float = Field(
        600.0, gt=0, description="Longest time a request body may take to arrive; then 408"
    )
    min_upload_rate: ByteSize = Field(
        ByteSize(16 * 1024),
        description="Bytes per second an upload must average after the grace period; else 408",
    )
    upload_grace_s: float = Field(
        10.0, ge=0, description="Seconds an upload may take before min_upload_rate applies"
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Longest time a request line and headers may take to arrive; then 408",
    )
    max_image_pixels: int = Field(16384 * 16384, ge=1, description="Width x height limit")
    api_key: SecretStr | None = Field(None, description="When set, /segment and /models need it")
    metrics_require_key: bool = False
    cors_origins: list[str] = Field(default_factory=list)
    log_level: str = "INFO"
    log_format: LogFormat = Field(
        "text", description="text (plain lines) or json (one object per line, uvicorn's too)"
    )
    # Background jobs (POST /jobs): how many are kept at once (running, waiting or finished),
    # how many bytes their results may hold together, and for how long a result is kept.
    max_jobs: int = Field(
        64, ge=1, description="Jobs waiting, running or holding a result; beyond that: 503"
    )
    max_job_result_bytes: int = Field(
        2 << 30, ge=1024, description="Bytes all kept job results may hold together"
    )
    job_ttl_seconds: int = Field(3600, ge=1, description="How long a finished job's result is kept")
    # Imaging Server Kit (napari, QuPath): where the models are served as its algorithms when
    # the `serverkit` extra is installed; empty turns it off.
    serverkit_prefix: str = Field("/serverkit", pattern=r"^(/[A-Za-z0-9._-]+)*$")

    @field_validator("model_dir")
    @classmethod
    def _model_dir_exists(cls, v: Path) -> Path:
        if not v.is_dir():
            raise ValueError(f"model directory {v} does not exist")
        return v

    @field_validator("providers")
    @classmethod
    def _providers_named(cls, v: list[str]) -> list[str]:
        if not v or any(not p.endswith("ExecutionProvider") for p in v):
            raise ValueError(f"providers must be ONNX Runtime provider names, got {v}")
        return v


@lru_cache
def settings_from_env() -> Settings:
    """Settings read once from the environment (and a ``.env`` file in the working directory)."""
    return Settings()
