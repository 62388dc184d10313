"""Label images to class-index maps: the one rule for scoring a ground truth in the service and
for turning training masks into targets.

Binary models: anything above 0 is foreground, so 0/1, 0/255 and instance labels all work.
Multiclass models: the pixel values the model was trained on (``label_values``, in class order)
when every label is one of them, otherwise class indices ``0..K-1`` as they are.
"""

from __future__ import annotations

import numpy as np


class LabelError(ValueError):
    """Labels that are neither class indices nor the model's label values."""


def labels_to_classes(
    labels: np.ndarray,
    classes: list[str],
    *,
    binary: bool,
    label_values: list[int] | None = None,
) -> np.ndarray:
    """Non-negative integer labels (any shape) to a uint8 class-index map of the same shape.

    Raises :class:`LabelError` naming the labels that fit no class and what was expected.
    """
    if binary:
        return (labels > 0).astype(np.uint8)
    k = len(classes)
    present = np.unique(labels)
    if label_values is not None and set(present.tolist()) <= set(label_values):
        lut = np.zeros(max(label_values) + 1, np.uint8)
        for index, value in enumerate(label_values):
            lut[value] = index
        return lut[labels]
    if not present.size or present.max() < k:
        return labels.astype(np.uint8)
    outside = [int(v) for v in present if v >= k][:10]
    message = f"labels {outside} outside the classes: expected class indices 0..{k - 1} "
    message += f"({', '.join(classes)})"
    if label_values is not None:
        unknown = sorted(set(present.tolist()) - set(label_values))[:10]
        message += f" or the label values {label_values} ({unknown} are not in label_values)"
    raise LabelError(message)
