"""Frames in memory and the ``tf.data`` pipelines: random training patches, fixed validation tiles.

Each whole frame is normalised with the service's own function before any patch is cut, so
the network sees exactly the intensities the service will feed it. With percentile jitter, the
frame's statistics are computed once for a grid of percentile pairs around the model's own and
one pair is drawn per patch: a lab's image with a different background fraction or a few
saturated pixels moves the service's percentiles the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from service.inference.modelmeta import Normalization
from service.inference.normalize import IntensityStats, compute_intensity_stats, normalize_image
from training.config import Augmentation
from training.data import MaskMode, Pair, mask_to_classes, read_image, read_mask

# Percentiles drawn per patch with percentile jitter, around the service's default 1 / 99.8.
JITTER_LOW = (0.2, 0.5, 1.0, 2.0, 3.0)
JITTER_HIGH = (99.0, 99.5, 99.8, 99.9, 99.95)


@dataclass
class Frame:
    """One normalised image ``(H, W, C)`` float32 with its class map ``(H, W)`` uint8.

    ``raw`` and ``jitter`` (the image in its own dtype and its statistics for each percentile
    pair of ``JITTER_LOW`` x ``JITTER_HIGH``) are kept only for percentile jitter.
    """

    stem: str
    image: np.ndarray
    classes: np.ndarray
    source: str = ""
    raw: np.ndarray | None = None
    jitter: list[IntensityStats] | None = None


def load_frames(
    pairs: list[Pair],
    normalization: Normalization,
    mode: MaskMode | str,
    *,
    label_values: list[int] | None = None,
    boundary_width: int = 2,
    contact_width: int = 0,
    keep_cores: bool = False,
    percentile_jitter: bool = False,
) -> list[Frame]:
    """Read, normalise (whole frame) and convert the masks of ``pairs``."""
    frames = []
    for pair in pairs:
        image = read_image(pair.image)
        mask = read_mask(pair.mask)
        if image.shape[:2] != mask.shape:
            raise ValueError(f"{pair.stem}: image {image.shape[:2]} and mask {mask.shape} differ")
        classes = mask_to_classes(
            mask,
            mode,
            label_values=label_values,
            boundary_width=boundary_width,
            contact_width=contact_width,
            keep_cores=keep_cores,
        )
        frame = Frame(pair.stem, normalize_image(image, normalization), classes, pair.source)
        if percentile_jitter and normalization.method == "percentile":
            frame.raw = image
            frame.jitter = [
                compute_intensity_stats(image, Normalization(low=lo, high=hi))
                for lo in JITTER_LOW
                for hi in JITTER_HIGH
            ]
        frames.append(frame)
    return frames


def _pad_to(arr: np.ndarray, tile: int) -> np.ndarray:
    """Reflect-pad the first two axes up to ``tile`` (as the service's tiler does)."""
    pad_y, pad_x = max(0, tile - arr.shape[0]), max(0, tile - arr.shape[1])
    if not (pad_y or pad_x):
        return arr
    widths = [(0, pad_y), (0, pad_x)] + [(0, 0)] * (arr.ndim - 2)
    return np.pad(arr, widths, mode="reflect")


def random_patches(
    frames: list[Frame],
    tile: int,
    seed: int,
    fg_bias: float = 0.3,
    augmentation: Augmentation | None = None,
    source_weights: dict[str, float] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless random crops: a source drawn by its weight (``source_weights``, by source name;
    1 when not given), then a frame of it in proportion to its area, so a source with few large
    frames weighs as much as one with many.

    The crop side is ``tile`` divided by a zoom factor drawn log-uniformly in the augmentation's
    scale range (the pipeline resizes it to ``tile``), at most the frame's shorter side. With
    probability ``fg_bias`` the crop is placed around a random foreground pixel: sparse data
    (bacteria, boundaries) would otherwise yield mostly empty patches.
    """
    aug = augmentation or Augmentation()
    rng = np.random.default_rng(seed)
    sources = sorted({f.source for f in frames})
    members = [[i for i, f in enumerate(frames) if f.source == s] for s in sources]
    chance = np.array([(source_weights or {}).get(s, 1.0) for s in sources], np.float64)
    chance /= chance.sum()
    weights = [np.array([frames[i].classes.size for i in m], np.float64) for m in members]
    fg_coords = [np.argwhere(f.classes > 0) for f in frames]
    log_lo, log_hi = np.log(aug.scale_min), np.log(aug.scale_max)
    while True:
        k = int(rng.choice(len(sources), p=chance))
        i = members[k][int(rng.choice(len(members[k]), p=weights[k] / weights[k].sum()))]
        frame = frames[i]
        crop = tile
        if aug.rescales:
            crop = max(16, round(tile / np.exp(rng.uniform(log_lo, log_hi))))
        h, w = frame.classes.shape
        # Zooming out of a frame smaller than the crop would mostly show its mirror image.
        crop = min(crop, max(tile, min(h, w)))
        if rng.random() < fg_bias and len(fg_coords[i]):
            cy, cx = fg_coords[i][rng.integers(len(fg_coords[i]))]
            y = int(np.clip(cy - rng.integers(crop), 0, max(0, h - crop)))
            x = int(np.clip(cx - rng.integers(crop), 0, max(0, w - crop)))
        else:
            y, x = int(rng.integers(max(1, h - crop + 1))), int(rng.integers(max(1, w - crop + 1)))
        window = np.s_[y : y + crop, x : x + crop]
        if frame.jitter is not None and frame.raw is not None:
            image = frame.jitter[int(rng.integers(len(frame.jitter)))].apply(frame.raw[window])
        else:
            image = frame.image[window]
        yield _pad_to(image, crop), _pad_to(frame.classes[window], crop)


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


def _gaussian_blur(image: tf.Tensor, sigma: tf.Tensor, radius: int = 4) -> tf.Tensor:
    """Separable Gaussian blur of an ``(H, W, C)`` image, reflect-padded (``sigma`` >= 0)."""
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-0.5 * tf.square(x / tf.maximum(sigma, 1e-3)))
    kernel /= tf.reduce_sum(kernel)
    planes = tf.transpose(image, [2, 0, 1])[..., None]  # (C, H, W, 1)
    planes = tf.pad(planes, [[0, 0], [radius, radius], [radius, radius], [0, 0]], "REFLECT")
    planes = tf.nn.conv2d(planes, tf.reshape(kernel, [-1, 1, 1, 1]), 1, "VALID")
    planes = tf.nn.conv2d(planes, tf.reshape(kernel, [1, -1, 1, 1]), 1, "VALID")
    return tf.transpose(planes[..., 0], [1, 2, 0])


def degrade(image: tf.Tensor, seed: tf.Tensor, aug: Augmentation) -> tf.Tensor:
    """Optics and camera of another microscope, on a normalised image: blur, shot noise,
    Gaussian noise (each with the augmentation's probability), then contrast."""
    seeds = tf.random.experimental.stateless_split(seed, 8)
    draw = tf.random.stateless_uniform([3], seeds[0])
    if aug.blur_max_sigma > 0:
        sigma = tf.random.stateless_uniform([], seeds[1], 0.3, aug.blur_max_sigma)
        blurred = _gaussian_blur(image, sigma)
        image = tf.where(draw[0] < aug.probability, blurred, image)
    if aug.poisson:
        peak = tf.exp(tf.random.stateless_uniform([], seeds[2], np.log(10.0), np.log(300.0)))
        lam = tf.maximum(image, 0.0) * peak
        shot = tf.random.stateless_poisson(tf.shape(image), seeds[3], lam, dtype=tf.float32)
        shot = shot / peak + tf.minimum(image, 0.0)
        image = tf.where(draw[1] < aug.probability, shot, image)
    if aug.noise_max_sigma > 0:
        sigma = tf.random.stateless_uniform([], seeds[4], 0.0, aug.noise_max_sigma)
        noisy = image + sigma * tf.random.stateless_normal(tf.shape(image), seeds[5])
        image = tf.where(draw[2] < aug.probability, noisy, image)
    if aug.contrast > 0:
        factor = tf.random.stateless_uniform([], seeds[6], 1 - aug.contrast, 1 + aug.contrast)
        mean = tf.reduce_mean(image, axis=[0, 1], keepdims=True)
        image = mean + (image - mean) * factor
    return image


def augment(
    image: tf.Tensor, classes: tf.Tensor, seed: tf.Tensor, aug: Augmentation | None = None
) -> tuple[tf.Tensor, tf.Tensor]:
    """Flips, 90-degree rotations (labels follow), the optional :func:`degrade`, then gain,
    offset and gamma on the image only.

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
    if aug is not None:
        image = degrade(image, tf.random.experimental.stateless_fold_in(seed, 6), aug)
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
    augmentation: Augmentation | None = None,
    source_weights: dict[str, float] | None = None,
) -> tf.data.Dataset:
    """Endless augmented, shuffled, batched and prefetched training patches."""
    channels = frames[0].image.shape[2]
    aug = augmentation or Augmentation()
    side = tile if not aug.rescales else None
    patches = tf.data.Dataset.from_generator(
        lambda: random_patches(frames, tile, seed, fg_bias, aug, source_weights),
        output_signature=(
            tf.TensorSpec((side, side, channels), tf.float32),
            tf.TensorSpec((side, side), tf.uint8),
        ),
    )
    if aug.rescales:
        # Zoom to the tile: the image with antialiasing, the labels by nearest neighbour.
        patches = patches.map(
            lambda x, y: (
                tf.ensure_shape(
                    tf.image.resize(x, [tile, tile], "bilinear", antialias=True),
                    (tile, tile, channels),
                ),
                tf.ensure_shape(
                    tf.cast(
                        tf.image.resize(y[..., None], [tile, tile], "nearest")[..., 0], tf.uint8
                    ),
                    (tile, tile),
                ),
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    seeds = tf.data.Dataset.random(seed=seed).batch(2)
    ds = tf.data.Dataset.zip(patches, seeds).shuffle(shuffle_buffer, seed=seed)
    extra = aug if aug != Augmentation() else None
    ds = ds.map(lambda p, s: augment(p[0], p[1], s, extra), num_parallel_calls=tf.data.AUTOTUNE)
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
