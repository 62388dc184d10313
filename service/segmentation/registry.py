"""Loading ONNX models from the model directory into ONNX Runtime sessions.

Layout: ``<model_dir>/<name>/<version>/model.onnx`` (also a Triton model repository); the highest
numeric version of each name is served. A version folder may hold precision variants of the same
network beside it (``model.int8.onnx``, ``model.fp16.onnx``: :mod:`service.inference.precision`);
``precision=auto`` runs the one measured to pay on this host. Each model's metadata comes from
its own file. The execution providers actually in use are read back from the session:
onnxruntime-gpu falls back to the CPU silently when CUDA is missing, and the service says so
loudly instead.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from service.core.config import CpuArena, Settings
from service.core.resources import (
    memory_budget_from,
    mib,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
)
from service.inference.modelmeta import ModelMetadata
from service.inference.precision import (
    AUTO,
    Choice,
    CpuFeatures,
    Precision,
    choose,
    preferred,
    variant_files,
)
from service.segmentation.errors import ModelUnavailableError

log = logging.getLogger(__name__)


class ModelDoesNotFitError(Exception):
    """Warming the model up would take the process past its memory budget."""


def _peak_growth(fn: Callable[[], object]) -> int:
    """How far above its resident memory before the call the process peaked during ``fn()``
    (0 where /proc cannot tell)."""
    before = rss_bytes()
    if before is None or not reset_peak_rss():
        fn()
        return 0
    fn()
    return max((peak_rss_bytes() or before) - before, 0)


_SHRINK_CPU_ARENA = ort.RunOptions()
_SHRINK_CPU_ARENA.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
        return trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _find_malloc_trim()


class SegmentationModel(Protocol):
    """What the routes and the pipeline need of a model, wherever it runs.

    :class:`LoadedModel` runs an ONNX Runtime session in this process; the Ray Serve ingress
    (``service.rayserve``) has the same interface over a model deployment. The tiler calls
    :meth:`predict` either way, so there is one pipeline, not one per backend.
    """

    @property
    def name(self) -> str:
        """The name the model is served under."""
        ...

    @property
    def meta(self) -> ModelMetadata:
        """Classes, tile size, normalisation, threshold: from the ONNX file."""
        ...

    @property
    def provider(self) -> str:
        """The execution provider really running the model."""
        ...

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        """Probabilities ``(N, t, t, K)`` for normalised tiles ``(N, t, t, C)``."""
        ...

    def release_memory(self) -> None:
        """Called once a request's tiles are all done (``SEG_CPU_MEMORY_ARENA=shrink``)."""
        ...

    @property
    def request_bytes(self) -> int:
        """Memory a request's tile batches take in this process beyond the idle process (the
        model's own buffers; 0 where the model runs elsewhere): counted by the admission."""
        ...

    def describe(self) -> dict[str, object]:
        """What ``GET /models`` reports."""
        ...


@dataclass
class LoadedModel:
    """One model ready to run: session, metadata and the names read from the graph."""

    name: str
    path: Path
    meta: ModelMetadata
    session: ort.InferenceSession
    input_name: str
    output_name: str
    providers: list[str]
    load_seconds: float
    shrink_after_request: bool = False
    # Memory a request's tile batches take beyond the idle process: ONNX Runtime's buffers for
    # one batch, measured at warm-up. 0 when the arena keeps them for good (SEG_CPU_MEMORY_ARENA
    # =on): they are then part of the idle process already.
    request_bytes: int = 0

    @property
    def provider(self) -> str:
        """The provider that runs the model's nodes first (the one that matters)."""
        return self.providers[0]

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        """Probabilities ``(N, t, t, K)`` for normalised tiles ``(N, t, t, C)``."""
        out = self.session.run([self.output_name], {self.input_name: tiles})[0]
        return np.asarray(out)

    def release_memory(self) -> None:
        """With ``shrink_after_request``: give ONNX Runtime's CPU arena back to the system.

        The arena keeps a request's buffers between its tile batches (no page faults per
        batch); this returns them once the request is over. ONNX Runtime shrinks an arena only
        at the end of a run, so this is a run on the smallest input the model takes.
        """
        if not self.shrink_after_request:
            return
        side = self.meta.tile_multiple
        probe = np.zeros((1, side, side, self.meta.channels), np.float32)
        self.session.run([self.output_name], {self.input_name: probe}, _SHRINK_CPU_ARENA)
        # What the arena and the request freed: glibc keeps freed heap (below its mmap
        # threshold) in its per-thread arenas unless asked to give it back.
        if _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)

    def describe(self) -> dict[str, object]:
        """What ``GET /models`` reports."""
        return _description(self)


