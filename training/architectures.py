"""The seeds' segmentation networks next to the U-Net, each from small named blocks.

``ARCHITECTURES`` maps the ``--arch`` names to their builders, as segmentation_models.pytorch's
``create_model`` does; :func:`build_model` passes a network's options straight to its builder.
The tile multiple a network needs goes into the model's metadata, so the service needs no change
per network:

- ``unet``: four-or-so poolings with skip concatenations (the default).
- ``encoder-decoder``: strided convolutions down, transposed convolutions up, no skips.
- ``residual-unet``: the Keras example's separable-convolution blocks with 1x1 residual
  projections, plus real encoder-to-decoder skip concatenations (``neighbour_residuals`` drops
  them, which reproduces the example, whose residuals only join neighbouring blocks).
- ``fcn8s``: a VGG-16-shaped encoder (narrow, trained from scratch) with pool3/pool4 score fusion.
- ``u2net``: nested RSU blocks with deep-supervision side outputs fused into one map.

All share ``depth`` / ``base_filters`` / ``max_filters`` where they mean something, end in a
layer named ``probabilities`` (sigmoid for one channel, softmax otherwise) and have a single
output, except ``u2net`` with deep supervision, whose extra outputs exist for training only
(:func:`inference_model` drops them).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
from keras import layers

if TYPE_CHECKING:  # Keras and NumPy only at run time: bench.training_speed runs where
    from training.config import ArchOptions  # neither pydantic nor TensorFlow is installed

OUTPUT_LAYER = "probabilities"
VGG16_CONVS = (2, 2, 3, 3, 3)  # convolutions per VGG-16 block; 5 poolings
RSU_MIN_HEIGHT = 4  # stages that would be shallower use the dilated RSU-4F instead


def _activation(output_channels: int) -> str:
    return "sigmoid" if output_channels == 1 else "softmax"


def level_filters(depth: int, base_filters: int, max_filters: int) -> list[int]:
    """Filters per resolution level 0..depth: doubling from ``base_filters``, capped."""
    return [min(base_filters * 2**level, max_filters) for level in range(depth + 1)]


def conv_bn_relu(
    x: keras.KerasTensor,
    filters: int,
    kernel: int = 3,
    *,
    strides: int = 1,
    dilation: int = 1,
    batchnorm: bool = True,
) -> keras.KerasTensor:
    """Convolution, optional batch norm (momentum 0.9 for short runs, as in the U-Net), ReLU."""
    x = layers.Conv2D(
        filters,
        kernel,
        strides=strides,
        dilation_rate=dilation,
        padding="same",
        kernel_initializer="he_normal",
        use_bias=not batchnorm,
    )(x)
    if batchnorm:
        x = layers.BatchNormalization(momentum=0.9)(x)
    return layers.Activation("relu")(x)


def head(x: keras.KerasTensor, output_channels: int) -> keras.KerasTensor:
    """1x1 convolution to the class channels with the task's activation."""
    return layers.Conv2D(
        output_channels, 1, activation=_activation(output_channels), name=OUTPUT_LAYER
    )(x)


# ----------------------------------------------------------------------------------- U-Net


def conv_block(
    x: keras.KerasTensor, filters: int, *, batchnorm: bool, dropout: float
) -> keras.KerasTensor:
    """Two 3x3 convolution-norm-ReLU layers, with optional dropout after the first."""
    x = conv_bn_relu(x, filters, batchnorm=batchnorm)
    if dropout:
        x = layers.Dropout(dropout)(x)
    return conv_bn_relu(x, filters, batchnorm=batchnorm)


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
    filters = level_filters(depth, base_filters, max_filters)
    x = inputs
    skips = []
    for f in filters[:-1]:
        skip = conv_block(x, f, batchnorm=batchnorm, dropout=dropout)
        skips.append(skip)
        x = layers.MaxPooling2D(2)(skip)
    x = conv_block(x, filters[-1], batchnorm=batchnorm, dropout=dropout)
    for f, skip in zip(reversed(filters[:-1]), reversed(skips), strict=True):
        x = decoder_block(x, skip, f, batchnorm=batchnorm, dropout=dropout)
    return keras.Model(inputs, head(x, output_channels), name=name)


