"""A lab's own ``images/`` + ``masks/`` folder, checked and understood before training starts.

``segtrain train --data-dir DIR`` (no preset) reads every pair once, here, without TensorFlow:

- every problem is collected and reported together, each naming the file and what is wrong
  (an image without a mask or the reverse, unreadable files, sizes that differ, label values
  out of range, mixed channel counts, too few images for the split), so a lab fixes its folder
  in one go instead of one failed run at a time;
- what to train is inferred: the channel count from the images, and binary or multiclass from
  the masks (or given with ``--classes``):

  * ``--classes a,b``: binary; any nonzero label is foreground (instance labels are fine);
  * ``--classes a,b,c,...`` (K names): masks hold the class indices 0..K-1, or exactly K
    distinct values (e.g. 0, 128, 255) taken in increasing order;
  * no ``--classes``: instance masks (every nonzero value one connected object) and masks with
    two values are binary; masks whose values each mark several separate regions are class
    maps, one class per value, in increasing order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from training.data import MaskMode, PairingError, pair_files, read_image, read_mask

MIN_IMAGES = 3  # one each for training, validation and test
MAX_CLASSES = 16  # more distinct values than this in class maps: surely instance labels


class DataFolderError(ValueError):
    """The folder cannot be trained on; ``problems`` lists every reason, one line each."""

    def __init__(self, folder: Path, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"cannot train on {folder}:\n{lines}")


@dataclass
class FolderSummary:
    """What a folder holds and how it will be trained."""

    images: int
    channels: int
    mask_mode: MaskMode
    classes: list[str]
    label_values: list[int] | None
    values_seen: list[int]
    notes: list[str] = field(default_factory=list)


def _is_instance_mask(mask: np.ndarray) -> bool:
    """Every nonzero value is one connected object (8-connectivity): instance labels."""
    for value in np.unique(mask):
        if value == 0:
            continue
        _, count = ndimage.label(mask == value, structure=np.ones((3, 3)))
        if count > 1:
            return False
    return True


def inspect_folder(
    folder: Path,
    classes: list[str] | None = None,
    min_images: int = MIN_IMAGES,
    *,
    infer: bool = True,
) -> FolderSummary:
    """Read every pair of ``folder`` (``images/``, ``masks/``), check it and infer the task
    (``infer=False``: check only, for a preset that says how its masks are read).

    Raises :class:`DataFolderError` with every problem found.
    """
    problems: list[str] = []
    images_dir, masks_dir = folder / "images", folder / "masks"
    missing = [d for d in (images_dir, masks_dir) if not d.is_dir()]
    if missing:
        raise DataFolderError(
            folder,
            [f"no folder {d.name}/ in {folder} (expected images/ and masks/)" for d in missing],
        )
    try:
        pairs = pair_files(images_dir, masks_dir)
    except PairingError as exc:
        problems += [f"image {name} has no mask in masks/" for name in exc.unmatched_images]
        problems += [f"mask {name} has no image in images/" for name in exc.unmatched_masks]
        raise DataFolderError(folder, problems) from None
    except ValueError as exc:
        raise DataFolderError(folder, [str(exc)]) from None
    channels: dict[int, list[str]] = {}
    values: set[int] = set()
    instance_like = True
    per_mask: dict[str, set[int]] = {}
    for pair in pairs:
        try:
            image = read_image(pair.image)
        except Exception as exc:
            problems.append(f"image {pair.image.name} cannot be read: {exc}")
            image = None
        try:
            mask = read_mask(pair.mask)
        except Exception as exc:
            problems.append(f"mask {pair.mask.name} cannot be read: {exc}")
            mask = None
        if image is not None:
            channels.setdefault(int(image.shape[2]), []).append(pair.image.name)
        if mask is None:
            continue
        if mask.dtype.kind == "f" and not np.array_equal(mask, np.round(mask)):
            problems.append(f"mask {pair.mask.name} holds fractional values, not labels")
            continue
        if mask.size and mask.min() < 0:
            problems.append(f"mask {pair.mask.name} holds negative labels")
            continue
        if image is not None and image.shape[:2] != mask.shape:
            problems.append(
                f"{pair.stem}: image {pair.image.name} is {image.shape[1]}x{image.shape[0]} "
                f"but mask {pair.mask.name} is {mask.shape[1]}x{mask.shape[0]}"
            )
        present = {int(v) for v in np.unique(mask)}
        values |= present
        per_mask[pair.mask.name] = present
        if infer and classes is None and instance_like and len(present) > 2:
            instance_like = _is_instance_mask(mask)
    if classes is not None and len(classes) > 2:
        k = len(classes)
        if not values <= set(range(k)) and len(values) != k:
            for name, present in per_mask.items():
                outside = sorted(v for v in present if v >= k)
                if outside:
                    problems.append(
                        f"mask {name} has labels {outside[:10]} outside the {k} classes "
                        f"({', '.join(classes)}): expected class indices 0..{k - 1}, or "
                        f"{k} distinct values over all masks (found {len(values)})"
                    )
    if len(channels) > 1:
        counts = "; ".join(
            f"{n} channel(s): {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
            for n, names in sorted(channels.items())
        )
        problems.append(f"images have mixed channel counts ({counts}); convert them to one")
    if len(pairs) < min_images:
        problems.append(
            f"{len(pairs)} image pair(s): at least {min_images} are needed (training, "
            "validation and test each need one)"
        )
    if problems:
        raise DataFolderError(folder, problems)
    seen = sorted(values)
    notes: list[str] = []
    if classes is not None and len(classes) == 2:
        mode, label_values, names = MaskMode.BINARY, None, classes
    elif classes is not None:
        contiguous = set(seen) <= set(range(len(classes)))
        mode, names = MaskMode.LABELS, classes
        label_values = list(range(len(classes))) if contiguous else seen
    elif len(seen) <= 2 or instance_like or len(seen) > MAX_CLASSES:
        mode, label_values, names = MaskMode.BINARY, None, ["background", "foreground"]
        if len(seen) > 2:
            notes.append(
                f"masks hold {len(seen)} values, each one object: instance labels, trained as "
                "foreground vs background (give --classes for classes)"
            )
    else:
        mode, label_values = MaskMode.LABELS, seen
        names = ["background" if v == 0 else f"class{v}" for v in seen]
        notes.append(
            f"masks hold the values {seen}, each marking several regions: {len(seen)} classes "
            f"({', '.join(names)}); name them with --classes"
        )
    return FolderSummary(
        images=len(pairs),
        channels=next(iter(channels)),
        mask_mode=mode,
        classes=list(names),
        label_values=label_values,
        values_seen=seen,
        notes=notes,
    )
