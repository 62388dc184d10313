"""Training: the fit loop with its callbacks, and the run folder (the config: training.config)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import keras

from service.inference.modelmeta import Task
from training.architectures import build_model, inference_model, options_for
from training.config import TrainConfig
from training.data import training_scale
from training.dataset import load_frames, train_dataset, val_dataset
from training.losses import bce_dice_loss, cce_dice_loss, segmentation_metrics

log = logging.getLogger(__name__)


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


def start_from(model: keras.Model, path: Path) -> None:
    """Give ``model`` the weights of the ``.keras`` file at ``path``: the same network, array for
    array (a released version's export head has no weights of its own)."""
    import training.export  # noqa: F401  (registers the export head's layer, to load a release)

    source = keras.models.load_model(path, compile=False)
    want = [tuple(w.shape) for w in model.weights]
    have = [tuple(w.shape) for w in source.weights]
    if want != have:
        raise ValueError(
            f"{path}: its weights do not fit this network: expected {len(want)} arrays "
            f"({model.count_params():,} parameters), got {len(have)} "
            f"({source.count_params():,} parameters)"
        )
    model.set_weights(source.get_weights())
    log.info("weights from %s (%d arrays)", path, len(want))


def train(config: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """Train on the config's train split, validate on its val split; write the run folder.

    ``run_dir`` receives ``config.json``, ``best.keras`` (best validation IoU), ``history.csv``
    and ``train_summary.json`` (wall time, epochs). Returns the summary.
    """
    keras.utils.set_random_seed(config.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir / "config.json")
    splits = config.splits()
    for name, items in splits.items():
        log.info("%s: %s", name, [p.stem for p in items])
    kwargs: dict[str, Any] = {
        "label_values": config.label_values,
        "boundary_width": config.boundary_width,
        "contact_width": config.contact_width,
        "keep_cores": config.keep_cores,
    }
    train_frames = load_frames(
        splits["train"],
        config.normalization,
        config.mask_mode,
        percentile_jitter=config.augmentation.percentile_jitter,
        **kwargs,
    )
    val_frames = load_frames(splits["val"], config.normalization, config.mask_mode, **kwargs)
    k = len(config.classes)
    channels = train_frames[0].image.shape[2]
    train_ds = train_dataset(
        train_frames,
        config.tile_size,
        config.batch_size,
        k,
        config.seed,
        fg_bias=config.fg_bias,
        augmentation=config.augmentation,
        source_weights={Path(k).name: v for k, v in config.source_weights.items()},
    )
    val_ds = val_dataset(val_frames, config.tile_size, config.batch_size, k)

    model = build_model(
        config.arch,
        channels,
        1 if k == 2 else k,
        name=config.name.replace("-", "_"),
        **options_for(config.arch, config.options),
    )
    if config.init_weights:
        start_from(model, Path(config.init_weights))
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
        # A progress bar per epoch on a terminal; one line per epoch in a log file.
        verbose=1 if sys.stdout.isatty() else 2,
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
        "splits": {name: [p.key for p in items] for name, items in splits.items()},
        "channels": int(channels),
        "object_diameter": training_scale(splits["train"]),
    }
    (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    log.info("training took %.1f s over %d epochs", wall, summary["epochs_run"])
    return summary


def load_trained(run_dir: Path) -> keras.Model:
    """The best checkpoint of a run, fused output only (custom losses and metrics are
    registered on import)."""
    return inference_model(keras.models.load_model(run_dir / "best.keras"))