# ------------------------------------------------------------------------- encoder-decoder


def strided_down_block(
    x: keras.KerasTensor, filters: int, *, batchnorm: bool, dropout: float
) -> keras.KerasTensor:
    """Halve the resolution with a stride-2 convolution (no pooling), then one more 3x3 conv."""
    x = conv_bn_relu(x, filters, strides=2, batchnorm=batchnorm)
    if dropout:
        x = layers.Dropout(dropout)(x)
    return conv_bn_relu(x, filters, batchnorm=batchnorm)


def transposed_up_block(
    x: keras.KerasTensor, filters: int, *, batchnorm: bool, dropout: float
) -> keras.KerasTensor:
    """Double the resolution with a stride-2 transposed convolution, then one 3x3 conv."""
    x = layers.Conv2DTranspose(
        filters, 3, strides=2, padding="same", kernel_initializer="he_normal"
    )(x)
    if batchnorm:
        x = layers.BatchNormalization(momentum=0.9)(x)
    x = layers.Activation("relu")(x)
    if dropout:
        x = layers.Dropout(dropout)(x)
    return conv_bn_relu(x, filters, batchnorm=batchnorm)


def build_encoder_decoder(
    channels: int,
    output_channels: int,
    *,
    depth: int = 4,
    base_filters: int = 16,
    max_filters: int = 128,
    dropout: float = 0.0,
    batchnorm: bool = True,
    tile_size: int | None = None,
    name: str = "encoder_decoder",
) -> keras.Model:
    """The seeds' plain encoder-decoder: everything the decoder knows passes the bottleneck.

    No skip connection of any kind, so fine detail lost by striding cannot come back: this is the
    baseline that shows what the U-Net's skips buy.
    """
    filters = level_filters(depth, base_filters, max_filters)
    inputs = keras.Input((tile_size, tile_size, channels), name="image")
    x = conv_bn_relu(inputs, filters[0], batchnorm=batchnorm)
    for f in filters[1:]:
        x = strided_down_block(x, f, batchnorm=batchnorm, dropout=dropout)
    for f in reversed(filters[:-1]):
        x = transposed_up_block(x, f, batchnorm=batchnorm, dropout=dropout)
    return keras.Model(inputs, head(x, output_channels), name=name)


# --------------------------------------------------------------------------- residual U-Net


def separable_pair(x: keras.KerasTensor, filters: int) -> keras.KerasTensor:
    """(ReLU, 3x3 separable convolution, batch norm) twice, as in the Keras example."""
    for _ in range(2):
        x = layers.Activation("relu")(x)
        x = layers.SeparableConv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization(momentum=0.9)(x)
    return x


def residual_down_block(x: keras.KerasTensor, filters: int) -> keras.KerasTensor:
    """Separable pair, 3x3/2 max pooling, plus the input projected by a strided 1x1 conv."""
    shortcut = layers.Conv2D(filters, 1, strides=2, padding="same")(x)
    y = layers.MaxPooling2D(3, strides=2, padding="same")(separable_pair(x, filters))
    return layers.Add()([y, shortcut])


def residual_up_block(
    x: keras.KerasTensor, skip: keras.KerasTensor | None, filters: int
) -> keras.KerasTensor:
    """2x upsampling, optional concatenation with the encoder's features, separable pair, plus
    the upsampled input projected by a 1x1 conv.

    The example runs its convolutions before upsampling; here they run after it, so that the
    skip can be concatenated at its own resolution. Both variants share this order, so the
    comparison isolates the skips.
    """
    x = layers.UpSampling2D(2)(x)
    shortcut = layers.Conv2D(filters, 1, padding="same")(x)
    if skip is not None:
        x = layers.Concatenate()([x, skip])
    return layers.Add()([separable_pair(x, filters), shortcut])