def _description(model: LoadedModel | OnDemandModel) -> dict[str, object]:
    """What ``GET /models`` reports of a model file, loaded or not."""
    return {
        "name": model.name,
        "version": model.meta.version,
        "provider": model.provider,
        "providers": model.providers,
        "input": {"name": model.input_name, "layout": model.meta.input_layout},
        "output": {"name": model.output_name},
        "metadata": model.meta.model_dump(mode="json"),
    }


VersionKey = tuple[str, str]


def _version_key(model: SegmentationModel) -> VersionKey:
    return model.name, model.meta.version


@dataclass
class ModelRegistry:
    """Every model of the model directory, plus those that failed to load and why."""

    models: dict[str, SegmentationModel] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    ready: threading.Event = field(default_factory=threading.Event)
    # Earlier versions, pinned by requests as ``name@version`` (``models`` has the newest).
    earlier: dict[str, SegmentationModel] = field(default_factory=dict)
    # By (name, version): every precision loaded (fp32 is the model above), and what
    # ``precision=auto`` runs on this host.
    variants: dict[VersionKey, dict[Precision, SegmentationModel]] = field(default_factory=dict)
    auto: dict[VersionKey, Choice] = field(default_factory=dict)
    # Told how much more the process holds each time a file loads on demand (the memory
    # budget's baseline grows by it: service.main).
    on_demand_growth: Callable[[int], None] | None = None

    def grew(self, nbytes: int) -> None:
        """A file loaded on demand left the process ``nbytes`` larger."""
        if self.on_demand_growth is not None:
            self.on_demand_growth(nbytes)

    def add(
        self,
        key: str,
        variants: dict[Precision, SegmentationModel],
        auto: Choice,
        newest: bool = True,
    ) -> None:
        """Register a version (``key``: its name, or ``name@version`` for an earlier one) with
        its loaded precisions (fp32 among them) and the one ``auto`` picks."""
        fp32 = variants[Precision.FP32]
        (self.models if newest else self.earlier)[key] = fp32
        self.variants[_version_key(fp32)] = variants
        self.auto[_version_key(fp32)] = auto

    def get(self, name: str) -> SegmentationModel | None:
        """The model called ``name`` (its newest version), or ``name@version`` pinned, if it
        loaded: its fp32 file (:meth:`variant` gives the others)."""
        base, _, version = name.partition("@")
        model = self.models.get(base)
        if not version:
            return model
        if name in self.earlier:
            return self.earlier[name]
        return model if model is not None and model.meta.version == version else None

    def precisions(self, model: SegmentationModel) -> dict[Precision, SegmentationModel]:
        """The loaded precisions of ``model``'s version (fp32 alone when it has no variants)."""
        return self.variants.get(_version_key(model), {Precision.FP32: model})

    def choice(self, model: SegmentationModel) -> Choice:
        """What ``precision=auto`` runs of ``model``'s version, and why."""
        only = Choice(Precision.FP32, "fp32: the only precision of this version")
        return self.auto.get(_version_key(model), only)

    def variant(self, model: SegmentationModel, precision: str) -> SegmentationModel | None:
        """``model``'s version in ``precision`` (``auto``: the host's choice), if loaded."""
        wanted = self.choice(model).precision if precision == AUTO else Precision(precision)
        return self.precisions(model).get(wanted)

    def versions(self, name: str) -> list[str]:
        """The loaded versions of model ``name``, oldest first."""
        found = [m.meta.version for key, m in self.earlier.items() if key.split("@")[0] == name]
        if name in self.models:
            found.append(self.models[name].meta.version)
        return sorted(found, key=lambda v: int(v) if v.isdigit() else 0)


