"""Reading uploads (PNG, JPEG, TIFF and its stacks; 8/16-bit; grayscale or RGB) and encoding
mask PNGs.

An upload is read in two steps: :func:`probe` reads what its header declares (format, size,
planes, channels, bytes once decoded) without decoding a pixel, so limits and budgets are
checked first; :func:`decode` then decodes the planes as ``(N, H, W, C)``. The format is
recognised from the file's first bytes, never from its name or content type.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from service.segmentation.errors import (
    ImageTooLargeError,
    InvalidImageError,
    InvalidParameterError,
    SegmentationInputError,
    UnsupportedFormatError,
)
from service.segmentation.tiff import (
    PhysicalSize,
    TiffLayout,
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
class ImageHeader:
    """What an upload declares, read without decoding a pixel: enough to check it against the
    limits and to estimate its cost."""

    format: str  # PNG, JPEG or TIFF
    width: int
    height: int
    channels: int  # samples per pixel in the file (every channel of a multi-channel TIFF)
    nbytes: int  # the decoded pixels, all planes and samples
    file_bytes: int = 0  # the file as uploaded
    planes: int = 1  # Z/T planes of a stack, each segmented on its own
    layout: TiffLayout | None = None  # TIFF: axes, shape, OME channel names and pixel size
    mode: str = ""  # Pillow's mode (PNG, JPEG)

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

    def describe(self) -> str:
        """``axes ZYX, shape (3, 512, 512)`` (or ``640x480``) for messages."""
        if self.layout is not None:
            return self.layout.describe()
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class ImageFacts:
    """What a decoded upload was, without its pixels: what an answer reports about it."""

    format: str
    dtype: str
    mode: str
    width: int
    height: int
    planes: int
    channels: int  # channels segmented (after ``channel=``)
    channel: str | None = None
    physical_size: PhysicalSize | None = None
    layout: TiffLayout | None = None


@dataclass(frozen=True)
class DecodedImage:
    """Planes ``(N, H, W, C)`` (N = 1 for a 2-D image) plus what the file was, for the response
    and the logs."""

    planes: np.ndarray
    format: str
    dtype: str
    mode: str
    channel: str | None = None  # the channel chosen with ``channel=`` (its name or index)
    physical_size: PhysicalSize | None = None  # from OME metadata
    layout: TiffLayout | None = None

    @property
    def pixels(self) -> np.ndarray:
        """The ``(H, W, C)`` pixels of the first (for a 2-D image, the only) plane."""
        return self.planes[0]

    def facts(self) -> ImageFacts:
        """What the upload was, to be reported once the pixels are gone."""
        n, h, w, c = self.planes.shape
        return ImageFacts(
            self.format,
            self.dtype,
            self.mode,
            w,
            h,
            n,
            c,
            self.channel,
            self.physical_size,
            self.layout,
        )

    @property
    def height(self) -> int:
        """Rows of a plane."""
        return int(self.planes.shape[1])

    @property
    def width(self) -> int:
        """Columns of a plane."""
        return int(self.planes.shape[2])


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


def _png_is_16bit_colour(head: bytes) -> bool:
    """16-bit RGB, RGBA or grey+alpha PNG (from IHDR): Pillow would keep only the high byte."""
    return len(head) >= 26 and head[12:16] == b"IHDR" and head[24] == 16 and head[25] in (2, 4, 6)


# Bytes per pixel of Pillow's modes once decoded (after the conversions _decode_pillow makes).
_PIL_PIXEL_BYTES = {"I;16": 2, "I;16B": 2, "I;16L": 2, "I": 4, "F": 4, "L": 1, "1": 1, "P": 3}


def _probe_tiff(file: BinaryIO, what: str, file_bytes: int) -> ImageHeader:
    # A name, because tifffile takes one from the stream and an upload's spooled temporary
    # file has none (None in memory, an int descriptor once rolled over to disk).
    with tifffile.TiffFile(file, name="upload.tif") as tif:
        layout = read_layout(tif, what)  # every series: same-shaped 2-D series are one stack
    axis = layout.channel_axis
    channels = layout.size(axis) if axis is not None else 1
    nbytes = math.prod(layout.shape) * layout.dtype.itemsize
    return ImageHeader(
        "TIFF",
        layout.width,
        layout.height,
        channels,
        nbytes,
        file_bytes,
        layout.planes,
        layout=layout,
    )


def probe(file: BinaryIO, *, what: str = "image") -> ImageHeader:
    """What an uploaded file declares, from its header alone; the file is left at 0.

    Raises what decoding would for a file that is not an image this service reads (an
    :class:`~service.segmentation.errors.SegmentationInputError`), so a bad upload is refused
    before anything is estimated, reserved or decoded for it.
    """
    file.seek(0)
    head = file.read(32)
    fmt = sniff_format(head, what)
    file_bytes = file.seek(0, 2)
    file.seek(0)
    if fmt == "PNG" and _png_is_16bit_colour(head):
        raise InvalidImageError(
            f"the {what} is a 16-bit colour PNG, which this service cannot read without losing "
            "precision (its decoder keeps 8 bits per colour sample); send it as a 16-bit TIFF, "
            "or as a 16-bit grayscale PNG"
        )
    try:
        if fmt == "TIFF":
            return _probe_tiff(file, what, file_bytes)
        with Image.open(file) as img:
            per_pixel = _PIL_PIXEL_BYTES.get(img.mode, 3)
            channels = 1 if per_pixel in (1, 2) or img.mode in ("I", "F") else 3
            nbytes = img.width * img.height * per_pixel
            return ImageHeader(
                fmt, img.width, img.height, channels, nbytes, file_bytes, mode=img.mode
            )
    except SegmentationInputError:
        raise
    except Exception as exc:  # damaged headers: the same answer decoding would give
        raise InvalidImageError(f"the {what} is a damaged or truncated {fmt}") from exc
    finally:
        file.seek(0)


def _check_pixels(height: int, width: int, max_pixels: int, what: str) -> None:
    if height < 1 or width < 1:
        raise InvalidImageError(f"the {what} has no pixels ({width}x{height})")
    if height * width > max_pixels:
        raise ImageTooLargeError(
            f"the {what} is {width}x{height} = {height * width:,} pixels; this service accepts at "
            f"most {max_pixels:,} pixels per image (setting SEG_MAX_IMAGE_PIXELS)"
        )


def check_pixels(header: ImageHeader, max_pixels: int, what: str = "image") -> None:
    """Every plane's pixels together against ``max_pixels`` (413), and a pixel type the
    service reads (422), from the header."""
    if header.layout is not None:
        check_layout(header.layout, max_pixels, what)
    else:
        _check_pixels(header.height, header.width, max_pixels, what)


def choose_channel(
    header: ImageHeader, channel: str | None, model_channels: int | None, what: str = "image"
) -> int | None:
    """The channel ``channel`` names (an index or an OME name) in a multi-channel TIFF, None
    for every channel; a 422 naming the channels when the choice is missing or wrong (see
    :func:`~service.segmentation.tiff.resolve_channel`)."""
    if header.layout is not None:
        return resolve_channel(header.layout, channel, model_channels)
    if channel is not None and channel != "0":
        raise InvalidParameterError(
            f"channel={channel!r} applies to multi-channel TIFF images; the {what} is a "
            f"{header.format}"
        )
    return None


def _decode_tiff(
    file: BinaryIO, header: ImageHeader, what: str, channel: int | None
) -> DecodedImage:
    layout = header.layout
    assert layout is not None
    try:
        with tifffile.TiffFile(file, name="upload.tif") as tif:
            planes = read_planes(tif, layout, channel, what)
    except SegmentationInputError:
        raise
    except Exception as exc:  # tifffile raises many types for damaged files
        raise InvalidImageError(
            f"the {what} is a damaged or truncated TIFF ({type(exc).__name__})"
        ) from exc
    return DecodedImage(
        planes=planes,
        format="OME-TIFF" if layout.ome else "TIFF",
        dtype=str(planes.dtype),
        mode=f"{planes.shape[3]}ch",
        channel=None if channel is None else layout.channels[channel],
        physical_size=layout.physical_size,
        layout=layout,
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


def _decode_pillow(file: BinaryIO, fmt: str, what: str, labels: bool) -> DecodedImage:
    try:
        img: Image.Image = Image.open(file)
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
    return DecodedImage(planes=pixels[None], format=fmt, dtype=str(pixels.dtype), mode=mode)


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


def decode(
    file: BinaryIO,
    header: ImageHeader,
    *,
    what: str = "image",
    labels: bool = False,
    channel: int | None = None,
) -> DecodedImage:
    """Decode the planes of an upload that :func:`probe` read as ``header`` (and that passed
    :func:`check_pixels`): ``(N, H, W, C)``, the ``channel`` of :func:`choose_channel` or every
    channel. With ``labels`` (ground truths, training masks) palette images give their indices.

    Raises an :class:`~service.segmentation.errors.SegmentationInputError` (invalid image)
    with a message that says what was expected and what arrived.
    """
    file.seek(0)
    if header.format == "TIFF":
        return _decode_tiff(file, header, what, channel)
    return _decode_pillow(file, header.format, what, labels)


def decode_image(
    file: BinaryIO, *, max_pixels: int, what: str = "image", labels: bool = False
) -> DecodedImage:
    """Decode one 2-D image (``.pixels`` is ``(H, W, C)``, every channel): probe, check,
    decode. The one decoder of the training data and of in-process callers; a stack is refused
    with a message saying how the service takes it.
    """
    header = probe(file, what=what)
    check_pixels(header, max_pixels, what)
    if header.planes > 1:
        assert header.layout is not None
        raise InvalidImageError(
            f"the {what} is a multi-page TIFF, a stack of {header.planes} planes "
            f"({header.describe()}); a stack is segmented plane by plane when its mask "
            "is asked for as a multi-page TIFF (?format=tiff) or as JSON, with a ground "
            "truth of the same shape"
        )
    return decode(file, header, what=what, labels=labels)


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


# Mask rows compressed per call to zlib: bounds the extra memory of a gigapixel mask to a block.
PNG_BLOCK_ROWS = 256
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(pixels: np.ndarray, *, palette: bool = False) -> bytes:
    """Single-channel PNG: 16-bit for a uint16 image (instance labels), else 8-bit; with
    ``palette`` the class indices are shown in colour.

    Written here, not by Pillow: masks and labels are runs of equal values, so rows go into
    zlib's run-length strategy, 8-bit rows unfiltered and 16-bit ones through PNG's Sub filter
    (run-length matching sees only repeated bytes, and Sub turns a repeated 16-bit value into
    zero bytes). Pillow tries five filters on every row before deflating; a 4096² nucleus mask
    took 85 ms for 365 KB there against 24 ms for 236 KB here, its labels 164 ms for 435 KB
    against 60 ms for 424 KB (bench/NOTES.md). Rows are compressed a block at a time, so no
    second image-sized buffer is made on gigapixel images."""
    wide = pixels.dtype == np.uint16
    if not wide:
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    if pixels.ndim != 2 or 0 in pixels.shape:
        raise ValueError(f"expected a non-empty (H, W) image, got shape {pixels.shape}")
    if wide and palette:
        raise ValueError("a palette PNG holds 8-bit class indices, got a uint16 image")
    height, width = pixels.shape
    step = pixels.itemsize  # bytes per pixel: the distance Sub subtracts over
    kind = 3 if palette else 0  # PNG colour type: palette or grey
    chunks = [
        _PNG_SIGNATURE,
        # width, height, bit depth, colour type; deflate; adaptive filtering; no interlace
        _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8 * step, kind, 0, 0, 0)),
    ]
    if palette:
        flat = [c for rgb in PALETTE for c in rgb]
        chunks.append(_png_chunk(b"PLTE", bytes(flat + [255] * (768 - len(flat)))))
    deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 15, 8, zlib.Z_RLE)
    rows = np.zeros((min(PNG_BLOCK_ROWS, height), width * step + 1), np.uint8)
    rows[:, 0] = 1 if wide else 0  # each row's filter type: Sub or None
    data = []
    for start in range(0, height, PNG_BLOCK_ROWS):
        block = pixels[start : start + PNG_BLOCK_ROWS]
        n = len(block)
        if wide:
            # Big-endian bytes, as PNG stores them, through Sub: each byte less the one a pixel
            # before it (uint8 arithmetic wraps, as PNG's does).
            block = np.ascontiguousarray(block, dtype=">u2").view(np.uint8).reshape(n, -1)
            rows[:n, 1 : 1 + step] = block[:, :step]
            np.subtract(block[:, step:], block[:, :-step], out=rows[:n, 1 + step :])
        else:
            rows[:n, 1:] = block
        data.append(deflate.compress(rows[:n].data))
    data.append(deflate.flush())
    chunks += [_png_chunk(b"IDAT", b"".join(data)), _png_chunk(b"IEND", b"")]
    return b"".join(chunks)
