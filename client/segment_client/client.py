"""``SegmentClient``: one image (a path, bytes or a NumPy array) to the service, the mask back as
an array with the scores and the timings.

Only httpx, NumPy, Pillow and tifffile: a lab's laptop talks to the service without installing
the service. Every failure is a :class:`ServiceError` carrying what the service said (``detail``,
``code``, ``request_id``), or a :class:`ClientError` when no answer came at all.
"""

from __future__ import annotations

import base64
import io
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx
import numpy as np
import tifffile
from PIL import Image

ImageInput = str | os.PathLike[str] | bytes | np.ndarray

DEFAULT_TIMEOUT_S = 600.0  # a 16384² image on a CPU host takes minutes in one request
CONNECT_TIMEOUT_S = 10.0
DEFAULT_RETRIES = 5
MAX_RETRY_WAIT_S = 60.0
JOB_POLL_S = 0.5


class ClientError(Exception):
    """No usable answer: the service could not be reached, or it answered something that is not
    the service's (a proxy's HTML page, a truncated body)."""


@dataclass
class ServiceError(ClientError):
    """The service refused or failed a request; ``detail`` says why in plain language."""

    status: int
    detail: str
    code: str | None = None
    request_id: str | None = None
    retry_after: float | None = None

    def __post_init__(self) -> None:
        super().__init__(str(self))

    @property
    def retryable(self) -> bool:
        """A 503 that may pass later: busy, loading, a model being replaced. Not a model file
        that does not load (``model_unavailable`` without ``Retry-After``: only replacing the
        file helps)."""
        lasting = self.code == "model_unavailable" and self.retry_after is None
        return self.status == 503 and not lasting

    def __str__(self) -> str:
        code = f" {self.code}" if self.code else ""
        rid = f" (request {self.request_id})" if self.request_id else ""
        return f"HTTP {self.status}{code}: {self.detail}{rid}"


@dataclass
class JobStatus:
    """Where a job stands (``GET /jobs/{id}``)."""

    id: str
    state: str
    tiles_done: int
    tiles_total: int | None
    eta_seconds: float | None
    error: dict[str, Any] | None
    raw: dict[str, Any] = field(repr=False)

    def __str__(self) -> str:
        """One line for people (``progress=print``): "running, tiles 40/121 (33 %), ETA 12 s"."""
        parts = [self.state]
        if self.tiles_total:
            share = 100 * self.tiles_done / self.tiles_total
            parts.append(f"tiles {self.tiles_done}/{self.tiles_total} ({share:.0f} %)")
        if self.eta_seconds is not None and not self.finished:
            parts.append(f"ETA {self.eta_seconds:.0f} s")
        if self.error:
            parts.append(str(self.error.get("detail", "")))
        return ", ".join(parts)

    @property
    def finished(self) -> bool:
        """Succeeded, failed or cancelled: nothing more will happen."""
        return self.state in ("succeeded", "failed", "cancelled")

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> JobStatus:
        """From the service's JSON status document."""
        return cls(
            id=str(doc["id"]),
            state=str(doc["state"]),
            tiles_done=int(doc.get("tiles_done") or 0),
            tiles_total=doc.get("tiles_total"),
            eta_seconds=doc.get("eta_seconds"),
            error=doc.get("error"),
            raw=doc,
        )