def choose_variant(
    variants: Mapping[Precision, SegmentationModel], cpu: CpuFeatures | None = None
) -> Choice:
    """:func:`~service.inference.precision.choose` over loaded variants, for the provider
    that really runs the fp32 one."""
    return choose(
        {p: m.meta.metrics for p, m in variants.items()},
        variants[Precision.FP32].provider,
        cpu or CpuFeatures.read(),
    )


def load_choice_now(
    variants: dict[Precision, SegmentationModel],
    cpu: CpuFeatures,
    load_now: Callable[[OnDemandModel], SegmentationModel | None],
) -> Choice:
    """``precision=auto``'s choice among a version's ``variants``, with the file it runs loaded
    now (by ``load_now``; None: it failed, and was logged) if it was waiting for a first request:
    what auto runs is never loaded by a request. A file that fails is dropped from ``variants``
    (changed in place) and auto chooses again among the others, fp32 at worst."""
    auto = choose_variant(variants, cpu)
    runs = variants[auto.precision]
    if not isinstance(runs, OnDemandModel):
        return auto
    loaded = load_now(runs)
    if loaded is None:
        del variants[auto.precision]
        return choose_variant(variants, cpu)
    variants[auto.precision] = loaded
    return auto


def find_model_versions(model_dir: Path) -> dict[str, dict[int, Path]]:
    """Every ``<name>/<version>/model.onnx`` per model name, by version number."""
    found: dict[str, dict[int, Path]] = {}
    # Dot-folders are not models (segtrain release stages a new model in one until it is whole).
    for name_dir in sorted(p for p in model_dir.iterdir() if p.is_dir() and p.name[0] != "."):
        versions = [v for v in name_dir.iterdir() if v.is_dir() and v.name.isdigit()]
        if versions:
            found[name_dir.name] = {int(v.name): v / "model.onnx" for v in sorted(versions)}
    return found


def find_model_files(model_dir: Path) -> dict[str, Path]:
    """Newest ``<name>/<version>/model.onnx`` per model name (versions compared as numbers)."""
    return {name: v[max(v)] for name, v in find_model_versions(model_dir).items()}


def resolve_providers(requested: list[str]) -> list[str]:
    """Requested providers that this ONNX Runtime build offers, in order; CPU always last."""
    available = ort.get_available_providers()
    usable = [p for p in requested if p in available]
    missing = [p for p in requested if p not in available]
    if "CPUExecutionProvider" not in usable:
        usable.append("CPUExecutionProvider")
    if missing:
        log.warning(
            "execution provider(s) %s requested but not in this onnxruntime build (available: "
            "%s): models will run on %s. For CUDA install the `gpu` extra (onnxruntime-gpu) "
            "instead of `cpu`, never both.",
            missing,
            available,
            usable[0],
        )
    return usable


def _checked_metadata(
    name: str, path: Path, session: ort.InferenceSession
) -> tuple[ModelMetadata, str, str]:
    """The file's metadata and its input and output names, once the file is found to be what
    its name and folder say (one input, one output, the precision its file name names)."""
    meta = ModelMetadata.from_props(dict(session.get_modelmeta().custom_metadata_map))
    if path.name != meta.precision.file_name and path.name.startswith("model."):
        raise ValueError(
            f"{path.name} holds a {meta.precision} model; its file name must be "
            f"{meta.precision.file_name}"
        )
    if meta.name != name:
        log.warning(
            "model folder %r holds a model named %r; serving it as %r", name, meta.name, name
        )
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(f"expected one input and one output, got {len(inputs)} and {len(outputs)}")
    return meta, inputs[0].name, outputs[0].name


