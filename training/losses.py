"""Losses (cross-entropy + soft Dice) and a confusion-count Dice metric."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops


def soft_dice_loss(y_true: Any, y_pred: Any, smooth: float = 1.0) -> Any:
    """1 - soft Dice per output channel, pooled over the batch, averaged over channels.

    Pooling over the batch (not per image) keeps patches without foreground from producing a
    noisy 0/0 Dice.
    """
    axes = (0, 1, 2)
    inter = ops.sum(y_true * y_pred, axis=axes)
    total = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    return 1.0 - ops.mean((2.0 * inter + smooth) / (total + smooth))


@keras.saving.register_keras_serializable(package="training")
def bce_dice_loss(y_true: Any, y_pred: Any) -> Any:
    """Binary cross-entropy + soft Dice: BCE gives smooth per-pixel gradients, Dice counters the
    background majority."""
    bce = ops.mean(keras.losses.binary_crossentropy(y_true, y_pred))
    return bce + soft_dice_loss(y_true, y_pred)


@keras.saving.register_keras_serializable(package="training")
def cce_dice_loss(y_true: Any, y_pred: Any) -> Any:
    """Categorical cross-entropy + soft Dice averaged over classes: the Dice term weights the thin
    boundary class as much as the background."""
    cce = ops.mean(keras.losses.categorical_crossentropy(y_true, y_pred))
    return cce + soft_dice_loss(y_true, y_pred)


@keras.saving.register_keras_serializable(package="training")
class DiceScore(keras.metrics.Metric):
    """Dice from accumulated hard-prediction counts (like MeanIoU, not a per-batch mean).

    Binary (one sigmoid channel): Dice of the foreground at ``threshold``. Multiclass (one-hot):
    mean Dice over ``class_ids``.
    """

    def __init__(
        self,
        num_classes: int,
        class_ids: list[int] | None = None,
        threshold: float = 0.5,
        name: str = "dice",
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        self.num_classes = num_classes
        self.class_ids = list(class_ids) if class_ids is not None else list(range(num_classes))
        self.threshold = threshold
        self.tp = self.add_variable((num_classes,), "zeros", name="tp")
        self.fp = self.add_variable((num_classes,), "zeros", name="fp")
        self.fn = self.add_variable((num_classes,), "zeros", name="fn")

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        """Add this batch's per-class true/false positive and false negative counts."""
        if y_pred.shape[-1] == 1:
            t = ops.cast(y_true[..., 0] >= 0.5, "int32")
            p = ops.cast(y_pred[..., 0] >= self.threshold, "int32")
        else:
            t, p = ops.argmax(y_true, axis=-1), ops.argmax(y_pred, axis=-1)
        t1 = ops.one_hot(ops.reshape(t, (-1,)), self.num_classes)
        p1 = ops.one_hot(ops.reshape(p, (-1,)), self.num_classes)
        tp = ops.sum(t1 * p1, axis=0)
        self.tp.assign_add(tp)
        self.fp.assign_add(ops.sum(p1, axis=0) - tp)
        self.fn.assign_add(ops.sum(t1, axis=0) - tp)

    def result(self) -> Any:
        """Mean Dice over the selected classes."""
        # Explicit tensors: the JAX backend does not do arithmetic on Variables directly.
        tp, fp, fn = (ops.convert_to_tensor(v) for v in (self.tp, self.fp, self.fn))
        dice = 2.0 * tp / ops.maximum(2.0 * tp + fp + fn, 1.0)
        return ops.mean(ops.take(dice, self.class_ids))

    def reset_state(self) -> None:
        """Zero the counts."""
        for v in (self.tp, self.fp, self.fn):
            v.assign(ops.zeros(v.shape))

    def get_config(self) -> dict[str, Any]:
        """Serialisable constructor arguments."""
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "class_ids": self.class_ids,
            "threshold": self.threshold,
        }


def segmentation_metrics(
    class_names: list[str], threshold: float = 0.5
) -> list[keras.metrics.Metric]:
    """Confusion-matrix IoU ("iou": foreground for binary, mean for multiclass), per-class IoU
    for multiclass, and Dice."""
    k = len(class_names)
    if k == 2:
        return [
            keras.metrics.BinaryIoU(target_class_ids=[1], threshold=threshold, name="iou"),
            DiceScore(2, class_ids=[1], threshold=threshold, name="dice"),
        ]
    metrics: list[keras.metrics.Metric] = [
        keras.metrics.MeanIoU(k, sparse_y_true=False, sparse_y_pred=False, name="iou")
    ]
    metrics += [
        keras.metrics.IoU(k, [i], sparse_y_true=False, sparse_y_pred=False, name=f"iou_{n}")
        for i, n in enumerate(class_names)
    ]
    metrics.append(DiceScore(k, name="dice"))
    return metrics
