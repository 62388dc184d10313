"""Training: a config, the data splits, the fit loop with its callbacks, and the run folder."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras

from service.inference.modelmeta import ModelMetadata, Normalization, Task
from training.architectures import ARCHITECTURES, ArchOptions, build_model, inference_model
from training.data import MaskMode, Pair, pair_files, split_sequence
from training.dataset import load_frames, train_dataset, val_dataset
from training.losses import bce_dice_loss, cce_dice_loss, segmentation_metrics

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved as ``config.json`` in the run folder."""

    name: str
    data_dir: str
    mask_mode: str = MaskMode.BINARY.value
    classes: list[str] = field(default_factory=lambda: ["background", "nucleus"])
    label_values: list[int] | None = None
    boundary_width: int = 2
    description: str = ""
    training_data: str = ""
    tile_size: int = 256
    # Network: a key of training.architectures.ARCHITECTURES; the fields below it are read by
    # the architectures they mean something to (e.g. fcn8s has VGG-16's fixed depth).
    arch: str = "unet"
    depth: int = 4
    base_filters: int = 16
    max_filters: int = 128
    dropout: float = 0.0
    batchnorm: bool = True
    neighbour_residuals: bool = False
    deep_supervision: bool = True
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

    @property
    def normalization(self) -> Normalization:
        """Whole-image percentile normalisation, as the service applies it."""
        return Normalization(method="percentile", low=self.norm_low, high=self.norm_high)

    @property
    def options(self) -> ArchOptions:
        """The network options of this config."""
        return ArchOptions(
            depth=self.depth,
            base_filters=self.base_filters,
            max_filters=self.max_filters,
            dropout=self.dropout,
            batchnorm=self.batchnorm,
            neighbour_residuals=self.neighbour_residuals,
            deep_supervision=self.deep_supervision,
        )

    @property
    def task(self) -> Task:
        """Binary for two classes, multiclass otherwise."""
        return Task.BINARY if len(self.classes) == 2 else Task.MULTICLASS

    def splits(self) -> dict[str, list[Pair]]:
        """Frame-level train/val/test split of the pairs in ``data_dir``."""
        root = Path(self.data_dir)
        pairs = pair_files(root / "images", root / "masks")
        return split_sequence(pairs, self.val_fraction, self.test_fraction)

    def metadata(self, channels: int, **overrides: Any) -> ModelMetadata:
        """The model metadata this config implies (metrics and commit filled in at export)."""
        fields: dict[str, Any] = {
            "name": self.name,
            "task": self.task,
            "classes": self.classes,
            "tile_size": self.tile_size,
            "tile_multiple": ARCHITECTURES[self.arch].tile_multiple(self.options),
            "channels": channels,
            "normalization": self.normalization,
            "label_values": self.label_values,
            "architecture": ARCHITECTURES[self.arch].describe(self.options),
            "description": self.description,
            "training_data": self.training_data,
        }
        fields.update(overrides)
        return ModelMetadata(**fields)

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        """Read a run's ``config.json``."""
        return cls(**json.loads(path.read_text()))


class TimeBudget(keras.callbacks.Callback):
    """Stop before an epoch that would overrun ``max_minutes`` (guards the 30-minute budget)."""

    def __init__(self, max_minutes: float) -> None:
        super().__init__()
        self.limit = max_minutes * 60.0
        self.start = time.perf_counter()
        self.stopped = False

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        """Estimate the next epoch from the mean so far; stop if it would not fit."""
        elapsed = time.perf_counter() - self.start
        if elapsed + elapsed / (epoch + 1) > self.limit:
            log.warning("time budget %.1f min reached after epoch %d", self.limit / 60, epoch + 1)
            self.stopped = True
            assert self.model is not None
            self.model.stop_training = True


def compile_model(model: keras.Model, config: TrainConfig) -> None:
    """Adam, the task's cross-entropy + Dice loss and confusion-matrix metrics."""
    loss = bce_dice_loss if config.task is Task.BINARY else cce_dice_loss
    n = len(model.outputs)
    # Metrics on the first (fused) output only: the side outputs are a training aid.
    metrics: Any = segmentation_metrics(config.classes)
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss=loss if n == 1 else [loss] * n,
        metrics=metrics if n == 1 else [metrics] + [[] for _ in range(n - 1)],
    )


def train(config: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """Train on the config's train split, validate on its val split; write the run folder.

    ``run_dir`` receives ``config.json``, ``best.keras`` (best validation IoU), ``history.csv``
    and ``train_summary.json`` (wall time, epochs). Returns the summary.
    """
    keras.utils.set_random_seed(config.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    splits = config.splits()
    for name, items in splits.items():
        log.info("%s: %s", name, [p.stem for p in items])
    kwargs: dict[str, Any] = {
        "label_values": config.label_values,
        "boundary_width": config.boundary_width,
    }
    train_frames = load_frames(splits["train"], config.normalization, config.mask_mode, **kwargs)
    val_frames = load_frames(splits["val"], config.normalization, config.mask_mode, **kwargs)
    k = len(config.classes)
    channels = train_frames[0].image.shape[2]
    train_ds = train_dataset(
        train_frames, config.tile_size, config.batch_size, k, config.seed, fg_bias=config.fg_bias
    )
    val_ds = val_dataset(val_frames, config.tile_size, config.batch_size, k)

    model = build_model(
        config.arch,
        channels,
        1 if k == 2 else k,
        config.options,
        name=config.name.replace("-", "_"),
    )
    compile_model(model, config)
    outputs = len(model.outputs)
    if outputs > 1:
        # Deep supervision: every side output is trained against the same mask.
        train_ds = train_ds.map(lambda x, y: (x, (y,) * outputs))
        val_ds = val_ds.map(lambda x, y: (x, (y,) * outputs))
    # Keras prefixes metric names with the output's name when there are several outputs.
    monitor = "val_iou" if outputs == 1 else "val_probabilities_iou"
    budget = TimeBudget(config.max_minutes)
    callbacks = [
        keras.callbacks.ModelCheckpoint(
            str(run_dir / "best.keras"), monitor=monitor, mode="max", save_best_only=True
        ),
        keras.callbacks.EarlyStopping(
            monitor=monitor, mode="max", patience=config.patience, restore_best_weights=True
        ),
        keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=0.5, patience=max(2, config.patience // 3), min_lr=1e-5
        ),
        keras.callbacks.CSVLogger(str(run_dir / "history.csv")),
        budget,
    ]
    start = time.perf_counter()
    history = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=config.epochs,
        steps_per_epoch=config.steps_per_epoch,
        callbacks=callbacks,
        verbose=2,
    )
    wall = time.perf_counter() - start
    val_iou = history.history.get(monitor, [0.0])
    summary = {
        "wall_time_s": round(wall, 1),
        "epochs_run": len(history.history["loss"]),
        "best_epoch": int(max(range(len(val_iou)), key=val_iou.__getitem__)) + 1,
        "best_val_iou": float(max(val_iou)),
        "stopped_by_time_budget": budget.stopped,
        "params": int(inference_model(model).count_params()),
        "splits": {name: [p.stem for p in items] for name, items in splits.items()},
        "channels": int(channels),
    }
    (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    log.info("training took %.1f s over %d epochs", wall, summary["epochs_run"])
    return summary


def load_trained(run_dir: Path) -> keras.Model:
    """The best checkpoint of a run, fused output only (custom losses and metrics are
    registered on import)."""
    return inference_model(keras.models.load_model(run_dir / "best.keras"))