def read_metadata(name: str, path: Path) -> tuple[ModelMetadata, str, str]:
    """:func:`_checked_metadata` without a session to run: the graph is parsed but not
    optimised, no arena is kept and nothing runs (~30 ms and no lasting memory for a bundled
    U-Net, against ~1 s and ~60 MiB for :func:`load_model`)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path.name} is missing in {path.parent.name}/")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.enable_cpu_mem_arena = False
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return _checked_metadata(name, path, session)


@dataclass
class OnDemandModel:
    """A model file loaded by the first request that asks for it (an earlier version pinned as
    ``model=NAME@N``, or a precision ``auto`` does not run here): its metadata is read at
    start, for ``/models`` and ``precision=auto``; the session and its memory come only if
    somebody asks for it. Same interface as :class:`LoadedModel`.

    A load that would not fit the memory budget answers that request 503 (busy: try later); a
    file that cannot load answers 503 naming why, that request and every later one.
    """

    name: str
    key: str  # name@version, and the precision when not fp32: for messages
    path: Path
    meta: ModelMetadata
    input_name: str
    output_name: str
    providers: list[str]  # the ones it will be asked to run on
    load: Callable[[], LoadedModel]
    estimate: int  # request_bytes until it is loaded: the newest version's, same precision
    _model: LoadedModel | None = None
    _failure: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def read(
        cls,
        name: str,
        key: str,
        path: Path,
        providers: list[str],
        load: Callable[[], LoadedModel],
        estimate: int,
    ) -> OnDemandModel:
        """The file's metadata read now (:func:`read_metadata`), its session made by ``load``
        when a request first asks."""
        meta, input_name, output_name = read_metadata(name, path)
        return cls(name, key, path, meta, input_name, output_name, providers, load, estimate)

    @property
    def provider(self) -> str:
        return self._model.provider if self._model else self.providers[0]

    @property
    def request_bytes(self) -> int:
        return self._model.request_bytes if self._model else self.estimate

    @property
    def loaded(self) -> bool:
        """Whether a request has loaded it yet."""
        return self._model is not None

    def session_model(self) -> LoadedModel:
        """The loaded model, loading it first if no request has (one load, whoever waits)."""
        with self._lock:
            if self._model is not None:
                return self._model
            if self._failure is not None:
                raise ModelUnavailableError(self._failure, busy=False, lasting=True)
            try:
                self._model = self.load()
            except ModelDoesNotFitError as exc:
                raise ModelUnavailableError(
                    f"model {self.key} is loaded on its first request, and {exc}", busy=True
                ) from exc
            except Exception as exc:  # the file was readable at start but does not load
                log.error("model %s could not be loaded from %s: %s", self.key, self.path, exc)
                self._failure = f"model {self.key} could not be loaded: {type(exc).__name__}"
                raise ModelUnavailableError(self._failure, busy=False, lasting=True) from exc
            log.info("model %s loaded on its first request", self.key)
            return self._model

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        """Probabilities ``(N, t, t, K)`` for normalised tiles ``(N, t, t, C)``."""
        return self.session_model().predict(tiles)

    def release_memory(self) -> None:
        if self._model is not None:
            self._model.release_memory()

    def describe(self) -> dict[str, object]:
        """What ``GET /models`` reports."""
        return _description(self._model or self)


def load_model(
    name: str,
    path: Path,
    providers: list[str],
    intra_op_threads: int,
    warmup_batch: int,
    cpu_arena: CpuArena = "on",
    memory_budget: int | None = None,
    spinning: bool = True,
) -> LoadedModel:
    """Create the session, parse the metadata, check the graph's shapes and warm it up.

    With a ``memory_budget``, a run on one tile first tells what the warm-up at
    ``warmup_batch`` tiles will take (the buffers grow with the batch); a model that would not
    fit raises :class:`ModelDoesNotFitError` instead of getting the process killed.
    """
    start = time.perf_counter()
    if not path.is_file():
        raise FileNotFoundError(f"{path.name} is missing in {path.parent.name}/")
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    # Idle intra-op threads spin (ORT's default) or sleep: on shared cores the spinning takes
    # CPU from whatever else runs there (docs/deployment.md, SEG_ORT_SPINNING).
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = cpu_arena != "off"
    # ONNX Runtime's memory pattern plans one block per input shape from the first run and
    # allocates it on the second, beside the first run's chunks still in the CPU arena: a
    # bundled U-Net then holds ~390 MiB per 8-tile batch instead of ~230, at the same speed
    # (docs/memory.md). On the CPU it does not pay; on CUDA it is the GPU's memory, kept.
    options.enable_mem_pattern = providers[0] != "CPUExecutionProvider"
    session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    meta, input_name, output_name = _checked_metadata(name, path, session)
    used = session.get_providers()
    wanted = providers[0]
    if used[0] != wanted:
        log.warning(
            "model %s: wanted %s but ONNX Runtime runs it on %s. On a GPU host check the NVIDIA "
            "driver, the container toolkit, and that onnxruntime-gpu (not onnxruntime) is "
            "installed.",
            name,
            wanted,
            used[0],
        )
    model = LoadedModel(
        name=name,
        path=path,
        meta=meta,
        session=session,
        input_name=input_name,
        output_name=output_name,
        providers=used,
        load_seconds=0.0,
        shrink_after_request=cpu_arena == "shrink",
    )
    # Warm-up at the serving shape: the first run allocates buffers (and on CUDA searches the
    # cuDNN algorithms), and it proves that the output has the shape the metadata promises.
    t = meta.tile_size
    probe = np.zeros((warmup_batch, t, t, meta.channels), np.float32)
    if memory_budget is not None:
        need = _peak_growth(lambda: model.predict(probe[:1])) * warmup_batch
        model.release_memory()
        held = rss_bytes() or 0
        if held + need > memory_budget:
            raise ModelDoesNotFitError(
                f"warming it up at tile batch {warmup_batch} needs about {mib(need)} more, and "
                f"the process already holds {mib(held)} of its {mib(memory_budget)} memory "
                "budget; raise the memory limit, lower SEG_TILE_BATCH_SIZE, or remove models"
            )
    # Twice: the second run at a shape is the one that shows what every later batch holds.
    warm: list[np.ndarray] = []
    batch_bytes = _peak_growth(lambda: warm.extend(model.predict(probe) for _ in range(2)))
    # With the arena on, these buffers stay: they are part of the idle process from now on.
    model.request_bytes = 0 if cpu_arena == "on" else batch_bytes
    out = warm[0]
    expected = (warmup_batch, t, t, meta.output_channels)
    if out.shape != expected:
        raise ValueError(f"model output has shape {out.shape}, metadata implies {expected}")
    model.release_memory()  # the warm-up's buffers too
    model.load_seconds = time.perf_counter() - start
    log.info(
        "model %s v%s loaded from %s on %s in %.2f s (tile %d, %d class(es), %s); a tile "
        "batch of %d takes %s",
        name,
        meta.version,
        path,
        used[0],
        model.load_seconds,
        t,
        meta.num_classes,
        meta.task,
        warmup_batch,
        mib(batch_bytes),
    )
    return model


def session_loader(
    settings: Settings, providers: list[str], memory_budget: int | None = None
) -> Callable[[str, Path], LoadedModel]:
    """:func:`load_model` with the session settings (threads, warm-up batch, CPU arena,
    spinning) of ``settings``, for a model name and file: the standalone service's and a Ray
    model replica's loads alike."""

    def load(name: str, path: Path) -> LoadedModel:
        return load_model(
            name,
            path,
            providers,
            settings.intra_op_threads,
            settings.tile_batch_size,
            settings.cpu_memory_arena,
            memory_budget,
            spinning=settings.ort_spinning,
        )

    return load


