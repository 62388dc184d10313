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

import base64
import importlib.util
import inspect
import io
import json
import logging
import math
import sys
import threading
import types
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import tifffile
from fastapi import APIRouter, FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.deps import (
    ApiKeyDep,
    NamedModelDep,
    RegistryDep,
    RunnerDep,
    require_api_key,
    watch_disconnect,
)
from service.api.problems import ApiError, ErrorCode, error_response
from service.core.config import Settings
from service.inference.modelmeta import Task
from service.inference.precision import AUTO
from service.inference.rescale import diameter_range
from service.segmentation import usecase
from service.segmentation.errors import (
    InvalidImageError,
    InvalidParameterError,
    SegmentationInputError,
)
from service.segmentation.images import ImageHeader
from service.segmentation.registry import ModelRegistry, SegmentationModel
from service.segmentation.runner import Runner
from service.segmentation.tiff import TiffLayout
from service.segmentation.usecase import Plan, SegmentParams, Upload

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


@dataclass(frozen=True)
class Knob:
    """One numeric parameter of an algorithm: the Server Kit widget and the bounds checked."""

    label: str
    description: str
    default: float
    low: float
    high: float
    step: float


def knobs(model: SegmentationModel, settings: Settings) -> dict[str, Knob]:
    """The parameters a model takes here: the threshold (binary models), the tile overlap and,
    for a model with a training scale, the objects' diameter."""
    meta = model.meta
    found: dict[str, Knob] = {}
    if meta.task is Task.BINARY:
        found["threshold"] = Knob(
            "Threshold", "Probability cut-off of the foreground class",
            float(meta.threshold), 0.01, 0.99, 0.01,
        )  # fmt: skip
    found["overlap"] = Knob(
        "Tile overlap", "Fraction of the tile side shared by neighbouring tiles",
        float(settings.default_overlap), 0.0, 0.75, 0.05,
    )  # fmt: skip
    diameters = diameter_range(meta)
    if diameters is not None:
        assert meta.object_diameter is not None
        trained = float(meta.object_diameter)
        found["diameter"] = Knob(
            "Object diameter (px)",
            f"The objects' diameter in pixels in this image; the model was trained on "
            f"{trained:g} px objects and the image is rescaled by {trained:g} / diameter (the "
            "default: as it is)",
            trained, diameters[0], diameters[1], 0.5,
        )  # fmt: skip
    return found


# What a model that separates touching objects answers: its objects (the default) or its mask.
OUTPUTS = ("labels", "mask")


def precision_variant(
    registry: ModelRegistry, model: SegmentationModel, values: dict[str, Any]
) -> SegmentationModel:
    """The variant of ``model``'s version that the ``precision`` value asks for (default
    ``auto``: the host's measured choice); 422 naming the loaded ones otherwise."""
    precision = values.get("precision", AUTO)
    loaded = [str(p) for p in registry.precisions(model)]
    variant = None
    if precision == AUTO or precision in loaded:
        variant = registry.variant(model, precision)
    if variant is None:
        raise InvalidParameterError(
            f"precision: expected one of {[AUTO, *loaded]} (loaded for model {model.name!r} "
            f"version {model.meta.version}), got {precision!r}"
        )
    return variant


