"""What a TIFF holds, read from its header: axes (Z, T, channels, samples), shape, OME channel
names and physical pixel size; which channel a request means; its planes, decoded.

Multi-page TIFF, ImageJ hyperstacks and OME-TIFF are read through tifffile's series, whose axes
letters are kept: ``Y``/``X`` the plane, ``C`` channels, ``S`` samples (RGB), anything else
(``Z``, ``T``, ``Q``, ``I``...) planes to be segmented one by one. Several same-shaped 2-D
series (pages written one by one) are one stack along ``I``.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tifffile

from service.segmentation.errors import ImageTooLargeError, InvalidImageError, InvalidParameterError

NON_PLANE = "YXCS"
SAMPLE_NAMES = ("red", "green", "blue", "alpha")


@dataclass(frozen=True)
class PhysicalSize:
    """The size of one pixel (and of one Z step) as the OME metadata gives it."""

    x: float | None
    y: float | None
    z: float | None
    unit: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"x": self.x, "y": self.y, "z": self.z, "unit": self.unit}


@dataclass(frozen=True)
class TiffLayout:
    """The axes and shape of a TIFF's image, before any pixel is decoded."""

    axes: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    ome: bool = False
    channel_names: list[str] | None = None
    physical_size: PhysicalSize | None = None
    series_count: int = 1  # > 1: same-shaped 2-D series stacked along "I"
    _sizes: dict[str, int] = field(default_factory=dict, repr=False)

    def size(self, axis: str) -> int:
        """Length of ``axis`` (1 when absent)."""
        return self.shape[self.axes.index(axis)] if axis in self.axes else 1

    @property
    def height(self) -> int:
        """Rows of a plane."""
        return self.size("Y")

    @property
    def width(self) -> int:
        """Columns of a plane."""
        return self.size("X")

    @property
    def plane_axes(self) -> str:
        """The axes segmented one plane at a time, in file order (e.g. ``TZ``)."""
        return "".join(a for a in self.axes if a not in NON_PLANE)

    @property
    def plane_shape(self) -> tuple[int, ...]:
        """Lengths of :attr:`plane_axes`."""
        return tuple(self.size(a) for a in self.plane_axes)

    @property
    def planes(self) -> int:
        """How many 2-D planes."""
        return math.prod(self.plane_shape)

    @property
    def channel_axis(self) -> str | None:
        """``C`` if the image has channels, else ``S`` if it has samples (RGB), else None."""
        return "C" if "C" in self.axes else ("S" if "S" in self.axes else None)

    @property
    def channels(self) -> list[str]:
        """Names of the channels: OME names, colour names for RGB samples, else indices."""
        axis = self.channel_axis
        if axis is None:
            return ["0"]
        n = self.size(axis)
        if axis == "C" and self.channel_names and len(self.channel_names) == n:
            return list(self.channel_names)
        if axis == "S" and n <= len(SAMPLE_NAMES):
            return list(SAMPLE_NAMES[:n])
        return [str(i) for i in range(n)]

    def describe(self) -> str:
        """``axes ZCYX, shape (5, 2, 512, 512)`` for messages."""
        return f"axes {self.axes}, shape {self.shape}"


def _ome_details(xml: str | None) -> tuple[list[str] | None, PhysicalSize | None]:
    """Channel names and physical pixel size of the first OME image."""
    if not xml:
        return None, None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None, None
    pixels = next((el for el in root.iter() if el.tag.endswith("}Pixels")), None)
    if pixels is None:
        return None, None
    names = [
        ch.get("Name") or ch.get("ID") or str(i)
        for i, ch in enumerate(el for el in pixels if el.tag.endswith("}Channel"))
    ]

    def number(key: str) -> float | None:
        value = pixels.get(key)
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None

    x, y, z = number("PhysicalSizeX"), number("PhysicalSizeY"), number("PhysicalSizeZ")
    size = None
    if x is not None or y is not None:
        size = PhysicalSize(x, y, z, pixels.get("PhysicalSizeXUnit", "µm"))
    return (names or None), size


def read_layout(tif: tifffile.TiffFile, what: str = "image") -> TiffLayout:
    """The layout of an open TIFF, from its header and metadata only."""
    series = tif.series
    if not series or not tif.pages:
        raise InvalidImageError(f"the {what} is a TIFF without image data")
    first = series[0]
    names, size = _ome_details(tif.ome_metadata if tif.is_ome else None)
    axes, shape = str(first.axes), tuple(int(n) for n in first.shape)
    if len(series) > 1:
        shapes = {(tuple(s.shape), str(s.axes), np.dtype(s.dtype)) for s in series}
        if len(shapes) != 1 or any(a not in "YXS" for a in axes):
            listed = ", ".join(f"{tuple(s.shape)} {s.dtype}" for s in series[:8])
            raise InvalidImageError(
                f"the {what} is a TIFF with {len(series)} images of different shapes or "
                f"types ({listed}); send one image, or a stack whose planes share one shape"
            )
        axes, shape = "I" + axes, (len(series), *shape)
    return TiffLayout(
        axes=axes,
        shape=shape,
        dtype=np.dtype(first.dtype),
        ome=bool(tif.is_ome),
        channel_names=names,
        physical_size=size,
        series_count=len(series),
    )


