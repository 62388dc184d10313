"""Decoding uploads (PNG, JPEG, TIFF; 8/16-bit; grayscale or RGB) and encoding mask PNGs.

The format is recognised from the file's first bytes, never from its name or content type, and
the image size is read from the header and checked against the pixel limit before any pixel is
decoded, so a small file that declares an enormous image is refused without allocating it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from service.exceptions import (
    ImageTooLargeError,
    InvalidImageError,
    InvalidParameterError,
    SegmentationInputError,
    UnsupportedFormatError,
)
from service.tiffstack import (
    PhysicalSize,
    check_layout,
    read_layout,
    read_planes,
    resolve_channel,
)

ACCEPTED = "PNG, JPEG or TIFF (8- or 16-bit, grayscale or RGB)"

# The service's own limit (``max_pixels``, SEG_MAX_IMAGE_PIXELS) is checked from the header before
# any pixel is decoded; Pillow's process-wide default (about 89 Mpx) would override it silently.
Image.MAX_IMAGE_PIXELS = None

_SIGNATURES: list[tuple[bytes, str]] = [
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
]
_OTHER_SIGNATURES: list[tuple[bytes, str]] = [
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"RIFF", "WebP/RIFF"),
    (b"%PDF", "PDF"),
    (b"PK\x03\x04", "ZIP"),
    (b"\x00\x00\x00\x0cjP", "JPEG 2000"),
]

# Class colours for multiclass masks (index 0, background, is black). Tableau-like, colour-blind
# friendly; the pixel values stay the class indices, the palette is only for looking.
PALETTE: list[tuple[int, int, int]] = [
    (0, 0, 0),
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]


@dataclass(frozen=True)
class DecodedImage:
    """Pixels as ``(H, W, C)`` plus what the file was, for the response and the logs."""

    pixels: np.ndarray
    format: str
    dtype: str
    mode: str
    channel: str | None = None  # the channel chosen with ``channel=`` (its name or index)
    physical_size: PhysicalSize | None = None  # from OME metadata

    @property
    def height(self) -> int:
        """Rows."""
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        """Columns."""
        return int(self.pixels.shape[1])


def sniff_format(head: bytes, what: str = "image") -> str:
    """``PNG``, ``JPEG`` or ``TIFF`` from the first bytes; :class:`UnsupportedFormatError` naming
    what arrived otherwise (``what`` says which upload: the image or the ground truth)."""
    for sig, name in _SIGNATURES:
        if head.startswith(sig):
            return name
    if not head:
        raise InvalidImageError(f"the uploaded {what} is an empty file")
    other = next((name for sig, name in _OTHER_SIGNATURES if head.startswith(sig)), None)
    arrived = f"a {other} file" if other else "bytes that are not an image this service reads"
    raise UnsupportedFormatError(f"unsupported {what} format: expected {ACCEPTED}, got {arrived}")


def _check_pixels(height: int, width: int, max_pixels: int, what: str) -> None:
    if height < 1 or width < 1:
        raise InvalidImageError(f"the {what} has no pixels ({width}x{height})")
    if height * width > max_pixels:
        raise ImageTooLargeError(
            f"the {what} is {width}x{height} = {height * width:,} pixels; this service accepts at "
            f"most {max_pixels:,} pixels per image (setting SEG_MAX_IMAGE_PIXELS)"
        )


def _decode_tiff(
    file: BinaryIO, max_pixels: int, what: str, channel: str | None, model_channels: int | None
) -> DecodedImage:
    try:
        # A name, because tifffile takes one from the stream and an upload's spooled temporary
        # file has none (None in memory, an int descriptor once rolled over to disk).
        with tifffile.TiffFile(file, name="upload.tif") as tif:
            layout = read_layout(tif, what)
            check_layout(layout, max_pixels, what)
            if layout.planes > 1:
                raise InvalidImageError(
                    f"the {what} is a multi-page TIFF, a stack of {layout.planes} planes "
                    f"({layout.describe()}); a stack is segmented plane by plane when its mask "
                    "is asked for as a multi-page TIFF (?format=tiff) or as JSON, with a ground "
                    "truth of the same shape"
                )
            index = resolve_channel(layout, channel, model_channels)
            pixels = read_planes(tif, layout, index, what)[0]
    except SegmentationInputError:
        raise
    except Exception as exc:  # tifffile raises many types for damaged files
        raise InvalidImageError(
            f"the {what} is a damaged or truncated TIFF ({type(exc).__name__})"
        ) from exc
    return DecodedImage(
        pixels=pixels,
        format="OME-TIFF" if layout.ome else "TIFF",
        dtype=str(pixels.dtype),
        mode=f"{pixels.shape[2]}ch",
        channel=None if index is None else layout.channels[index],
        physical_size=layout.physical_size,
    )


_PIL_MODES = {
    "1",
    "L",
    "LA",
    "P",
    "PA",
    "RGB",
    "RGBA",
    "CMYK",
    "YCbCr",
    "I;16",
    "I;16B",
    "I;16L",
    "I",
    "F",
}


def _decode_pillow(
    file: BinaryIO, fmt: str, max_pixels: int, what: str, labels: bool
) -> DecodedImage:
    try:
        img: Image.Image = Image.open(file)
        _check_pixels(img.height, img.width, max_pixels, what)
        frames = int(getattr(img, "n_frames", 1))
        if frames > 1:
            raise InvalidImageError(f"the {what} is animated ({frames} frames); send one frame")
        mode = img.mode
        if mode not in _PIL_MODES:
            raise InvalidImageError(f"the {what} has colour mode {mode}, expected grayscale or RGB")
        img.load()
    except SegmentationInputError:
        raise
    except Image.DecompressionBombError as exc:  # only if someone re-enabled Pillow's limit
        raise ImageTooLargeError(
            f"the {what} declares more pixels than this service accepts"
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(f"the {what} is a damaged or truncated {fmt}") from exc
    # Drop alpha, resolve palettes and CMYK to plain grey or RGB; keep 16-bit as uint16. A label
    # image keeps its palette indices: they are the labels, the colours are only for looking.
    if labels and mode in ("P", "PA"):
        img = img.getchannel(0)
    elif mode in ("1", "LA"):
        img = img.convert("L")
    elif mode in ("P", "PA") or mode in ("RGBA", "CMYK", "YCbCr"):
        img = img.convert("RGB")
    pixels = _pillow_pixels(img)
    del img  # Pillow's own copy of the pixels: freed before anything else is allocated
    if mode == "I" and pixels.size and pixels.min() >= 0 and pixels.max() < 65536:
        pixels = pixels.astype(np.uint16)  # 16-bit greyscale that Pillow widened to int32
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    return DecodedImage(pixels=pixels, format=fmt, dtype=str(pixels.dtype), mode=mode)


# Rows copied out of a Pillow image at a time: ~16 MiB for a 16384-wide 8-bit RGB image.
_COPY_ROWS = 256


def _pillow_pixels(img: Image.Image) -> np.ndarray:
    """A decoded Pillow image as an array, copied a band of rows at a time.

    ``np.asarray(img)`` goes through ``img.tobytes()``: for a moment the pixels exist three
    times (Pillow's buffer, the bytes, the array), 3x the decoded size at the peak of a request.
    Band by band it is twice, and the band.
    """
    first = np.asarray(img.crop((0, 0, img.width, min(img.height, _COPY_ROWS))))
    pixels = np.empty((img.height, *first.shape[1:]), first.dtype)
    pixels[: first.shape[0]] = first
    for top in range(first.shape[0], img.height, _COPY_ROWS):
        bottom = min(img.height, top + _COPY_ROWS)
        pixels[top:bottom] = np.asarray(img.crop((0, top, img.width, bottom)))
    return pixels


def _png_is_16bit_colour(head: bytes) -> bool:
    """16-bit RGB, RGBA or grey+alpha PNG (from IHDR): Pillow would keep only the high byte."""
    return len(head) >= 26 and head[12:16] == b"IHDR" and head[24] == 16 and head[25] in (2, 4, 6)


def header_size(file: BinaryIO) -> tuple[int, int] | None:
    """``(height, width)`` of one plane from the file's header, without decoding a pixel; None
    when the header cannot be read (the decoder then says what is wrong with the file)."""
    file.seek(0)
    head = file.read(32)
    file.seek(0)
    try:
        fmt = sniff_format(head)
        if fmt == "TIFF":
            with tifffile.TiffFile(file, name="upload.tif") as tif:
                page = tif.pages.first
                return int(page.imagelength), int(page.imagewidth)
        with Image.open(file) as img:
            return int(img.height), int(img.width)
    except Exception:  # damaged, truncated, not an image: the decoder's message is the answer
        return None
    finally:
        file.seek(0)


def decode_image(
    file: BinaryIO,
    *,
    max_pixels: int,
    what: str = "image",
    labels: bool = False,
    channel: str | None = None,
    model_channels: int | None = None,
) -> DecodedImage:
    """Decode an uploaded file (seekable binary) into ``(H, W, C)`` pixels.

    The one decoder of the project: the service's uploads and the training data go through it.
    With ``labels`` (ground truths, training masks) palette images give their indices. A TIFF
    with several channels gives the one ``channel`` names (index or OME name); without it, all
    of them when they are ``model_channels`` (or that is None), else a 422 listing them.

    Raises an :class:`~service.exceptions.SegmentationInputError` (unsupported format, invalid
    image, too large) with a message that says what was expected and what arrived.
    """
    file.seek(0)
    head = file.read(32)
    file.seek(0)
    fmt = sniff_format(head, what)
    if fmt == "PNG" and _png_is_16bit_colour(head):
        raise InvalidImageError(
            f"the {what} is a 16-bit colour PNG, which this service cannot read without losing "
            "precision (its decoder keeps 8 bits per colour sample); send it as a 16-bit TIFF, "
            "or as a 16-bit grayscale PNG"
        )
    if fmt == "TIFF":
        return _decode_tiff(file, max_pixels, what, channel, model_channels)
    if channel is not None and channel != "0":
        raise InvalidParameterError(
            f"channel={channel!r} applies to multi-channel TIFF images; the {what} is a {fmt}"
        )
    return _decode_pillow(file, fmt, max_pixels, what, labels)


@dataclass(frozen=True)
class ImageHeader:
    """What an upload declares, read without decoding a pixel: enough to estimate its cost."""

    format: str
    width: int
    height: int
    channels: int
    nbytes: int  # the decoded pixels, all planes and samples
    file_bytes: int = 0  # the file as uploaded
    planes: int = 1  # Z/T planes of a stack, each segmented on its own

    @property
    def pixels(self) -> int:
        """Pixels of one plane."""
        return self.width * self.height

    @property
    def decode_peak(self) -> int:
        """Memory the decoder holds at its peak: Pillow's buffer beside the array it is copied
        to (:func:`_pillow_pixels`); tifffile decodes into the array, reading the compressed
        data beside it."""
        return self.nbytes + (self.file_bytes if self.format == "TIFF" else self.nbytes)


# Bytes per pixel of Pillow's modes once decoded (after the conversions _decode_pillow makes).
_PIL_PIXEL_BYTES = {"I;16": 2, "I;16B": 2, "I;16L": 2, "I": 4, "F": 4, "L": 1, "1": 1, "P": 3}


def read_header(file: BinaryIO, *, what: str = "image") -> ImageHeader:
    """The size an uploaded file declares, from its header alone; the file is left at 0.

    Raises what :func:`decode_image` would for a file that is not an image it reads, so a bad
    upload is refused before anything is estimated or reserved for it.
    """
    file.seek(0)
    fmt = sniff_format(file.read(32), what)
    file_bytes = file.seek(0, 2)
    file.seek(0)
    try:
        if fmt == "TIFF":
            with tifffile.TiffFile(file, name="upload.tif") as tif:
                if not tif.series:
                    raise InvalidImageError(f"the {what} is a TIFF without image data")
                series = tif.series[0]
                shape = tuple(int(n) for n in series.shape)
                nbytes = int(np.prod(shape)) * np.dtype(series.dtype).itemsize
            samples_last = len(shape) == 3 and shape[-1] in (1, 3, 4)
            height, width = shape[-3:-1] if samples_last else shape[-2:]
            channels = shape[-1] if samples_last else 1
            if len(shape) == 3 and not samples_last and shape[0] in (1, 3, 4):
                height, width, channels = shape[1], shape[2], shape[0]
            planes = max(1, int(np.prod(shape)) // max(1, int(width * height * channels)))
            return ImageHeader(
                fmt, int(width), int(height), int(channels), nbytes, file_bytes, planes
            )
        with Image.open(file) as img:
            per_pixel = _PIL_PIXEL_BYTES.get(img.mode, 3)
            channels = 1 if per_pixel in (1, 2) or img.mode in ("I", "F") else 3
            nbytes = img.width * img.height * per_pixel
            return ImageHeader(fmt, img.width, img.height, channels, nbytes, file_bytes)
    except SegmentationInputError:
        raise
    except Exception as exc:  # damaged headers: the same answer decoding would give
        raise InvalidImageError(f"the {what} is a damaged or truncated {fmt}") from exc
    finally:
        file.seek(0)


def to_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """Match the model's channel count: RGB to grey by channel mean, grey to RGB by repetition."""
    have = pixels.shape[2]
    if have == channels:
        return pixels
    if channels == 1 and have in (3, 4):
        return pixels[..., :3].mean(axis=2, dtype=np.float32)[..., None].astype(pixels.dtype)
    if channels == 3 and have == 1:
        return np.repeat(pixels, 3, axis=2)
    if have == 4 and channels == 3:
        return pixels[..., :3]
    raise InvalidImageError(
        f"the model takes {channels}-channel images, the image has {have} channels"
    )


def encode_png(mask: np.ndarray, *, palette: bool = False) -> bytes:
    """Single-channel uint8 PNG; with ``palette`` the class indices are shown in colour."""
    pixels = np.ascontiguousarray(mask, dtype=np.uint8)
    # frombuffer shares the array's memory ("L" raw, stride 0 = packed rows) where fromarray
    # would copy it: one mask-sized allocation less on gigapixel images.
    img = Image.frombuffer("L", (pixels.shape[1], pixels.shape[0]), pixels, "raw", "L", 0, 1)
    if palette:
        # putpalette turns an "L" image into "P" and keeps the pixel values (the class indices).
        flat = [c for rgb in PALETTE for c in rgb]
        img.putpalette(flat + [255] * (768 - len(flat)))
    buf = io.BytesIO()
    # Masks are mostly runs of equal values: the fastest zlib level compresses them nearly as
    # well as the slowest and keeps encoding a small share of the request on gigapixel images.
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