@dataclass
class Segmentation:
    """One segmented image.

    ``mask`` holds class indices (0 = background; 1 = foreground for binary models, also with
    ``class_name``), shape ``(H, W)``, or ``(planes..., H, W)`` for a stack. ``scores`` is the
    service's per-class IoU/Dice document (``None`` without a ground truth); ``timings_ms`` its
    stage timings; ``document`` the whole JSON answer with the encoded mask left out.
    """

    mask: np.ndarray
    scores: dict[str, Any] | None
    timings_ms: dict[str, float]
    request_id: str | None
    document: dict[str, Any] = field(repr=False)
    mask_bytes: bytes = field(repr=False, default=b"")
    mask_format: str = "png"
    # output="labels": the objects' instance labels (0 background; ids restart per plane of a
    # stack), the file they came in, and one row per object (a stack's with its plane index)
    labels: np.ndarray | None = None
    labels_bytes: bytes = field(repr=False, default=b"")
    labels_format: str = "png"
    objects: list[dict[str, Any]] | None = None

    @property
    def mean_iou(self) -> float | None:
        """Mean IoU over the classes present (``None`` without a ground truth)."""
        return None if self.scores is None else self.scores.get("mean_iou")

    @property
    def object_scores(self) -> dict[str, Any] | None:
        """Object-level scores (F1, AP, ...) when the model gives instances and a ground truth
        was sent."""
        return self.document.get("object_metrics")


def decode_labels(data: bytes) -> np.ndarray:
    """A labels file the service sent (16-bit PNG, or TIFF) as its integer ids."""
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return np.asarray(tifffile.imread(io.BytesIO(data)))
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img).astype(np.uint16)


