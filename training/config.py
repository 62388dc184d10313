"""A training run's configuration, importable without Keras or TensorFlow.

``segtrain --help``, the presets and anything that only reads or lists configs stay light; the
network builders (Keras) are imported only where a model is built or described.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from service.inference.modelmeta import Normalization, Task
from training.data import MaskMode, Pair, pair_files, split_random, split_sequence

# The networks of ``--arch``, named without importing Keras; training.architectures.ARCHITECTURES
# maps each to its builder (tests/test_architectures.py checks that the two agree).
ARCHITECTURE_NAMES = ("unet", "encoder-decoder", "residual-unet", "fcn8s", "u2net")


@dataclass(frozen=True)
class ArchOptions:
    """Network options a config may set; each builder takes those it has a parameter for
    (e.g. fcn8s has VGG-16's fixed depth, so ``depth`` means nothing to it)."""

    depth: int = 4
    base_filters: int = 16
    max_filters: int = 128
    dropout: float = 0.0
    batchnorm: bool = True
    neighbour_residuals: bool = False
    deep_supervision: bool = True


_OPTION_FIELDS = tuple(f.name for f in fields(ArchOptions))


@dataclass(frozen=True)
class Augmentation:
    """What ``training.dataset`` varies in each training patch beyond the flips, 90-degree
    rotations, gain, offset and gamma that every model gets.

    The defaults add nothing (a lab's own folder, imaged at one scale on one microscope); the
    generalist ``nuclei`` preset turns everything on, so that it meets other microscopes, stains
    and nucleus sizes than those it learned from.
    """

    scale_min: float = 1.0  # patches are zoomed by a factor drawn log-uniformly in this range
    scale_max: float = 1.0
    percentile_jitter: bool = False  # normalise with percentiles drawn around the model's own
    contrast: float = 0.0  # contrast factor drawn in [1 - contrast, 1 + contrast]
    blur_max_sigma: float = 0.0  # Gaussian blur, sigma drawn in [0.3, this] px
    noise_max_sigma: float = 0.0  # additive Gaussian noise, sigma drawn in [0, this]
    poisson: bool = False  # shot noise at a peak of 10-300 photons per normalised unit
    probability: float = 0.3  # chance of each of blur, Gaussian noise and shot noise

    def __post_init__(self) -> None:
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError(
                f"scale range must satisfy 0 < min <= max, got {self.scale_min}..{self.scale_max}"
            )

    @property
    def rescales(self) -> bool:
        """Whether patches are zoomed (cut at a size other than the tile, then resized)."""
        return self.scale_min != 1.0 or self.scale_max != 1.0


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved as ``config.json`` in the run folder."""

    name: str
    data_dir: str
    mask_mode: str = MaskMode.BINARY.value
    classes: list[str] = field(default_factory=lambda: ["background", "nucleus"])
    label_values: list[int] | None = None
    boundary_width: int = 2
    # 3class: the boundary band's width where another nucleus (not background) is in reach
    # (0: ``boundary_width`` everywhere); see ``instances_to_three_class``.
    contact_width: int = 0
    # 3class: a nucleus the bands leave without interior gets its innermost pixels as interior.
    keep_cores: bool = False
    description: str = ""
    training_data: str = ""
    tile_size: int = 256
    # Network: a name of ARCHITECTURE_NAMES, and the options its builder takes from ``options``.
    arch: str = "unet"
    options: ArchOptions = field(default_factory=ArchOptions)
    batch_size: int = 8
    epochs: int = 40
    steps_per_epoch: int = 25
    learning_rate: float = 2e-3
    patience: int = 8
    fg_bias: float = 0.3
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    norm_low: float = 1.0
    norm_high: float = 99.8
    max_minutes: float = 25.0
    seed: int = 0
    # "sequence": contiguous blocks of a movie's frames (the presets); "random": a seeded draw
    # of independent images (a lab's own folder).
    split: str = "sequence"
    # Several labelled folders trained as one model, each split on its own by ``split`` (empty:
    # ``data_dir`` alone); training patches are drawn from each source equally often.
    sources: list[str] = field(default_factory=list)
    # A split kind per source folder where it differs from ``split`` (a movie beside a folder
    # of independent images).
    source_splits: dict[str, str] = field(default_factory=dict)
    # How often each source folder's patches are drawn, relative to the others (default 1).
    source_weights: dict[str, float] = field(default_factory=dict)
    # Folders never trained on, only evaluated: whole sources kept out as a cross-source test.
    held_out: list[str] = field(default_factory=list)
    augmentation: Augmentation = field(default_factory=Augmentation)
    # A 3-class (background / interior / boundary) network exported as a binary model with
    # instances: the export's head turns the softmax into [1 - p_background, p_interior], the
    # metadata says classes background/nucleus and seeds a watershed from the second channel.
    binary_instances: bool = False
    # Instances smaller than this fraction of a disc of the training scale's diameter are specks.
    speck_fraction: float = 0.1
    # A ``.keras`` file of the same network whose weights start the run (fine-tuning), e.g. a
    # released version's ``keras/model.keras``; empty: random initialisation.
    init_weights: str = ""

    @property
    def normalization(self) -> Normalization:
        """Whole-image percentile normalisation, as the service applies it."""
        return Normalization(method="percentile", low=self.norm_low, high=self.norm_high)

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURE_NAMES:
            raise ValueError(
                f"unknown architecture {self.arch!r}; choose from {ARCHITECTURE_NAMES}"
            )
        if isinstance(self.options, dict):  # as read back from config.json
            self.options = ArchOptions(**self.options)
        if isinstance(self.augmentation, dict):
            self.augmentation = Augmentation(**self.augmentation)

    @property
    def task(self) -> Task:
        """Binary for two classes, multiclass otherwise."""
        return Task.BINARY if len(self.classes) == 2 else Task.MULTICLASS

    @property
    def source_dirs(self) -> list[str]:
        """The folders trained on: ``sources``, else ``data_dir``."""
        return list(self.sources) or [self.data_dir]

    def _pairs(self, folder: str) -> list[Pair]:
        """The pairs of one folder, tagged with the folder's name when there are several."""
        root = Path(folder)
        pairs = pair_files(root / "images", root / "masks")
        if len(self.source_dirs) + len(self.held_out) > 1:
            pairs = [replace(p, source=root.name) for p in pairs]
        return pairs

    def splits(self) -> dict[str, list[Pair]]:
        """Image-level train/val/test split of the pairs of each source (see ``split``),
        concatenated: every source is represented in each split."""
        out: dict[str, list[Pair]] = {"train": [], "val": [], "test": []}
        for folder in self.source_dirs:
            pairs = self._pairs(folder)
            if self.source_splits.get(folder, self.split) == "random":
                parts = split_random(pairs, self.val_fraction, self.test_fraction, self.seed)
            else:
                parts = split_sequence(pairs, self.val_fraction, self.test_fraction)
            for name, items in parts.items():
                out[name] += items
        return out

    def held_out_pairs(self) -> list[Pair]:
        """Every pair of the ``held_out`` folders: never trained on, evaluated whole."""
        return [p for folder in self.held_out for p in self._pairs(folder)]

    def save(self, path: Path) -> None:
        """Write the config as a run's ``config.json``."""
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        """Read a run's ``config.json`` (also one written before ``options`` was nested)."""
        fields = json.loads(path.read_text())
        flat = {k: fields.pop(k) for k in _OPTION_FIELDS if k in fields}
        if flat:
            fields["options"] = {**fields.get("options", {}), **flat}
        return cls(**fields)
