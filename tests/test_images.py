"""Decoding uploads and encoding masks (service/segmentation/images.py) on real files."""

from __future__ import annotations

import io
import struct
import tempfile
import tracemalloc
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image

from service.api.problems import ApiError, api_error
from service.segmentation.errors import SegmentationInputError
from service.segmentation.images import (
    PALETTE,
    PNG_BLOCK_ROWS,
    decode_image,
    encode_png,
    to_channels,
)
from tests.conftest import jpeg_bytes, png_bytes, tiff_bytes

LIMIT = 16384 * 16384
RNG = np.random.default_rng(42)
GREY8 = RNG.integers(0, 256, (37, 53), dtype=np.uint8)
GREY16 = RNG.integers(0, 65536, (37, 53), dtype=np.uint16)
RGB8 = RNG.integers(0, 256, (37, 53, 3), dtype=np.uint8)
RGB16 = RNG.integers(0, 65536, (37, 53, 3), dtype=np.uint16)


def decode(data: bytes, max_pixels: int = LIMIT):
    return decode_image(io.BytesIO(data), max_pixels=max_pixels)


RETRY_AFTER = 5  # the service's default Retry-After, which no input error uses


def answer(exc: Exception) -> ApiError:
    """What the API answers for ``exc``."""
    return api_error(exc, RETRY_AFTER)