def segment_params(
    model: SegmentationModel, settings: Settings, values: dict[str, Any]
) -> SegmentParams:
    """The request's parameters, each checked against its bounds (422 naming it)."""
    checked: dict[str, float] = {}
    for name, knob in knobs(model, settings).items():
        value = values.get(name, knob.default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidParameterError(f"{name}: expected a number, got {value!r}")
        if not knob.low <= value <= knob.high:
            raise InvalidParameterError(
                f"{name}: must be between {knob.low:g} and {knob.high:g}, got {value:g}"
            )
        checked[name] = float(value)
    output = values.get("output", OUTPUTS[0] if model.meta.instances is not None else "mask")
    if output not in OUTPUTS:
        raise InvalidParameterError(f"output: expected one of {list(OUTPUTS)}, got {output!r}")
    return SegmentParams(
        threshold=checked.get("threshold"),
        overlap=checked["overlap"],
        batch_size=settings.tile_batch_size,
        diameter=checked.get("diameter"),
        labels=output == "labels",
    )


# Names for the leading axes of an array, which say nothing about what they are: each one is
# segmented plane by plane (distinct letters, none of them Y, X, C or S).
PLANE_AXES = "QRTUVWZ"


def array_header(data: bytes) -> ImageHeader:
    """How the service reads the TIFF of a Server Kit image array, from its header alone: by
    the array's shape, as napari does: ``(H, W)`` grey, ``(H, W, 3|4)`` RGB(A), ``(planes...,
    H, W)`` a stack segmented plane by plane (whatever photometric tag the client's tifffile
    wrote)."""
    try:
        with tifffile.TiffFile(io.BytesIO(data), name="image.tif") as tif:
            if len(tif.series) != 1:
                raise InvalidImageError(
                    f"the image is a TIFF of {len(tif.series)} images; send one array"
                )
            series = tif.series[0]
            shape, dtype = tuple(int(n) for n in series.shape), np.dtype(series.dtype)
    except SegmentationInputError:
        raise
    except Exception as exc:  # tifffile raises many types for damaged files
        raise InvalidImageError(f"the image is not a readable TIFF array ({exc})") from None
    if len(shape) < 2:
        raise InvalidImageError(f"expected an image array of 2 or more dimensions, got {shape}")
    rgb = len(shape) == 3 and shape[-1] in (3, 4)
    if len(shape) - 2 > len(PLANE_AXES):
        raise InvalidImageError(
            f"expected at most {len(PLANE_AXES)} plane axes before Y and X, got shape {shape}"
        )
    axes = "YXS" if rgb else PLANE_AXES[: len(shape) - 2] + "YX"
    layout = TiffLayout(axes=axes, shape=shape, dtype=dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    channels = shape[-1] if rgb else 1
    return ImageHeader(
        "TIFF", layout.width, layout.height, channels, nbytes, len(data), layout.planes, layout
    )


def parse_process_body(body: bytes) -> tuple[bytes, dict[str, Any]]:
    """The image's TIFF bytes and the scalar parameters of a Server Kit ``/process`` body (a
    JSON list of serialized layers); nothing is decoded but base64 and JSON, and a malformed
    body is a 422 that says what was expected."""
    try:
        layers = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than Python's stack
        raise InvalidParameterError(
            "the body is not JSON: expected Server Kit's list of serialized layers"
        ) from None
    if not isinstance(layers, list) or not all(
        isinstance(layer, dict) and isinstance(layer.get("name"), str) for layer in layers
    ):
        raise InvalidParameterError("expected Server Kit's list of layers, each with a name")
    image, values = None, {}
    for layer in layers:
        data = layer.get("data")
        if layer.get("kind") == "image":
            if not isinstance(data, str):
                raise InvalidImageError("the image layer carries no base64 TIFF data")
            try:
                image = base64.b64decode(data, validate=True)
            except ValueError:
                raise InvalidImageError("the image layer's data is not base64") from None
        elif data is None or isinstance(data, int | float | str | bool):
            values[layer["name"]] = data
        else:
            raise InvalidParameterError(f"{layer['name']}: expected a number")
    if image is None:
        raise InvalidImageError("no image layer: send the image to segment")
    return image, values


def as_tiff(image: np.ndarray) -> bytes:
    """An array as the lossless TIFF a Server Kit client sends (what an in-process caller of
    the algorithm hands over goes the same way as an HTTP one)."""
    arr = np.ascontiguousarray(image)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr)
    return buf.getvalue()


def mask_shape(header: ImageHeader) -> tuple[int, ...]:
    """The mask's shape for an array read by :func:`array_header`: its own, less any colour
    axis."""
    layout = header.layout
    assert layout is not None
    return tuple(n for axis, n in zip(layout.axes, layout.shape, strict=True) if axis != "S")


def plan_array(
    model: SegmentationModel, settings: Settings, image: bytes, values: dict[str, Any]
) -> tuple[Plan, Upload]:
    """The use case's plan for a Server Kit array: the parameters checked, the header read
    from the TIFF's tags, every limit applied; nothing decoded. The plan's memory counts the
    image's TIFF, which the request holds besides what ``/segment`` holds."""
    params = segment_params(model, settings, values)
    header = array_header(image)
    upload = Upload(io.BytesIO(image), header=header)
    plan = usecase.plan(model, upload, params, max_pixels=settings.max_image_pixels)
    return replace(plan, memory=plan.memory + len(image)), upload


def mask_layer(segmentation: usecase.Segmentation, shape: Sequence[int]) -> Any:
    """The mask, or with output=labels the objects' instance labels, as the Server Kit Mask
    layer its clients show (a Labels layer in napari), in the array's shape."""
    sk = import_serverkit()
    name = segmentation.model.name
    found = segmentation.objects
    if segmentation.params.labels and found is not None:
        labels = found.labels.reshape(tuple(shape))
        if max(found.counts, default=0) <= np.iinfo(np.uint16).max:
            labels = labels.astype(np.uint16)
        return sk.Mask(labels, name=f"{name} objects", merger="instances")
    return sk.Mask(segmentation.mask.reshape(tuple(shape)), name=f"{name} mask")


def segment_frames(segmentation: usecase.Segmentation, shape: Sequence[int]) -> bytes:
    """The answer Server Kit's clients read: one Mask layer, msgpack-framed."""
    sk = import_serverkit()
    import msgpack  # with the serverkit extra, like Server Kit itself
    from imaging_server_kit.remote.stack_serializer import StackSerializer

    stack = sk.Stack(layers=[mask_layer(segmentation, shape)])
    return b"".join(msgpack.packb(frame) for frame in StackSerializer.serialize(stack))


def process_router(settings: Settings) -> APIRouter:
    """``POST {prefix}/{model}/process``, Server Kit's run route, answered by the service: the
    same plan, limits, admission and errors as ``/segment`` (413/422 before anything is
    decoded, 503 + ``Retry-After`` when busy, the service's error body), decoding on a
    worker, never on the event loop."""
    router = APIRouter(tags=["serverkit"], dependencies=[ApiKeyDep])

    @router.post(f"{settings.serverkit_prefix}/{{name}}/process", include_in_schema=False)
    async def process(
        request: Request, model: NamedModelDep, registry: RegistryDep, runner: RunnerDep
    ) -> Response:
        """Segment a Server Kit image array with the model it names."""
        image, values = await run_in_threadpool(parse_process_body, await request.body())
        model = precision_variant(registry, model, values)
        plan, upload = await run_in_threadpool(plan_array, model, settings, image, values)
        shape = mask_shape(plan.image)
        async with watch_disconnect(request) as gone:
            frames = await runner.segment(
                plan, upload, lambda done: segment_frames(done, shape), cancel=gone
            )
        return Response(content=frames, media_type="application/msgpack")

    return router


def model_algorithm(
    model: SegmentationModel, settings: Settings, runner: Runner, registry: ModelRegistry
) -> Any:
    """One model as a Server Kit ``Algorithm``: its listing, parameter schema and widgets
    (served by Server Kit's app), and a ``run`` for in-process callers that takes the same
    path as :func:`process_router`'s HTTP route."""
    sk = import_serverkit()
    meta = model.meta
    parameters: dict[str, Any] = {
        "image": sk.Image(description="Grey or RGB image, 2-D or a Z/T stack (plane by plane)")
    }
    for name, knob in knobs(model, settings).items():
        parameters[name] = sk.Float(
            name=knob.label,
            description=knob.description,
            default=knob.default,
            min=knob.low,
            max=knob.high,
            step=knob.step,
        )
    if meta.instances is not None:
        parameters["output"] = sk.Choice(
            name="Output",
            description="labels: each object its own label (touching nuclei apart); mask: "
            "the foreground mask",
            items=list(OUTPUTS),
            default=OUTPUTS[0],
        )

    choice = registry.choice(model)
    parameters["precision"] = sk.Choice(
        name="Precision",
        description=f"auto: {choice.reason}",
        items=[AUTO, *(str(p) for p in registry.precisions(model))],
        default=AUTO,
    )

    def run(image: Any, **values: Any) -> Any:
        if not isinstance(image, np.ndarray):
            raise InvalidImageError(f"expected an image array, got {type(image).__name__}")
        variant = precision_variant(registry, model, values)
        plan, upload = plan_array(variant, settings, as_tiff(image), values)
        shape = mask_shape(plan.image)
        future = runner.submit_segmentation(plan, upload, lambda done: mask_layer(done, shape))
        return future.result()

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
            model_algorithm(model, self.settings, state.runner, registry)
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
    # The run route first: it answers before the mount, whose other routes are Server Kit's.
    app.include_router(process_router(settings))
    app.mount(prefix, ServerKitMount(app, settings))
    return True
