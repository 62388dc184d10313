"""A small U-Net built from three blocks (conv, encoder, decoder) in a loop over filter sizes."""

from __future__ import annotations

import keras
from keras import layers


def conv_block(
    x: keras.KerasTensor, filters: int, *, batchnorm: bool, dropout: float
) -> keras.KerasTensor:
    """Two 3x3 convolutions, each followed by optional batch norm and ReLU.

    The convolution has no bias when batch norm follows: the norm's own shift makes it redundant.
    """
    for i in range(2):
        x = layers.Conv2D(
            filters, 3, padding="same", kernel_initializer="he_normal", use_bias=not batchnorm
        )(x)
        if batchnorm:
            # Momentum 0.9, not Keras' 0.99: runs here are a few hundred steps, and with 0.99 the
            # moving statistics used at inference still lag far behind the batch statistics.
            x = layers.BatchNormalization(momentum=0.9)(x)
        x = layers.Activation("relu")(x)
        if dropout and i == 0:
            x = layers.Dropout(dropout)(x)
    return x


def encoder_block(
    x: keras.KerasTensor, filters: int, *, batchnorm: bool, dropout: float
) -> tuple[keras.KerasTensor, keras.KerasTensor]:
    """Conv block then 2x2 max pooling; returns (skip features, downsampled features)."""
    skip = conv_block(x, filters, batchnorm=batchnorm, dropout=dropout)
    return skip, layers.MaxPooling2D(2)(skip)


def decoder_block(
    x: keras.KerasTensor, skip: keras.KerasTensor, filters: int, *, batchnorm: bool, dropout: float
) -> keras.KerasTensor:
    """2x transposed-convolution upsampling, concatenation with the skip, conv block."""
    x = layers.Conv2DTranspose(
        filters, 2, strides=2, padding="same", kernel_initializer="he_normal"
    )(x)
    x = layers.Concatenate()([x, skip])
    return conv_block(x, filters, batchnorm=batchnorm, dropout=dropout)


def build_unet(
    channels: int,
    output_channels: int,
    *,
    depth: int = 4,
    base_filters: int = 16,
    max_filters: int = 128,
    dropout: float = 0.0,
    batchnorm: bool = True,
    tile_size: int | None = None,
    name: str = "unet",
) -> keras.Model:
    """U-Net with ``depth`` poolings: tile sides must be multiples of ``2**depth``.

    Filters double per level from ``base_filters`` and are capped at ``max_filters``: the cap keeps
    the bottleneck (most of the weights) small, so the ONNX file stays a few MB and CPU inference
    is fast. ``output_channels`` 1 gives a sigmoid (binary), more give a softmax.
    """
    inputs = keras.Input((tile_size, tile_size, channels), name="image")
    filters = [min(base_filters * 2**level, max_filters) for level in range(depth + 1)]
    x = inputs
    skips = []
    for f in filters[:-1]:
        skip, x = encoder_block(x, f, batchnorm=batchnorm, dropout=dropout)
        skips.append(skip)
    x = conv_block(x, filters[-1], batchnorm=batchnorm, dropout=dropout)
    for f, skip in zip(reversed(filters[:-1]), reversed(skips), strict=True):
        x = decoder_block(x, skip, f, batchnorm=batchnorm, dropout=dropout)
    activation = "sigmoid" if output_channels == 1 else "softmax"
    outputs = layers.Conv2D(output_channels, 1, activation=activation, name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)