def build_residual_unet(
    channels: int,
    output_channels: int,
    *,
    depth: int = 4,
    base_filters: int = 16,
    max_filters: int = 128,
    neighbour_residuals: bool = False,
    tile_size: int | None = None,
    name: str = "residual_unet",
) -> keras.Model:
    """Keras example's "U-Net-like" network: a stride-2 stem, ``depth - 1`` residual down blocks,
    ``depth`` residual up blocks.

    With ``neighbour_residuals`` the decoder sees no encoder features (the example's design:
    its residual "skips" only join a block to the next); otherwise each up block concatenates the
    encoder's output at its resolution, as a U-Net does.
    """
    filters = level_filters(depth - 1, base_filters, max_filters)
    inputs = keras.Input((tile_size, tile_size, channels), name="image")
    x = conv_bn_relu(inputs, filters[0], strides=2)
    skips = []
    for f in filters[1:]:
        skips.append(x)
        x = residual_down_block(x, f)
    # The last up block returns to the stem's input resolution, where no encoder features exist.
    decoder_skips: list[keras.KerasTensor | None] = [*reversed(skips), None]
    for f, skip in zip(reversed(filters), decoder_skips, strict=True):
        x = residual_up_block(x, None if neighbour_residuals else skip, f)
    return keras.Model(inputs, head(x, output_channels), name=name)


# --------------------------------------------------------------------------------- FCN-8s


def vgg_block(
    x: keras.KerasTensor, filters: int, convs: int, *, batchnorm: bool
) -> keras.KerasTensor:
    """``convs`` 3x3 convolutions then 2x2 max pooling (one VGG-16 stage)."""
    for _ in range(convs):
        x = conv_bn_relu(x, filters, batchnorm=batchnorm)
    return layers.MaxPooling2D(2)(x)


def score_upsample(
    x: keras.KerasTensor, classes: int, factor: int, name: str, *, trainable: bool = True
) -> keras.KerasTensor:
    """``factor``x upsampling of class scores by a transposed convolution (FCN's "upscore"),
    bilinear-initialised by :func:`set_bilinear_upsampling`; learnable unless ``trainable`` is
    false."""
    return layers.Conv2DTranspose(
        classes,
        2 * factor,
        strides=factor,
        padding="same",
        use_bias=False,
        name=name,
        trainable=trainable,
    )(x)


def bilinear_kernel(size: int, channels: int) -> np.ndarray:
    """Transposed-conv kernel ``(size, size, channels, channels)`` that upsamples each channel
    bilinearly (FCN's initialisation: training starts from plain interpolation)."""
    factor = (size + 1) // 2
    centre = factor - 1 if size % 2 == 1 else factor - 0.5
    og = np.ogrid[:size, :size]
    filt = (1 - abs(og[0] - centre) / factor) * (1 - abs(og[1] - centre) / factor)
    kernel = np.zeros((size, size, channels, channels), np.float32)
    for c in range(channels):
        kernel[:, :, c, c] = filt
    return kernel


def set_bilinear_upsampling(model: keras.Model) -> None:
    """Initialise every ``upscore*`` layer of ``model`` to bilinear interpolation."""
    for layer in model.layers:
        if layer.name.startswith("upscore"):
            kernel = layer.kernel
            layer.kernel.assign(bilinear_kernel(kernel.shape[0], kernel.shape[2]))


def build_fcn8s(
    channels: int,
    output_channels: int,
    *,
    base_filters: int = 16,
    max_filters: int = 128,
    dropout: float = 0.0,
    batchnorm: bool = True,
    tile_size: int | None = None,
    name: str = "fcn8s",
) -> keras.Model:
    """FCN-8s: VGG-16 layout (2-2-3-3-3 convs, 5 poolings) at ``base_filters`` instead of 64.

    fc6/fc7 become convolutions (3x3 instead of 7x7, width ``2 * max_filters`` instead of 4096),
    the /32 scores are upsampled 2x and fused with scores from pool4, again with pool3, then
    upsampled 8x to the input size. Batch norm (VGG-16-BN) because training is from scratch:
    ImageNet weights cannot be downloaded here. The pool scores start at zero, as in the paper,
    so training starts from the coarse /32 prediction.
    """
    widths = [min(base_filters * 2**i, max_filters) for i in range(len(VGG16_CONVS))]
    k = output_channels
    inputs = keras.Input((tile_size, tile_size, channels), name="image")
    x = inputs
    pools = []
    for f, convs in zip(widths, VGG16_CONVS, strict=True):
        x = vgg_block(x, f, convs, batchnorm=batchnorm)
        pools.append(x)
    for kernel in (3, 1):  # fc6, fc7
        x = conv_bn_relu(x, 2 * max_filters, kernel, batchnorm=batchnorm)
        x = layers.Dropout(dropout)(x) if dropout else x
    x = layers.Conv2D(k, 1, name="score_fr")(x)
    for pool, level in ((pools[3], 4), (pools[2], 3)):
        score = layers.Conv2D(k, 1, kernel_initializer="zeros", name=f"score_pool{level}")(pool)
        x = layers.Add()([score_upsample(x, k, 2, f"upscore_to_pool{level}"), score])
    x = score_upsample(x, k, 8, "upscore8")
    outputs = layers.Activation(_activation(k), name=OUTPUT_LAYER)(x)
    model = keras.Model(inputs, outputs, name=name)
    set_bilinear_upsampling(model)
    return model