def check_layout(layout: TiffLayout, max_pixels: int, what: str) -> None:
    """The whole stack's pixels (planes x height x width) against the limit, and the pixel
    type, before decoding."""
    h, w = layout.height, layout.width
    if h < 1 or w < 1 or layout.planes < 1:
        raise InvalidImageError(f"the {what} has no pixels ({w}x{h}; {layout.describe()})")
    if "Y" not in layout.axes or "X" not in layout.axes:
        raise InvalidImageError(f"the {what} has no 2-D planes ({layout.describe()})")
    total = layout.planes * h * w
    if total > max_pixels:
        stack = "" if layout.planes == 1 else f"a stack of {layout.planes} planes of "
        raise ImageTooLargeError(
            f"the {what} is {stack}{w}x{h} = {total:,} pixels ({layout.describe()}); this "
            f"service accepts at most {max_pixels:,} pixels per image, every plane of a stack "
            "counted (setting SEG_MAX_IMAGE_PIXELS)"
        )
    if layout.dtype.kind not in "uif" or layout.dtype.itemsize > 8:
        raise InvalidImageError(f"the {what} has pixel type {layout.dtype}, expected 8- or 16-bit")


def resolve_channel(
    layout: TiffLayout, channel: str | None, model_channels: int | None
) -> int | None:
    """Index along the channel (or sample) axis that ``channel`` names (an index or an OME
    name); None to keep every channel. A 422 listing the channels when ``channel`` is missing
    for a multi-channel image the model cannot take as it is, or names none of them."""
    axis = layout.channel_axis
    names = layout.channels
    listed = ", ".join(f"{i} ({n})" if n != str(i) else n for i, n in enumerate(names))
    n = len(names)
    if channel is None:
        if axis != "C" or n == 1 or model_channels in (None, n):
            return None  # grey, RGB (averaged for a grey model), or what the model takes
        raise InvalidParameterError(
            f"the image has {n} channels ({listed}; {layout.describe()}) and the model takes "
            f"{model_channels}: choose one with ?channel= (an index or a name, e.g. "
            f"channel={names[-1] if names[-1] != str(n - 1) else n - 1})"
        )
    if channel.isdigit():
        index = int(channel)
        if index < n:
            return index if axis is not None else None
    else:
        matches = [i for i, name in enumerate(names) if name == channel]
        matches = matches or [i for i, name in enumerate(names) if name.lower() == channel.lower()]
        if len(matches) == 1:
            return matches[0]
    raise InvalidParameterError(
        f"channel {channel!r} is not a channel of this image; it has {n}: {listed}"
    )


def _channel_pages(tif: tifffile.TiffFile, layout: TiffLayout, channel: int | None) -> list[int]:
    """The pages that hold the chosen channel's planes, in plane order, when every page of
    the series is one plane (OME-TIFF, ImageJ and shaped multi-page files); empty when the
    whole series has to be read. Reading only them keeps the other channels out of memory."""
    axes = layout.axes
    if channel is None or layout.channel_axis != "C" or layout.series_count > 1:
        return []
    if not (axes.endswith("YX") or axes.endswith("YXS")):
        return []
    lead_axes = axes[: axes.index("Y")]
    lead_shape = layout.shape[: len(lead_axes)]
    if "C" not in lead_axes or len(tif.series[0].pages) != math.prod(lead_shape):
        return []
    at = lead_axes.index("C")
    keys = []
    for position in np.ndindex(*layout.plane_shape):  # the lead axes but C, in file order
        index = [*position[:at], channel, *position[at:]]
        keys.append(int(np.ravel_multi_index(index, lead_shape)))
    return keys


def read_planes(
    tif: tifffile.TiffFile, layout: TiffLayout, channel: int | None, what: str = "image"
) -> np.ndarray:
    """The pixels as ``(planes, H, W, C)``: plane axes flattened in file order, the chosen
    channel (or every channel/sample) last."""
    pages = _channel_pages(tif, layout, channel)
    if pages:
        data = tif.asarray(key=pages, series=0).reshape(
            layout.planes, layout.height, layout.width, -1
        )
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            raise InvalidImageError(f"the {what} contains NaN or infinite values")
        return np.ascontiguousarray(data)
    if layout.series_count > 1:
        data = np.stack([s.asarray() for s in tif.series])
    else:
        data = tif.series[0].asarray()
    axes = layout.axes
    ch = layout.channel_axis
    order = layout.plane_axes + "YX" + (ch or "")
    data = np.transpose(data, [axes.index(a) for a in order])
    if ch is None:
        data = data[..., None]
    elif channel is not None:
        data = data[..., channel : channel + 1]
    data = data.reshape(layout.planes, layout.height, layout.width, data.shape[-1])
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise InvalidImageError(f"the {what} contains NaN or infinite values")
    return np.ascontiguousarray(data)