def refused(data: bytes, max_pixels: int = LIMIT) -> ApiError:
    """What the API answers for ``data`` that the decoder refuses."""
    with pytest.raises(SegmentationInputError) as info:
        decode(data, max_pixels)
    return answer(info.value)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A small, well-formed PNG whose header declares ``width`` x ``height`` grey pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + _chunk(b"IEND", b"")
    )


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small JPEG with its frame header patched to declare ``width`` x ``height``."""
    data = bytearray(jpeg_bytes(np.zeros((8, 8), np.uint8)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def tiff_declaring(width: int, height: int) -> bytes:
    """A minimal little-endian TIFF whose one IFD declares ``width`` x ``height`` uint8 pixels."""
    entries = [
        (256, 4, width),  # ImageWidth
        (257, 4, height),  # ImageLength
        (258, 3, 8),  # BitsPerSample
        (259, 3, 1),  # Compression: none
        (262, 3, 1),  # Photometric: min-is-black
        (273, 4, 8),  # StripOffsets
        (277, 3, 1),  # SamplesPerPixel
        (278, 4, height),  # RowsPerStrip
        (279, 4, 16),  # StripByteCounts
    ]
    out = b"II*\x00" + struct.pack("<I", 24) + b"\0" * 16 + struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, kind, 1) + packed
    return out + struct.pack("<I", 0)


# --- what decodes, and how exactly ------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected", "fmt"),
    [
        (png_bytes(GREY8), GREY8, "PNG"),
        (png_bytes(GREY16), GREY16, "PNG"),
        (png_bytes(RGB8), RGB8, "PNG"),
        (tiff_bytes(GREY8), GREY8, "TIFF"),
        (tiff_bytes(GREY16), GREY16, "TIFF"),
        (tiff_bytes(RGB8, photometric="rgb"), RGB8, "TIFF"),
        (tiff_bytes(RGB16, photometric="rgb"), RGB16, "TIFF"),
        (tiff_bytes(GREY16, compression="zlib"), GREY16, "TIFF"),
        (tiff_bytes(GREY16, bigtiff=True), GREY16, "TIFF"),
        (tiff_bytes(GREY16.astype(">u2"), byteorder=">"), GREY16, "TIFF"),
        (
            tiff_bytes(np.moveaxis(RGB8, -1, 0), photometric="rgb", planarconfig="separate"),
            RGB8,
            "TIFF",
        ),
    ],
    ids=[
        "png-grey8",
        "png-grey16",
        "png-rgb8",
        "tiff-grey8",
        "tiff-grey16",
        "tiff-rgb8",
        "tiff-rgb16",
        "tiff-zlib",
        "bigtiff",
        "tiff-big-endian",
        "tiff-planar-rgb",
    ],
)
def test_lossless_formats_keep_every_value_and_dtype(
    data: bytes, expected: np.ndarray, fmt: str
) -> None:
    decoded = decode(data)
    want = expected if expected.ndim == 3 else expected[..., None]
    assert decoded.format == fmt
    assert decoded.pixels.shape == want.shape
    assert decoded.pixels.dtype == want.dtype  # 16-bit stays uint16, never scaled to 8 bits
    np.testing.assert_array_equal(decoded.pixels, want)
    assert (decoded.height, decoded.width) == GREY8.shape
    assert decoded.dtype == str(want.dtype)


@pytest.mark.parametrize("channels", [0, 3], ids=["grey", "rgb"])
def test_jpeg_decodes_to_uint8_close_to_the_original(channels: int) -> None:
    ramp = np.add.outer(np.arange(40) * 2, np.arange(60) * 3).astype(np.uint8)  # smooth
    smooth = np.dstack([ramp, ramp[::-1], 255 - ramp]) if channels else ramp
    decoded = decode(jpeg_bytes(smooth, quality=95))
    assert decoded.format == "JPEG"
    assert decoded.pixels.dtype == np.uint8
    assert decoded.pixels.shape == (40, 60, channels or 1)
    diff = np.abs(decoded.pixels.astype(np.int16) - smooth.reshape(decoded.pixels.shape))
    assert diff.mean() < 3


def test_float32_tiff_is_kept_as_float() -> None:
    values = np.array([[0.0, 0.25], [1.5, -3.0]], np.float32)
    decoded = decode(tiff_bytes(values))
    assert decoded.pixels.dtype == np.float32
    np.testing.assert_array_equal(decoded.pixels[..., 0], values)


def test_png_alpha_and_palette_become_plain_rgb() -> None:
    rgba = np.dstack([RGB8, np.full(GREY8.shape, 7, np.uint8)])
    decoded = decode(png_bytes(rgba))
    np.testing.assert_array_equal(decoded.pixels, RGB8)
    pal = Image.fromarray(RGB8).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    decoded = decode(buf.getvalue())
    assert decoded.pixels.shape == (*GREY8.shape, 3)
    np.testing.assert_array_equal(decoded.pixels, np.asarray(pal.convert("RGB")))


@pytest.mark.parametrize("rolled_to_disk", [False, True], ids=["in-memory", "on-disk"])
@pytest.mark.parametrize(
    "data",
    [png_bytes(GREY16), jpeg_bytes(GREY8), tiff_bytes(GREY16)],
    ids=["png", "jpeg", "tiff"],
)
def test_uploads_spooled_to_a_temporary_file_decode(data: bytes, rolled_to_disk: bool) -> None:
    """What an upload really is: a SpooledTemporaryFile (no name, or an int fd on disk)."""
    with tempfile.SpooledTemporaryFile(max_size=16 if rolled_to_disk else 1 << 20) as f:
        f.write(data)
        assert f._rolled is rolled_to_disk
        decoded = decode_image(f, max_pixels=LIMIT)  # type: ignore[arg-type]
    assert decoded.pixels.shape == (*GREY8.shape, 1)
    if decoded.format != "JPEG":
        np.testing.assert_array_equal(decoded.pixels[..., 0], GREY16)


def test_decoding_reads_from_the_start_of_the_file_whatever_its_position() -> None:
    f = io.BytesIO(png_bytes(GREY8))
    f.seek(0, io.SEEK_END)
    np.testing.assert_array_equal(decode_image(f, max_pixels=LIMIT).pixels[..., 0], GREY8)


# --- refused: wrong format (415) ---------------------------------------------------------------


def _pillow(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(RGB8).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "arrived"),
    [
        (_pillow("GIF"), "GIF"),
        (_pillow("BMP"), "BMP"),
        (_pillow("WEBP"), "WebP"),
        (b"%PDF-1.7\n" + b"x" * 100, "PDF"),
        (b"\x13\x37not an image at all" * 10, "not an image"),
        (b"<html><body>hello</body></html>", "not an image"),
    ],
    ids=["gif", "bmp", "webp", "pdf", "random", "html"],
)
def test_other_formats_are_415_naming_what_arrived(data: bytes, arrived: str) -> None:
    err = refused(data)
    assert err.status == 415
    assert err.code == "unsupported_media_type"
    assert arrived in err.message
    assert "PNG, JPEG or TIFF" in err.message


@pytest.mark.parametrize(
    ("data", "status"), [(_pillow("GIF"), 415), (b"", 422), (png_bytes(GREY8)[:50], 422)]
)
def test_errors_say_which_upload_was_wrong(data: bytes, status: int) -> None:
    with pytest.raises(SegmentationInputError) as info:
        decode_image(io.BytesIO(data), max_pixels=LIMIT, what="ground truth")
    assert answer(info.value).status == status
    assert "ground truth" in info.value.message


# --- refused: unusable images (422) -------------------------------------------------------------


def _two_page_tiff() -> bytes:
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tw:
        tw.write(GREY8)
        tw.write(GREY8)
    return buf.getvalue()


def _animated_png() -> bytes:
    frames = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (0, 100, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:])
    return buf.getvalue()


_PNG, _JPEG, _TIFF = png_bytes(RGB8), jpeg_bytes(RGB8), tiff_bytes(GREY16)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"", "empty"),
        (_PNG[:8], "PNG"),
        (_PNG[:40], "PNG"),
        (_PNG[: len(_PNG) // 2], "truncated PNG"),
        (_JPEG[:3], "JPEG"),
        (_JPEG[: len(_JPEG) // 2], "truncated JPEG"),
        (_TIFF[:8], "TIFF"),
        (_TIFF[:20], "TIFF"),
        (_TIFF[: len(_TIFF) // 2], "truncated TIFF"),
        (_two_page_tiff(), "multi-page"),
        (tiff_bytes(np.zeros((5, 16, 16), np.uint8)), "multi-page"),
        (_animated_png(), "animated"),
        (tiff_bytes(np.array([[1.0, np.nan]], np.float32)), "NaN"),
        (tiff_bytes(np.array([[1.0, np.inf]], np.float32)), "infinite"),
        (tiff_bytes(np.zeros((4, 4), bool)), "pixel type"),
    ],
    ids=[
        "empty",
        "png-signature-only",
        "png-cut-in-header",
        "png-cut-in-data",
        "jpeg-marker-only",
        "jpeg-cut-in-data",
        "tiff-header-only",
        "tiff-cut-in-ifd",
        "tiff-cut-in-data",
        "tiff-two-pages",
        "tiff-stack",
        "apng",
        "tiff-nan",
        "tiff-inf",
        "tiff-bool",
    ],
)
def test_unusable_images_are_422_saying_why(data: bytes, says: str) -> None:
    err = refused(data)
    assert err.status == 422, err.message
    assert err.code == "invalid_image"
    assert says in err.message


# --- refused: too large (413), from the header, without allocating ---------------------------


@pytest.mark.parametrize(
    "data",
    [
        png_declaring(100_000, 100_000),
        jpeg_declaring(60_000, 60_000),
        tiff_declaring(100_000, 100_000),
    ],
    ids=["png", "jpeg", "tiff"],
)
def test_decompression_bomb_is_413_from_the_header(data: bytes) -> None:
    assert len(data) < 2000
    tracemalloc.start()
    try:
        err = refused(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.status == 413
    assert err.code == "too_large"
    assert "pixels" in err.message
    assert peak < 16 << 20  # nowhere near the 3.6-10 GB the header asks for


@pytest.mark.parametrize(
    "data",
    [png_bytes(GREY8), jpeg_bytes(GREY8), tiff_bytes(GREY8), tiff_bytes(RGB8, photometric="rgb")],
    ids=["png", "jpeg", "tiff", "tiff-rgb"],
)
def test_max_pixels_is_enforced_exactly(data: bytes) -> None:
    pixels = GREY8.size
    assert decode(data, max_pixels=pixels).pixels.shape[:2] == GREY8.shape
    err = refused(data, max_pixels=pixels - 1)
    assert err.status == 413
    assert f"{pixels:,}" in err.message and f"{pixels - 1:,}" in err.message


def test_pixel_limit_above_pillows_own_default_is_honoured() -> None:
    """Pillow refuses images over ~89 Mpx by default; the service's configured limit rules."""
    side = 9600  # 92 Mpx: over Pillow's warning threshold, under the service's default limit
    data = png_bytes(np.zeros((side, side), np.uint8), compress_level=9)
    assert decode(data).pixels.shape == (side, side, 1)
    err = refused(png_declaring(20_000, 20_000))  # 400 Mpx: over the service's limit
    assert err.status == 413
    assert f"{LIMIT:,}" in err.message