# --------------------------------------------------------------------------------- U^2-Net


def rsu_block(
    x: keras.KerasTensor, height: int, mid: int, out: int, *, dilated: bool = False
) -> keras.KerasTensor:
    """Residual U-block RSU-``height``: a small U-Net inside a block, plus its input projection.

    ``height - 2`` poolings inside (so the block needs sides divisible by ``2**(height - 2)``);
    ``dilated`` is RSU-4F: dilations 1, 2, 4, 8 instead of pooling, for the coarsest stages.
    """
    hxin = conv_bn_relu(x, out)
    encoder = [conv_bn_relu(hxin, mid)]
    for level in range(1, height - 1):
        if dilated:
            encoder.append(conv_bn_relu(encoder[-1], mid, dilation=2**level))
        else:
            encoder.append(conv_bn_relu(layers.MaxPooling2D(2)(encoder[-1]), mid))
    d = conv_bn_relu(encoder[-1], mid, dilation=2 ** (height - 1) if dilated else 2)
    for level in reversed(range(height - 1)):
        d = layers.Concatenate()([d, encoder[level]])
        d = conv_bn_relu(d, out if level == 0 else mid, dilation=2**level if dilated else 1)
        if level and not dilated:
            d = layers.UpSampling2D(2)(d)
    return layers.Add()([d, hxin])


def u2net_heights(depth: int) -> list[int]:
    """RSU height per stage: ``depth + 2`` at full resolution, one less per stage; stages that
    would drop below 4 are RSU-4F (dilated). ``depth`` 5 gives U²-Net's 7-6-5-4-4F-4F."""
    return [depth + 2 - stage for stage in range(depth + 1)]


def build_u2net(
    channels: int,
    output_channels: int,
    *,
    depth: int = 4,
    base_filters: int = 16,
    max_filters: int = 32,
    deep_supervision: bool = True,
    tile_size: int | None = None,
    name: str = "u2net",
) -> keras.Model:
    """U²-Net (small, like u2netp): ``depth + 1`` encoder stages of RSU blocks, ``depth`` decoder
    stages, a 3x3 side score per decoder stage and the bottom, upsampled to the input and fused
    by a 1x1 conv.

    Every stage has ``base_filters`` mid and ``max_filters`` output channels (u2netp: 16 and
    64). Each stage's RSU height falls by one as the resolution halves, so every stage needs
    ``2**depth``: that is the tile multiple. With ``deep_supervision`` the model also outputs the
    side maps (``side0``..), each trained against the mask; :func:`inference_model` keeps the
    fused map only.
    """
    heights = u2net_heights(depth)
    k = output_channels
    inputs = keras.Input((tile_size, tile_size, channels), name="image")
    x = inputs
    encoder = []
    for stage, h in enumerate(heights):
        if stage:
            x = layers.MaxPooling2D(2)(x)
        x = rsu_block(
            x, max(h, RSU_MIN_HEIGHT), base_filters, max_filters, dilated=h < RSU_MIN_HEIGHT
        )
        encoder.append(x)
    decoded = {depth: x}
    for stage in reversed(range(depth)):
        x = layers.UpSampling2D(2)(x)
        x = layers.Concatenate()([x, encoder[stage]])
        h = heights[stage]
        x = rsu_block(
            x, max(h, RSU_MIN_HEIGHT), base_filters, max_filters, dilated=h < RSU_MIN_HEIGHT
        )
        decoded[stage] = x
    sides = []
    for stage in range(depth + 1):
        s = layers.Conv2D(k, 3, padding="same", name=f"side_score{stage}")(decoded[stage])
        if stage:
            # Fixed bilinear upsampling as in U²-Net, but as a frozen transposed convolution:
            # Keras' bilinear UpSampling2D cannot be traced with the dynamic tile sides the
            # ONNX export declares.
            s = score_upsample(s, k, 2**stage, f"upscore_side{stage}", trainable=False)
        sides.append(s)
    fused = layers.Conv2D(k, 1, name="fuse")(layers.Concatenate()(sides))
    outputs = [layers.Activation(_activation(k), name=OUTPUT_LAYER)(fused)]
    if deep_supervision:
        outputs += [
            layers.Activation(_activation(k), name=f"side{stage}")(s)
            for stage, s in enumerate(sides)
        ]
    model = keras.Model(inputs, outputs if deep_supervision else outputs[0], name=name)
    set_bilinear_upsampling(model)
    return model