def _object_rows(doc: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The object table of a JSON answer: a 2-D image's rows, or every plane's with the
    plane's index along each plane axis."""
    if doc.get("objects") is not None:
        return list(doc["objects"])
    planes = doc.get("plane_objects")
    if planes is None:
        return None
    return [{**plane["index"], **row} for plane in planes for row in plane["objects"]]


def decode_mask(data: bytes, *, binary: bool) -> np.ndarray:
    """A mask file the service sent (PNG, or TIFF for stacks) as class indices."""
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        arr = tifffile.imread(io.BytesIO(data))
    else:
        with Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(img)  # palette PNGs keep their indices ("P" mode)
    arr = np.asarray(arr, dtype=np.uint8)
    if binary:
        arr = (arr > 0).astype(np.uint8)
    return arr


def encode_array(array: np.ndarray) -> tuple[bytes, str]:
    """An array as an upload the service reads without loss: TIFF (any integer or float type,
    grey or RGB, or a stack) named ``array.tif``."""
    arr = np.ascontiguousarray(array)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    buf = io.BytesIO()
    photometric = "rgb" if arr.ndim == 3 and arr.shape[-1] in (3, 4) else "minisblack"
    tifffile.imwrite(buf, arr, photometric=photometric)
    return buf.getvalue(), "array.tif"


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def service_error(response: httpx.Response) -> ServiceError:
    """The service's JSON error body as a :class:`ServiceError` (or the status and the start of
    whatever else answered: a proxy, a load balancer)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    rid = response.headers.get("x-request-id")
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        if not isinstance(detail, str):
            detail = str(detail)
        return ServiceError(
            response.status_code,
            detail,
            body.get("code"),
            body.get("request_id") or rid,
            _retry_after(response),
        )
    text = response.text[:200].strip() or response.reason_phrase
    return ServiceError(response.status_code, text, None, rid, _retry_after(response))


class _Upload:
    """What to send as one multipart field, re-opened for every try (a retry sends it again)."""

    def __init__(self, source: ImageInput, what: str) -> None:
        self.what = what
        self.path: Path | None = None
        self.data: bytes | None = None
        if isinstance(source, np.ndarray):
            self.data, self.name = encode_array(source)
        elif isinstance(source, bytes | bytearray):
            self.data, self.name = bytes(source), what
        else:
            self.path = Path(source)
            if not self.path.is_file():
                raise ClientError(f"{what} {self.path} does not exist or is not a file")
            self.name = self.path.name

    def open(self) -> IO[bytes]:
        """A fresh binary stream of the content."""
        if self.path is not None:
            return self.path.open("rb")
        assert self.data is not None
        return io.BytesIO(self.data)


class SegmentClient:
    """A connection to the service at ``url`` (e.g. ``http://host:8000``).

    ``timeout`` bounds each request (seconds; a whole image is one request), ``retries`` how
    many times a 503 (busy or loading) is retried, each after the ``Retry-After`` the service
    asked for (at most ``max_retry_wait`` seconds). Thread-safe: one client can serve many
    threads. Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        max_retry_wait: float = MAX_RETRY_WAIT_S,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.url = url.rstrip("/")
        self.retries = retries
        self.max_retry_wait = max_retry_wait
        self._sleep = sleep
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
        )

    def __enter__(self) -> SegmentClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    # --- plumbing ---------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        uploads: Mapping[str, _Upload] | None = None,
        params: Mapping[str, Any] | None = None,
        expect: tuple[int, ...] = (200,),
    ) -> httpx.Response:
        """One call, retried after ``Retry-After`` while the service answers 503."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        uploads = uploads or {}
        for attempt in range(self.retries + 1):
            streams = {name: up.open() for name, up in uploads.items()}
            try:
                files = {
                    name: (uploads[name].name, stream, "application/octet-stream")
                    for name, stream in streams.items()
                }
                response = self._http.request(method, path, params=query, files=files or None)
            except httpx.TimeoutException as exc:
                raise ClientError(
                    f"{method} {self.url}{path}: no answer within the timeout "
                    f"({type(exc).__name__}); large images take long on a CPU host: raise the "
                    "timeout or use a job (progress=...)"
                ) from exc
            except httpx.TransportError as exc:
                raise ClientError(
                    f"{method} {self.url}{path}: cannot reach the service: {exc}"
                ) from exc
            finally:
                for stream in streams.values():
                    stream.close()
            if response.status_code in expect:
                return response
            err = service_error(response)
            if not err.retryable or attempt == self.retries:
                raise err
            wait = err.retry_after if err.retry_after is not None else 1.0
            self._sleep(min(wait, self.max_retry_wait))
        raise AssertionError("unreachable")

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        try:
            doc = response.json()
        except ValueError as exc:
            raise ClientError(
                f"{response.request.url}: expected JSON, got {response.text[:200]!r}"
            ) from exc
        if not isinstance(doc, dict):
            raise ClientError(f"{response.request.url}: expected a JSON object, got {doc!r:.200}")
        return doc

    # --- the service ------------------------------------------------------------------------

    def models(self) -> dict[str, dict[str, Any]]:
        """``GET /models``: every loaded model's description, by name."""
        doc = self._json(self._request("GET", "/models"))
        return {m["name"]: m for m in doc.get("models", [])}

    @staticmethod
    def _is_binary(class_name: Any, doc: dict[str, Any]) -> bool:
        """0/255 masks (binary models, or one class asked for) become 0/1; multiclass masks
        already hold class indices. Only binary models report a threshold."""
        return class_name is not None or doc.get("threshold") is not None

    @staticmethod
    def _params(
        model: str | None, params: Mapping[str, Any], *, as_json: bool = True
    ) -> dict[str, Any]:
        query: dict[str, Any] = {"model": model, **params}
        if as_json:
            query["format"] = "json"
        for key, value in list(query.items()):
            if isinstance(value, bool):
                query[key] = "true" if value else "false"
        return query

    def _uploads(self, image: ImageInput, ground_truth: ImageInput | None) -> dict[str, _Upload]:
        uploads = {"image": _Upload(image, "image")}
        if ground_truth is not None:
            uploads["ground_truth"] = _Upload(ground_truth, "ground truth")
        return uploads

    def segmentation_from_json(self, doc: dict[str, Any], class_name: Any = None) -> Segmentation:
        """A JSON answer of ``/segment`` (or a job's result) as a :class:`Segmentation`."""
        encoded = doc.pop("mask_tiff", None)
        fmt = "tiff"
        if encoded is None:
            encoded, fmt = doc.pop("mask_png", None), "png"
        if encoded is None:
            raise ClientError(f"the answer carries no mask: keys {sorted(doc)}")
        data = base64.b64decode(encoded)
        binary = self._is_binary(class_name, doc)
        labels_png, labels_tiff = doc.pop("labels_png", None), doc.pop("labels_tiff", None)
        labels_bytes = base64.b64decode(labels_png or labels_tiff or "")
        return Segmentation(
            mask=decode_mask(data, binary=binary),
            scores=doc.get("metrics"),
            timings_ms=doc.get("timings_ms") or {},
            request_id=doc.get("request_id"),
            document=doc,
            mask_bytes=data,
            mask_format=fmt,
            labels=decode_labels(labels_bytes) if labels_bytes else None,
            labels_bytes=labels_bytes,
            labels_format="png" if labels_png else "tiff",
            objects=_object_rows(doc),
        )

    def segment(
        self,
        image: ImageInput,
        *,
        model: str | None = None,
        ground_truth: ImageInput | None = None,
        progress: Callable[[JobStatus], None] | None = None,
        **params: Any,
    ) -> Segmentation:
        """Segment ``image`` (a path, the file's bytes, or an array) with ``model`` (default: the
        service's); score it against ``ground_truth`` when given.

        ``params`` are the service's query parameters: ``threshold``, ``overlap``, ``blend``,
        ``class_name``, ``channel``, ``diameter``, ``output`` ("labels": the objects' instance
        labels and their table as well, from a model that gives instances). With ``progress``,
        the image goes through a job (``POST /jobs``) and ``progress`` is called with each
        :class:`JobStatus` polled, tiles done out of the total and an ETA; otherwise one
        synchronous ``POST /segment``.
        """
        if progress is not None:
            job = self.submit(image, model=model, ground_truth=ground_truth, **params)
            return self.wait(job.id, progress=progress, class_name=params.get("class_name"))
        response = self._request(
            "POST",
            "/segment",
            uploads=self._uploads(image, ground_truth),
            params=self._params(model, params),
        )
        return self.segmentation_from_json(self._json(response), params.get("class_name"))

    # --- jobs -------------------------------------------------------------------------------

    def submit(
        self,
        image: ImageInput,
        *,
        model: str | None = None,
        ground_truth: ImageInput | None = None,
        **params: Any,
    ) -> JobStatus:
        """``POST /jobs``: start segmenting ``image`` in the background; the job's status."""
        response = self._request(
            "POST",
            "/jobs",
            uploads=self._uploads(image, ground_truth),
            params=self._params(model, params, as_json=False),
            expect=(202,),
        )
        return JobStatus.from_json(self._json(response))

    def job(self, job_id: str) -> JobStatus:
        """``GET /jobs/{id}``: state, tiles done and total, ETA."""
        return JobStatus.from_json(self._json(self._request("GET", f"/jobs/{job_id}")))

    def cancel(self, job_id: str) -> JobStatus:
        """``DELETE /jobs/{id}``: cancel a job that has not finished, or forget a finished one."""
        return JobStatus.from_json(self._json(self._request("DELETE", f"/jobs/{job_id}")))

    def result(self, job_id: str, class_name: Any = None) -> Segmentation:
        """``GET /jobs/{id}/result``: the finished job's answer (as ``/segment`` gives it)."""
        response = self._request("GET", f"/jobs/{job_id}/result", params={"format": "json"})
        return self.segmentation_from_json(self._json(response), class_name)

    def wait(
        self,
        job_id: str,
        *,
        progress: Callable[[JobStatus], None] | None = None,
        poll: float = JOB_POLL_S,
        class_name: Any = None,
    ) -> Segmentation:
        """Poll a job until it finishes; its result, or the :class:`ServiceError` it failed
        with. ``progress`` sees every status polled."""
        while True:
            status = self.job(job_id)
            if progress is not None:
                progress(status)
            if status.finished:
                break
            self._sleep(poll)
        if status.state == "succeeded":
            return self.result(job_id, class_name)
        error = status.error or {}
        raise ServiceError(
            int(error.get("status", 500)),
            str(error.get("detail", f"job {job_id} {status.state}")),
            error.get("code", status.state),
            status.raw.get("request_id"),
        )
