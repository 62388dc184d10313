"""``/jobs``: a segmentation that reports its progress, for images that take minutes.

``POST /jobs`` takes what ``POST /segment`` takes and answers 202 with the job's ID at once;
``GET /jobs/{id}`` says where it stands (queued, running with tiles done of the total and an
ETA, succeeded, failed with the error ``/segment`` would have given, cancelled);
``GET /jobs/{id}/result`` answers what ``/segment`` would have (PNG, TIFF or JSON), as many
times as wanted until the result's TTL; ``DELETE /jobs/{id}`` cancels a job, or forgets a
finished one.

Jobs are planned, admitted and run exactly as ``/segment`` is (the same use case, workers,
waiting room, memory budget and limits: 4xx before any 503); their results are bounded
(:mod:`service.segmentation.jobs`).
"""

from __future__ import annotations

import io
from typing import Annotated, BinaryIO

from fastapi import APIRouter, Path, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from service.api.deps import ApiKeyDep, JobStoreDep, ModelDep, RunnerDep, SettingsDep
from service.api.params import SegmentOptionsDep
from service.api.paths import JOBS_PATH
from service.api.problems import ApiError, ErrorCode, api_error, error_responses
from service.api.replies import reply, response_format
from service.api.routes.segment import (
    SEGMENT_ERRORS,
    FormatQuery,
    ImageUpload,
    TruthUpload,
    upload_of,
)
from service.api.schemas import JobError, JobStatus, SegmentResponse, StackResponse, job_status
from service.core.logs import log_fields
from service.segmentation import usecase
from service.segmentation.jobs import Job, JobState, JobStore
from service.segmentation.runner import Runner

router = APIRouter(tags=["jobs"], dependencies=[ApiKeyDep])

JobIdPath = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$", description="The job's ID")]


def status_of(store: JobStore, job: Job, retry_after: int) -> JobStatus:
    """The status document of ``job``, its failure as ``/segment`` would have answered it."""
    error = None
    if job.error is not None:
        err = api_error(job.error, retry_after)
        error = JobError(status=err.status, code=err.code, detail=err.message)
    return job_status(job, store.expires_at(job), error, JOBS_PATH)


def find_job(store: JobStore, job_id: str) -> Job:
    """The job, or a 404 that says why it may be gone."""
    job = store.get(job_id)
    if job is None:
        raise ApiError(
            404,
            ErrorCode.NOT_FOUND,
            f"no job {job_id}: unknown, deleted, or its result expired (results are kept "
            f"{store.ttl_seconds:g} s after a job finishes)",
        )
    return job


def take(upload: UploadFile) -> BinaryIO:
    """The upload's spooled file, kept open past the response: FastAPI closes the files of a
    request when it is answered, and a job reads them later. The job closes it when done."""
    owned = upload.file
    upload.file = io.BytesIO()  # what FastAPI closes instead
    return owned


def kept_upload(image: UploadFile, truth: UploadFile | None, channel: str | None) -> usecase.Upload:
    """The request's files, taken over by the job."""
    return usecase.Upload(take(image), take(truth) if truth is not None else None, channel)


def start(
    store: JobStore, runner: Runner, job: Job, plan: usecase.Plan, upload: usecase.Upload
) -> None:
    """Queue the job's segmentation: it runs as ``/segment``'s does, reports its tiles to the
    job, and leaves its result packed in the store; its files are closed when it ends."""
    job.on_finish = upload.close
    try:
        job.future = runner.submit_segmentation(
            plan,
            upload,
            usecase.Segmentation.pack,
            progress=job.report,
            on_start=lambda: store.begin(job),
        )
    except BaseException:
        store.discard(job)
        upload.close()
        raise
    job.future.add_done_callback(lambda future: store.settle(job, future))


def finished_result(job: Job, retry_after: int) -> usecase.PackedSegmentation:
    """The job's kept result; the error it failed with, 410 if cancelled, 409 until done."""
    if job.error is not None:
        raise api_error(job.error, retry_after)
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
    return job.result


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
    responses=error_responses(SEGMENT_ERRORS),
)
async def create_job(
    request: Request,
    model: ModelDep,
    options: SegmentOptionsDep,
    settings: SettingsDep,
    runner: RunnerDep,
    store: JobStoreDep,
    image: ImageUpload,
    ground_truth: TruthUpload = None,
) -> JSONResponse:
    """Start segmenting an image in the background; follow it at ``status_url``."""
    upload = upload_of(image, ground_truth, options.channel)
    plan = await run_in_threadpool(
        usecase.plan, model, upload, options.params, max_pixels=settings.max_image_pixels
    )
    runner.check_fits(plan)  # every 413 before the store's 503
    bound = usecase.packed_bound(plan.image.planes * plan.image.pixels, plan.instances)
    job = store.admit(model.name, request.state.request_id, bound, options.per_class)
    start(store, runner, job, plan, kept_upload(image, ground_truth, options.channel))
    log_fields(model=model.name, bytes=plan.upload_bytes)
    status = status_of(store, job, settings.retry_after_seconds)
    return JSONResponse(
        status.model_dump(mode="json"), status_code=202, headers={"Location": status.status_url}
    )


@router.get(f"{JOBS_PATH}/{{job_id}}", response_model=JobStatus, responses=_JOB_ERRORS)
def get_job(store: JobStoreDep, settings: SettingsDep, job_id: JobIdPath) -> JobStatus:
    """Where the job stands: state, tiles done of the total, ETA, or why it failed."""
    return status_of(store, find_job(store, job_id), settings.retry_after_seconds)


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
async def get_job_result(
    request: Request,
    store: JobStoreDep,
    settings: SettingsDep,
    job_id: JobIdPath,
    format: FormatQuery = None,
) -> Response:
    """The finished job's answer, as ``POST /segment`` gives it; a failed job's error."""
    job = find_job(store, job_id)
    kept = finished_result(job, settings.retry_after_seconds)
    fmt = response_format(request, format, stack=kept.summary.stack)
    answer = await run_in_threadpool(
        lambda: reply(kept.unpack(), fmt, job.request_id, per_class=job.per_class)
    )
    return Response(content=answer.body, media_type=answer.media_type, headers=answer.headers)


@router.delete(f"{JOBS_PATH}/{{job_id}}", response_model=JobStatus, responses=_JOB_ERRORS)
def delete_job(store: JobStoreDep, settings: SettingsDep, job_id: JobIdPath) -> JobStatus:
    """Cancel a job that has not finished (a running one stops at its next tile batch), or
    delete a finished one's result now."""
    job = find_job(store, job_id)
    if job.state.finished:
        store.discard(job)
    else:
        store.cancel(job)
    return status_of(store, job, settings.retry_after_seconds)
