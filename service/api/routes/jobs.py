"""``/jobs``: a segmentation that reports its progress, for images that take minutes.

``POST /jobs`` takes what ``POST /segment`` takes and answers 202 with the job's ID at once;
``GET /jobs/{id}`` says where it stands (queued, running with tiles done of the total and an
ETA, succeeded, failed with the error ``/segment`` would have given, cancelled);
``GET /jobs/{id}/result`` answers what ``/segment`` would have (PNG or JSON), as many times as
wanted until the result's TTL; ``DELETE /jobs/{id}`` cancels a job, or forgets a finished one.

Jobs share ``/segment``'s workers and waiting room (503 with ``Retry-After`` when they are
full) and its limits; their results are bounded (service.jobs).
"""

from __future__ import annotations

import base64
import io
import logging
from datetime import UTC, datetime
from typing import Annotated, Any, BinaryIO

import numpy as np
import tifffile
from fastapi import APIRouter, File, Path, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from service.api.admission import reserve_memory
from service.api.deps import (
    ApiKeyDep,
    GateDep,
    MemoryBudgetDep,
    MetricsDep,
    ModelDep,
    SettingsDep,
)
from service.api.errors import api_error
from service.api.params import SegmentOptionsDep
from service.api.routes.segment import OutputFormat, response_format
from service.core.errors import ApiError, ErrorCode, error_responses
from service.core.gate import OverloadedError
from service.core.logs import log_fields
from service.exceptions import SegmentationInputError
from service.images import header_size
from service.jobs import (
    Job,
    JobCancelledError,
    JobResult,
    JobState,
    JobStore,
    JobStoreFullError,
    png_bound,
)
from service.responses import SegmentResponse
from service.stacks import StackAnswer, StackResponse, segment_upload, stack_layout

JOBS_PATH = "/jobs"

log = logging.getLogger("service")

router = APIRouter(tags=["jobs"], dependencies=[ApiKeyDep])

JobIdPath = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$", description="The job's ID")]


class JobError(BaseModel):
    """Why a job failed: what ``POST /segment`` would have answered."""

    status: int
    code: ErrorCode
    detail: str


class JobStatus(BaseModel):
    """Where a job stands."""

    id: str
    state: JobState
    model: str
    request_id: str = Field(description="The ID of the POST that created the job")
    tiles_done: int
    tiles_total: int | None = Field(description="Known once the image is decoded")
    progress: float | None = Field(description="tiles_done / tiles_total")
    eta_seconds: float | None = Field(description="At the rate of the tiles done so far")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    expires_at: datetime | None = Field(description="When the result is deleted (TTL)")
    error: JobError | None
    status_url: str
    result_url: str


def _png_as_tiff(png: bytes) -> bytes:
    """A 2-D job's mask PNG as the TIFF ``/segment?format=tiff`` would have sent (same
    values: 0/255, or class indices)."""
    with Image.open(io.BytesIO(png)) as img:
        pixels = np.asarray(img)
    buf = io.BytesIO()
    tifffile.imwrite(buf, pixels, photometric="minisblack", compression="zlib")
    return buf.getvalue()


def _b64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def _time(t: float | None) -> datetime | None:
    return None if t is None else datetime.fromtimestamp(t, UTC)


def job_status(store: JobStore, job: Job) -> JobStatus:
    """The status document of ``job``."""
    total = job.tiles_total
    error = job.error
    return JobStatus(
        id=job.id,
        state=job.state,
        model=job.model,
        request_id=job.request_id,
        tiles_done=job.tiles_done,
        tiles_total=total,
        progress=None if not total else round(job.tiles_done / total, 4),
        eta_seconds=job.eta_seconds(),
        created_at=_time(job.created),
        started_at=_time(job.started),
        finished_at=_time(job.finished),
        expires_at=_time(store.expires_at(job)),
        error=None
        if error is None
        else JobError(status=error.status, code=error.code, detail=error.message),
        status_url=f"{JOBS_PATH}/{job.id}",
        result_url=f"{JOBS_PATH}/{job.id}/result",
    )


def _store(request: Request) -> JobStore:
    store: JobStore = request.app.state.jobs
    return store


def _job(request: Request, job_id: str) -> tuple[JobStore, Job]:
    store = _store(request)
    job = store.get(job_id)
    if job is None:
        raise ApiError(
            404,
            ErrorCode.NOT_FOUND,
            f"no job {job_id}: unknown, deleted, or its result expired (results are kept "
            f"{store.ttl_seconds:g} s after a job finishes)",
        )
    return store, job


