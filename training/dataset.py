"""Frames in memory and the ``tf.data`` pipelines: random training patches, fixed validation tiles.

Each whole frame is normalised once with the service's own function before any patch is cut, so
the network sees exactly the intensities the service will feed it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from service.inference.modelmeta import Normalization
from service.inference.normalize import normalize_image
from training.data import MaskMode, Pair, mask_to_classes, read_image, read_mask


@dataclass
class Frame:
    """One normalised image ``(H, W, C)`` float32 with its class map ``(H, W)`` uint8."""

    stem: str
    image: np.ndarray
    classes: np.ndarray


def load_frames(
    pairs: list[Pair],
    normalization: Normalization,
    mode: MaskMode | str,
    *,
    label_values: list[int] | None = None,
    boundary_width: int = 2,
) -> list[Frame]:
    """Read, normalise (whole frame) and convert the masks of ``pairs``."""
    frames = []
    for pair in pairs:
        image = read_image(pair.image)
        mask = read_mask(pair.mask)
        if image.shape[:2] != mask.shape:
            raise ValueError(f"{pair.stem}: image {image.shape[:2]} and mask {mask.shape} differ")
        classes = mask_to_classes(
            mask, mode, label_values=label_values, boundary_width=boundary_width
        )
        frames.append(Frame(pair.stem, normalize_image(image, normalization), classes))
    return frames


def _pad_to(arr: np.ndarray, tile: int) -> np.ndarray:
    """Reflect-pad the first two axes up to ``tile`` (as the service's tiler does)."""
    pad_y, pad_x = max(0, tile - arr.shape[0]), max(0, tile - arr.shape[1])
    if not (pad_y or pad_x):
        return arr
    widths = [(0, pad_y), (0, pad_x)] + [(0, 0)] * (arr.ndim - 2)
    return np.pad(arr, widths, mode="reflect")


def random_patches(
    frames: list[Frame], tile: int, seed: int, fg_bias: float = 0.3
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless random ``tile``-square crops, frames drawn in proportion to their area.

    With probability ``fg_bias`` the crop is placed around a random foreground pixel: sparse
    data (bacteria, boundaries) would otherwise yield mostly empty patches.
    """
    rng = np.random.default_rng(seed)
    padded = [(_pad_to(f.image, tile), _pad_to(f.classes, tile)) for f in frames]
    areas = np.array([c.size for _, c in padded], np.float64)
    fg_coords = [np.argwhere(c > 0) for _, c in padded]
    while True:
        i = int(rng.choice(len(padded), p=areas / areas.sum()))
        image, classes = padded[i]
        h, w = classes.shape
        if rng.random() < fg_bias and len(fg_coords[i]):
            cy, cx = fg_coords[i][rng.integers(len(fg_coords[i]))]
            y = int(np.clip(cy - rng.integers(tile), 0, h - tile))
            x = int(np.clip(cx - rng.integers(tile), 0, w - tile))
        else:
            y, x = int(rng.integers(h - tile + 1)), int(rng.integers(w - tile + 1))
        yield image[y : y + tile, x : x + tile], classes[y : y + tile, x : x + tile]


def grid_tiles(frames: list[Frame], tile: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping tiles covering every frame (last row/column flush with the edge)."""
    images, classes = [], []
    for f in frames:
        img, cls = _pad_to(f.image, tile), _pad_to(f.classes, tile)
        h, w = cls.shape
        ys = sorted({*range(0, h - tile + 1, tile), h - tile})
        xs = sorted({*range(0, w - tile + 1, tile), w - tile})
        for y in ys:
            for x in xs:
                images.append(img[y : y + tile, x : x + tile])
                classes.append(cls[y : y + tile, x : x + tile])
    return np.stack(images), np.stack(classes)


def _encode(classes: tf.Tensor, num_classes: int) -> tf.Tensor:
    """Class map to the network's target: one sigmoid channel (binary) or a one-hot softmax."""
    if num_classes == 2:
        return tf.cast(classes, tf.float32)[..., None]
    return tf.one_hot(tf.cast(classes, tf.int32), num_classes, dtype=tf.float32)


def augment(image: tf.Tensor, classes: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Flips, 90-degree rotations (labels follow), then gain/offset and gamma on the image only.

    Stateless ops keyed by ``seed`` keep the pipeline reproducible.
    """
    seeds = tf.random.experimental.stateless_split(seed, 6)
    channels = tf.shape(image)[-1]
    both = tf.concat([image, tf.cast(classes[..., None], tf.float32)], axis=-1)
    both = tf.image.stateless_random_flip_left_right(both, seeds[0])
    both = tf.image.stateless_random_flip_up_down(both, seeds[1])
    k = tf.random.stateless_uniform([], seeds[2], 0, 4, dtype=tf.int32)
    both = tf.image.rot90(both, k)
    image = both[..., :channels]
    classes = tf.cast(tf.round(both[..., channels]), tf.uint8)
    gain = tf.random.stateless_uniform([], seeds[3], 0.8, 1.2)
    offset = tf.random.stateless_uniform([], seeds[4], -0.1, 0.1)
    gamma = tf.exp(tf.random.stateless_uniform([], seeds[5], np.log(0.7), np.log(1.4)))
    # Gamma on the non-negative part only: percentile normalisation leaves a few values below 0.
    image = tf.pow(tf.maximum(image, 0.0), gamma) + tf.minimum(image, 0.0)
    return image * gain + offset, classes


def train_dataset(
    frames: list[Frame],
    tile: int,
    batch_size: int,
    num_classes: int,
    seed: int,
    *,
    fg_bias: float = 0.3,
    shuffle_buffer: int = 256,
) -> tf.data.Dataset:
    """Endless augmented, shuffled, batched and prefetched training patches."""
    channels = frames[0].image.shape[2]
    patches = tf.data.Dataset.from_generator(
        lambda: random_patches(frames, tile, seed, fg_bias),
        output_signature=(
            tf.TensorSpec((tile, tile, channels), tf.float32),
            tf.TensorSpec((tile, tile), tf.uint8),
        ),
    )
    seeds = tf.data.Dataset.random(seed=seed).batch(2)
    ds = tf.data.Dataset.zip(patches, seeds).shuffle(shuffle_buffer, seed=seed)
    ds = ds.map(lambda p, s: augment(p[0], p[1], s), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(lambda x, y: (x, _encode(y, num_classes)), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def val_dataset(
    frames: list[Frame], tile: int, batch_size: int, num_classes: int
) -> tf.data.Dataset:
    """Fixed grid tiles of the validation frames: the same every epoch, so curves compare."""
    images, classes = grid_tiles(frames, tile)
    ds = tf.data.Dataset.from_tensor_slices((images, classes))
    ds = ds.map(lambda x, y: (x, _encode(y, num_classes)))
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