# --- channels and encoding ------------------------------------------------------------------


def test_to_channels_matches_the_model() -> None:
    grey = np.array([[[10], [20]]], np.uint8)
    np.testing.assert_array_equal(to_channels(grey, 3), np.repeat(grey, 3, axis=2))
    rgb = np.array([[[10, 20, 30], [0, 0, 255]]], np.uint8)
    assert to_channels(rgb, 1).dtype == np.uint8
    np.testing.assert_array_equal(to_channels(rgb, 1)[..., 0], [[20, 85]])
    with pytest.raises(SegmentationInputError) as info:
        to_channels(np.zeros((2, 2, 2), np.uint8), 3)
    assert answer(info.value).status == 422


@pytest.mark.parametrize("shape", [(1, 1), (3, 500), (64, 65), (PNG_BLOCK_ROWS * 2 + 3, 70)])
def test_encode_png_round_trips_a_binary_mask(shape: tuple[int, int]) -> None:
    mask = (RNG.random(shape) > 0.5).astype(np.uint8) * 255
    img = Image.open(io.BytesIO(encode_png(mask)))
    assert img.format == "PNG" and img.mode == "L" and img.size == (shape[1], shape[0])
    np.testing.assert_array_equal(np.asarray(img), mask)
    # and the service reads its own output back
    np.testing.assert_array_equal(decode(encode_png(mask)).pixels[..., 0], mask)