def _take(upload: UploadFile) -> BinaryIO:
    """The upload's spooled file, kept open past the response: FastAPI closes the files of a
    request when it is answered, and a job reads them later. The job closes it when done."""
    owned = upload.file
    upload.file = io.BytesIO()  # what FastAPI closes instead
    return owned


_JOB_ERRORS = error_responses(
    {
        401: "API key required",
        404: "Unknown model, or unknown or expired job",
        503: "Saturated, still loading, or the job store is full; retry after `Retry-After`",
    }
)


@router.post(
    JOBS_PATH,
    status_code=202,
    response_model=JobStatus,
    responses=error_responses(
        {
            400: "Malformed request body (e.g. broken multipart framing)",
            401: "API key required",
            404: "Unknown model",
            413: "Upload over the size limit",
            422: "Unusable parameter",
            503: "Saturated, still loading, or the job store is full; retry after `Retry-After`",
        }
    ),
)
async def create_job(
    request: Request,
    model: ModelDep,
    options: SegmentOptionsDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    gate: GateDep,
    memory: MemoryBudgetDep,
    image: Annotated[UploadFile, File(description="PNG, JPEG or TIFF; 8/16-bit; grey or RGB")],
    ground_truth: Annotated[
        UploadFile | None,
        File(description="Optional mask, same size: 0/1, 0/255, class indices or instance labels"),
    ] = None,
) -> JSONResponse:
    """Start segmenting an image in the background; follow it at ``status_url``."""
    store = _store(request)
    rid: str = request.state.request_id
    # Off the event loop: a stack's header lists every page.
    layout = await run_in_threadpool(stack_layout, image.file)
    if layout is not None:  # a multi-page TIFF mask, at most its raw planes plus framing
        reserve = png_bound(layout.planes * layout.height, layout.width)
    else:
        size = await run_in_threadpool(header_size, image.file)
        classes = len(model.meta.classes) if options.per_class else 0
        reserve = 0 if size is None else png_bound(*size) * (1 + classes)
    try:
        job = store.admit(model.name, rid, reserve)
    except JobStoreFullError as exc:
        metrics.rejected.inc()
        raise ApiError(
            503, ErrorCode.OVERLOADED, exc.message, headers={"Retry-After": str(exc.retry_after)}
        ) from None
    try:  # the same memory admission as /segment: 413 never fits, 503 not now
        reservation = reserve_memory(
            memory,
            model,
            image.file,
            ground_truth.file if ground_truth is not None else None,
            options.params,
            settings.retry_after_seconds,
            settings.max_image_pixels,
        )
    except (ApiError, SegmentationInputError) as exc:
        store.discard(job)
        if isinstance(exc, ApiError) and exc.code is ErrorCode.OVERLOADED:
            metrics.rejected.inc()
        raise
    image_file = _take(image)
    truth_file = _take(ground_truth) if ground_truth is not None else None
    upload_bytes = sum(f.size or 0 for f in (image, ground_truth) if f is not None)

    def close_files() -> None:
        image_file.close()
        if truth_file is not None:
            truth_file.close()

    job.on_finish = close_files

    def work() -> None:
        try:
            run()
        finally:
            # The answer is stored as bytes and its arrays are freed by now: give the memory
            # back (SEG_CPU_MEMORY_ARENA=shrink) and the job's share of the budget.
            model.release_memory()
            if reservation is not None:
                reservation.release()

    def run() -> None:
        if not store.start(job):
            store.cancelled(job)
            return
        try:
            answer = segment_upload(
                model,
                image_file,
                options.params,
                max_pixels=settings.max_image_pixels,
                layout=layout,
                channel=options.channel,
                per_class=options.per_class,
                truth_file=truth_file,
                progress=job.report,
            )
            document = answer.document(rid).model_dump(
                mode="json", exclude={"mask_png", "mask_tiff", "class_masks"}
            )
            metrics.record_segmentation(model.name, answer.result, upload_bytes)
            if isinstance(answer, StackAnswer):
                kept = JobResult(answer.tiff, True, None, answer.headers(), document)
            else:
                kept = JobResult(answer.png, False, answer.class_masks, answer.headers(), document)
            store.succeed(job, kept)
        except JobCancelledError:
            store.cancelled(job)
        except SegmentationInputError as exc:
            store.fail(job, api_error(exc))
        except Exception:
            log.exception("job %s failed", job.id)
            store.fail(job, ApiError(500, ErrorCode.INTERNAL, "internal error; quote the job ID"))

    try:
        job.future = gate.submit(work)
        if reservation is not None:  # also when the job is cancelled before it starts
            job.future.add_done_callback(lambda _: reservation.release())
    except OverloadedError:
        store.discard(job)
        close_files()
        if reservation is not None:
            reservation.release()
        metrics.rejected.inc()
        raise ApiError(
            503,
            ErrorCode.OVERLOADED,
            f"the service is busy ({gate.limit} requests admitted); retry in "
            f"{settings.retry_after_seconds} s",
            headers={"Retry-After": str(settings.retry_after_seconds)},
        ) from None
    log_fields(model=model.name, bytes=upload_bytes)
    status = job_status(store, job)
    return JSONResponse(
        status.model_dump(mode="json"), status_code=202, headers={"Location": status.status_url}
    )