def load_local_models(registry: ModelRegistry, settings: Settings) -> None:
    """The standalone service's loader: every version of every model of ``SEG_MODEL_DIR``, each
    with its precision variants (the newest serves ``model=NAME``, the others
    ``model=NAME@VERSION``). ``SEG_MODEL_VERSIONS``: ``all`` loads each model's newest version
    now in fp32 and in the precision ``auto`` runs here, and every other file on the first
    request that asks for it (:class:`OnDemandModel`: earlier versions, fp16 on a CPU);
    ``all-at-start`` loads every one now; ``newest`` serves the newest alone, in fp32 and the
    variant this hardware would run. A broken file (or one over the memory budget) is logged at
    ERROR and recorded, and the others still serve; a broken variant leaves its version serving
    the precisions that loaded. A file loaded on demand grows the memory budget's baseline by
    what it left the process holding (:attr:`ModelRegistry.on_demand_growth`)."""
    model_dir = settings.model_dir
    usable = resolve_providers(settings.providers)
    memory_budget = memory_budget_from(settings)[0]
    cpu = CpuFeatures.read()
    log.info(
        "CPU: %s; 8-bit dot products: %s",
        cpu.model,
        ", ".join(cpu.int8_dot) or "none (INT8 variants are not chosen by precision=auto)",
    )

    load_now = session_loader(settings, usable, memory_budget)

    def load_later(name: str, path: Path) -> LoadedModel:
        """:func:`load_now` for a request that asks for a file not loaded yet; the process
        holds its session from now on, and the memory budget leaves that much less for
        requests."""
        before = rss_bytes() or 0
        model = load_now(name, path)
        registry.grew((rss_bytes() or 0) - before)
        return model

    def open_file(
        name: str, key: str, path: Path, estimate: int | None
    ) -> SegmentationModel | None:
        """The file loaded now (``estimate`` None), or read to be loaded on demand."""
        try:
            if estimate is None:
                return load_now(name, path)
            load = partial(load_later, name, path)
            return OnDemandModel.read(name, key, path, usable, load, estimate)
        except Exception as exc:  # one bad file must not take the other models down
            reason = f"{type(exc).__name__}: {exc}"
            log.error("model %s could not be loaded from %s: %s", key, path, reason)
            # /readyz and /models show the reason to anyone: no server paths in it.
            registry.failed[key] = reason.replace(str(model_dir), "<model_dir>")
            return None

    every = settings.model_versions != "all"  # every file served is loaded at start
    for name, versions in find_model_versions(model_dir).items():
        newest = max(versions)
        loaded = sorted(versions, reverse=True)  # the newest first: it matters most
        if settings.model_versions == "newest":
            loaded = loaded[:1]
        # What a request's batches take with the newest version, per precision: the estimate
        # for an earlier version's until a request loads it (the same network family).
        batch_bytes: dict[Precision, int] = {}
        for version in loaded:
            key = name if version == newest else f"{name}@{version}"
            files = variant_files(versions[version].parent)
            fp32 = open_file(
                name,
                key,
                files.pop(Precision.FP32),
                None if version == newest or every else batch_bytes.get(Precision.FP32, 0),
            )
            if fp32 is None:
                continue
            if version == newest:
                batch_bytes[Precision.FP32] = fp32.request_bytes
            variants: dict[Precision, SegmentationModel] = {Precision.FP32: fp32}
            for precision, path in files.items():
                # Small containers: the variant this hardware would run, not every one.
                if settings.model_versions == "newest" and precision is not preferred(
                    fp32.provider, cpu
                ):
                    continue
                estimate = batch_bytes.get(precision, batch_bytes.get(Precision.FP32, 0))
                label = f"{key} ({precision})"
                variant = open_file(name, label, path, None if every else estimate)
                if variant is not None:
                    variants[precision] = variant
            if version == newest:
                load = lambda m: open_file(m.name, m.key, m.path, None)  # noqa: E731
                auto = load_choice_now(variants, cpu, load)
                batch_bytes[auto.precision] = variants[auto.precision].request_bytes
            else:
                auto = choose_variant(variants, cpu)
            registry.add(key, variants, auto, newest=version == newest)
            waiting = [str(p) for p, m in variants.items() if isinstance(m, OnDemandModel)]
            log.info(
                "model %s v%s: precisions %s (%s on the first request that asks); "
                "precision=auto runs %s",
                name,
                fp32.meta.version,
                "/".join(variants),
                "/".join(waiting) or "none",
                auto.reason,
            )
    if not registry.models and not registry.failed:
        registry.failed["*"] = "no <name>/<version>/model.onnx found in the model directory"
        log.error("no models found in %s", model_dir)
    registry.ready.set()
