"""Every loaded model as an Imaging Server Kit algorithm, for napari (``napari-serverkit``),
QuPath (its Server Kit extension) and ``imaging_server_kit.Client``.

The algorithms are served by Server Kit's own server (``imaging_server_kit.remote.app``'s
``AlgorithmApp``: its routes, its msgpack streaming, its parameter schemas), mounted under
``SEG_SERVERKIT_PREFIX`` (``/serverkit``) of the running service. Each algorithm runs the
service's own pipeline on the service's own workers: the array a client sends is handed to the
decoder as a lossless TIFF (a 2-D image, RGB, or a Z/T stack plane by plane), admitted by the
same gate as ``/segment`` and held to the same pixel limit, so a frame gives the same mask
here as through ``/segment``. Optional: needs the ``serverkit`` extra.
"""

from __future__ import annotations

import importlib.util
import inspect
import io
import logging
import sys
import threading
import types
from typing import Any

import numpy as np
import tifffile
from fastapi import FastAPI, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.deps import require_api_key
from service.api.errors import error_response
from service.core.config import Settings
from service.core.errors import ApiError, ErrorCode
from service.core.gate import InferenceGate, OverloadedError
from service.core.metrics import ServiceMetrics
from service.inference.modelmeta import Task
from service.inference.rescale import diameter_range
from service.registry import ModelRegistry, SegmentationModel
from service.segmenter import SegmentParams, segment
from service.stacks import segment_stack, stack_layout

log = logging.getLogger("service")


def import_serverkit() -> Any:
    """``imaging_server_kit``, imported without its demo algorithms.

    Its package ``__init__`` imports ``imaging_server_kit.demo``, whose sample images include
    ``skimage.data.brain()``: a download at import time, which fails (after retries) on a lab
    network without internet, and in CI. The demos are never used here, so an empty module
    stands in for them before the import; everything else is Server Kit's own code.
    """
    if importlib.util.find_spec("imaging_server_kit") is None:
        raise ImportError("imaging-server-kit is not installed (the serverkit extra)")
    if "imaging_server_kit" not in sys.modules and "imaging_server_kit.demo" not in sys.modules:
        demo = types.ModuleType("imaging_server_kit.demo")
        demo.__dict__.update(multi_algo_tools=None, multi_algo_demos=None)
        sys.modules["imaging_server_kit.demo"] = demo
    import imaging_server_kit

    return imaging_server_kit


def serverkit_available() -> bool:
    """Whether the ``serverkit`` extra is installed, without importing it: the package and
    what it pulls in hold ~95 MiB, paid on the first request to the mount, not by every
    service process at start-up."""
    return importlib.util.find_spec("imaging_server_kit") is not None


def _as_tiff(image: np.ndarray) -> bytes:
    """An array from a Server Kit client as the lossless TIFF the service's decoder reads:
    ``(H, W)`` grey, ``(H, W, 3|4)`` RGB(A), or ``(planes..., H, W)`` a stack."""
    arr = np.ascontiguousarray(image)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    rgb = arr.ndim == 3 and arr.shape[-1] in (3, 4)
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, photometric="rgb" if rgb else "minisblack")
    return buf.getvalue()


def segment_array(
    model: SegmentationModel,
    image: np.ndarray,
    params: SegmentParams,
    *,
    settings: Settings,
    gate: InferenceGate,
    metrics: ServiceMetrics,
) -> np.ndarray:
    """The class-index mask of ``image`` (the same shape less any colour axis), through the
    service's decoder, pipeline and admission gate."""
    if not isinstance(image, np.ndarray) or image.ndim < 2:
        shape = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"expected an image array of 2 or more dimensions, got {shape}")
    params.check(model.name, model.meta)
    data = _as_tiff(image)
    layout = stack_layout(io.BytesIO(data))

    def work() -> np.ndarray:
        if layout is not None:
            stack = segment_stack(
                model, io.BytesIO(data), params, max_pixels=settings.max_image_pixels
            )
            metrics.record_segmentation(model.name, stack, len(data))
            return stack.mask.reshape(*layout.plane_shape, layout.height, layout.width)
        result = segment(model, io.BytesIO(data), params, max_pixels=settings.max_image_pixels)
        metrics.record_segmentation(model.name, result, len(data))
        return result.mask

    try:
        return gate.submit(work).result()
    except OverloadedError:
        metrics.rejected.inc()
        raise RuntimeError(
            f"the service is busy ({gate.limit} requests admitted); try again in "
            f"{settings.retry_after_seconds} s"
        ) from None