@router.get(f"{JOBS_PATH}/{{job_id}}", response_model=JobStatus, responses=_JOB_ERRORS)
def get_job(request: Request, job_id: JobIdPath) -> JobStatus:
    """Where the job stands: state, tiles done of the total, ETA, or why it failed."""
    store, job = _job(request, job_id)
    return job_status(store, job)


@router.get(
    f"{JOBS_PATH}/{{job_id}}/result",
    response_model=SegmentResponse | StackResponse,
    responses={
        200: {
            "content": {"image/png": {}, "image/tiff": {}},
            "description": "What POST /segment would answer",
        },
        **error_responses(
            {
                401: "API key required",
                404: "Unknown or expired job",
                409: "Not finished yet; retry after `Retry-After`",
                410: "Cancelled",
                413: "The job failed: its image was over the limit",
                415: "The job failed: not a PNG, JPEG or TIFF",
                422: "The job failed: unusable image or ground truth",
                500: "The job failed unexpectedly; quote the job ID",
            }
        ),
    },
)
def get_job_result(
    request: Request,
    job_id: JobIdPath,
    format: Annotated[
        OutputFormat | None, Query(description="png or json; default from the Accept header")
    ] = None,
) -> Response:
    """The finished job's answer, as ``POST /segment`` gives it; a failed job's error."""
    _, job = _job(request, job_id)
    if job.state is JobState.FAILED:
        assert job.error is not None
        raise job.error
    if job.state is JobState.CANCELLED:
        raise ApiError(410, ErrorCode.JOB_CANCELLED, f"job {job.id} was cancelled")
    if job.result is None:
        done = f"{job.tiles_done} of {job.tiles_total} tiles" if job.tiles_total else "waiting"
        raise ApiError(
            409,
            ErrorCode.JOB_NOT_FINISHED,
            f"job {job.id} is {job.state.value} ({done}); poll {JOBS_PATH}/{job.id}",
            headers={"Retry-After": "1"},
        )
    result = job.result
    fmt = response_format(request, format, stack=result.stack)
    doc: dict[str, Any] = dict(result.document)
    if fmt is OutputFormat.JSON:
        encoded: BaseModel
        if result.stack:
            encoded = StackResponse(**doc, mask_tiff=_b64(result.mask))
        else:
            encoded = SegmentResponse(
                **doc,
                mask_png=_b64(result.mask),
                class_masks=None
                if result.class_masks is None
                else {name: _b64(png) for name, png in result.class_masks.items()},
            )
        return Response(
            content=encoded.model_dump_json(),
            media_type="application/json",
            headers=result.headers,
        )
    if fmt is OutputFormat.TIFF and not result.stack:
        return Response(
            content=_png_as_tiff(result.mask), media_type="image/tiff", headers=result.headers
        )
    media_type = "image/tiff" if result.stack else "image/png"
    return Response(content=result.mask, media_type=media_type, headers=result.headers)


@router.delete(f"{JOBS_PATH}/{{job_id}}", response_model=JobStatus, responses=_JOB_ERRORS)
def delete_job(request: Request, job_id: JobIdPath) -> JobStatus:
    """Cancel a job that has not finished (a running one stops at its next tile batch), or
    delete a finished one's result now."""
    store, job = _job(request, job_id)
    if job.state.finished:
        store.discard(job)
    else:
        store.cancel(job)
    return job_status(store, job)