# ------------------------------------------------------------------------------- registry

Builder = Callable[..., keras.Model]

ARCHITECTURES: dict[str, Builder] = {
    "unet": build_unet,
    "encoder-decoder": build_encoder_decoder,
    "residual-unet": build_residual_unet,
    "fcn8s": build_fcn8s,
    "u2net": build_u2net,
}

_NOT_OPTIONS = ("channels", "output_channels", "tile_size", "name")


def builder(arch: str) -> Builder:
    """The builder of ``arch``, or a ValueError naming the choices."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def default_options(arch: str) -> dict[str, Any]:
    """The options ``arch``'s builder takes, with their defaults."""
    params = inspect.signature(builder(arch)).parameters.values()
    return {p.name: p.default for p in params if p.name not in _NOT_OPTIONS}


def options_for(arch: str, options: ArchOptions) -> dict[str, Any]:
    """The fields of ``options`` that ``arch``'s builder takes (the others mean nothing to it)."""
    return {key: getattr(options, key) for key in default_options(arch)}


def _resolved(arch: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` over the builder's defaults; a TypeError naming any option it does not take."""
    defaults = default_options(arch)
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f"{arch} takes the options {sorted(defaults)}, not {unknown}")
    return {**defaults, **options}


def build_model(
    arch: str,
    channels: int,
    output_channels: int,
    *,
    tile_size: int | None = None,
    name: str | None = None,
    **options: Any,
) -> keras.Model:
    """Build ``arch`` (a key of :data:`ARCHITECTURES`) with ``options`` passed to its builder."""
    build = builder(arch)
    extra = {"name": name} if name is not None else {}
    return build(
        channels, output_channels, tile_size=tile_size, **_resolved(arch, options), **extra
    )


def tile_multiple(arch: str, **options: Any) -> int:
    """What tile sides must be multiples of: 2 to the number of poolings."""
    if arch == "fcn8s":
        return 2 ** len(VGG16_CONVS)
    return 2 ** int(_resolved(arch, options)["depth"])


def describe(arch: str, **options: Any) -> str:
    """``arch(option=value, ...)`` with every option the builder used, for the metadata."""
    resolved = _resolved(arch, options)
    return f"{arch}({', '.join(f'{k}={v}' for k, v in resolved.items())})"


def inference_model(model: keras.Model) -> keras.Model:
    """The model with its ``probabilities`` output only (drops deep-supervision side outputs):
    the service needs exactly one input and one output."""
    if len(model.outputs) == 1:
        return model
    # A single input stays a tensor, not a one-element list, so calls with a bare array match.
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(inputs, model.get_layer(OUTPUT_LAYER).output, name=model.name)


def count_layers(model: keras.Model, kind: type[Any]) -> int:
    """Number of layers of ``kind`` (e.g. ``layers.Concatenate``): structural tests use it."""
    return sum(isinstance(layer, kind) for layer in model.layers)