def model_algorithm(
    model: SegmentationModel, settings: Settings, gate: InferenceGate, metrics: ServiceMetrics
) -> Any:
    """One model as a Server Kit ``Algorithm``: an image in, a mask (labels layer) out, with
    the model's threshold (binary models), the tile overlap and, for a model with a training
    scale, the objects' diameter as parameters."""
    sk = import_serverkit()
    meta = model.meta
    binary = meta.task is Task.BINARY
    parameters: dict[str, Any] = {
        "image": sk.Image(description="Grey or RGB image, 2-D or a Z/T stack (plane by plane)")
    }
    if binary:
        parameters["threshold"] = sk.Float(
            name="Threshold",
            description="Probability cut-off of the foreground class",
            default=float(meta.threshold),
            min=0.01,
            max=0.99,
            step=0.01,
        )
    parameters["overlap"] = sk.Float(
        name="Tile overlap",
        description="Fraction of the tile side shared by neighbouring tiles",
        default=float(settings.default_overlap),
        min=0.0,
        max=0.75,
        step=0.05,
    )
    diameters = diameter_range(meta)
    if diameters is not None:
        assert meta.object_diameter is not None
        trained = float(meta.object_diameter)
        parameters["diameter"] = sk.Float(
            name="Object diameter (px)",
            description=f"The objects' diameter in pixels in this image; the model was "
            f"trained on {trained:g} px objects and the image is rescaled by {trained:g} / "
            "diameter (the default: as it is)",
            default=trained,
            min=diameters[0],
            max=diameters[1],
            step=0.5,
        )

    def run(**values: Any) -> Any:
        params = SegmentParams(
            threshold=values.get("threshold"),
            overlap=values["overlap"],
            batch_size=settings.tile_batch_size,
            diameter=values.get("diameter"),
        )
        mask = segment_array(
            model, values["image"], params, settings=settings, gate=gate, metrics=metrics
        )
        return sk.Mask(mask, name=f"{model.name} mask")

    # Server Kit reads an algorithm's parameters from its function's signature: this model's.
    run.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY) for name in parameters]
    )
    classes = ", ".join(meta.classes)
    return sk.algorithm(
        run,
        name=model.name,
        parameters=parameters,
        description=f"U-Net segmentation ({classes}), model {model.name} version "
        f"{meta.version}, tiled and stitched by the segmentation service",
        tags=["Segmentation", "U-Net"],
    )


class ServerKitMount:
    """The Server Kit app for the loaded models, built once they are loaded (503 before), and
    behind the service's API key when one is set."""

    def __init__(self, app: FastAPI, settings: Settings) -> None:
        self.parent = app
        self.settings = settings
        self._app: ASGIApp | None = None
        self._lock = threading.Lock()

    def _build(self) -> ASGIApp:
        import_serverkit()  # first: keeps its demo module (which downloads an image) out
        from imaging_server_kit.remote.app import AlgorithmApp

        state = self.parent.state
        registry: ModelRegistry = state.registry
        algorithms = [
            model_algorithm(model, self.settings, state.gate, state.metrics)
            for _, model in sorted(registry.models.items())
        ]
        built: ASGIApp = AlgorithmApp(algorithms, name="segmentation-service").app
        return built

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        refusal: ApiError | None = None
        try:
            require_api_key(request)
        except ApiError as exc:
            refusal = exc
        registry: ModelRegistry = self.parent.state.registry
        if refusal is None and not registry.ready.is_set():
            refusal = ApiError(
                503,
                ErrorCode.NOT_READY,
                "the models are still loading; try again shortly",
                headers={"Retry-After": str(self.settings.retry_after_seconds)},
            )
        if refusal is not None:
            await error_response(request, refusal)(scope, receive, send)
            return
        if self._app is None:
            with self._lock:
                if self._app is None:
                    self._app = self._build()
        await self._app(scope, receive, send)


def mount_serverkit(app: FastAPI, settings: Settings) -> bool:
    """Mount the Server Kit algorithms at ``settings.serverkit_prefix`` when the extra is
    installed; False (and a log line saying why) otherwise."""
    prefix = settings.serverkit_prefix
    if not prefix:
        return False
    if not serverkit_available():
        log.info(
            "Imaging Server Kit not installed: napari/QuPath endpoint %s off "
            "(pip install '.[serverkit]')",
            prefix,
        )
        return False
    app.mount(prefix, ServerKitMount(app, settings))
    return True