def test_encode_png_round_trips_16_bit_labels() -> None:
    """Instance labels as 16-bit grey, the full id range, runs and single pixels, over more
    than one block of rows: every reader gets the ids back."""
    labels = np.repeat(RNG.integers(0, 65536, (PNG_BLOCK_ROWS + 7, 40), dtype=np.uint16), 3, 1)
    labels[::5, ::7] = 65535
    png = encode_png(labels)
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.mode.startswith("I;16") and img.size == (120, 263)
    np.testing.assert_array_equal(np.asarray(img), labels)
    np.testing.assert_array_equal(decode(png).pixels[..., 0], labels)
    with pytest.raises(ValueError, match="8-bit class indices"):
        encode_png(labels, palette=True)


def test_palette_png_keeps_class_indices_and_shows_colours() -> None:
    mask = RNG.integers(0, 5, (PNG_BLOCK_ROWS + 20, 30), dtype=np.uint8)
    img = Image.open(io.BytesIO(encode_png(mask, palette=True)))
    assert img.mode == "P"
    np.testing.assert_array_equal(np.asarray(img), mask)
    rgb = np.asarray(img.convert("RGB"))
    for k in range(5):
        assert tuple(rgb[mask == k][0]) == PALETTE[k]
    assert PALETTE[0] == (0, 0, 0)
