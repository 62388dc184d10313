"""Hostile and awkward inputs, one table: what lab software really sends to ``POST /segment``.

Every row is one case and one test. A refused case must get its specific status, a JSON error
``{detail, code, request_id}`` whose detail a lab user can act on, no stack trace or server path,
a request ID that is also on a log line, and the *next* request must still succeed. Inputs the
service can use (alpha, palettes, CMYK, 16-bit RGB TIFF, extreme aspect ratios) must give the
exact mask of the kernel-1 ``toy`` model instead.

Count the cases with ``pytest --collect-only -q tests/test_hostile_inputs.py``.
"""

from __future__ import annotations

import io
import logging
import struct
import tracemalloc
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tifffile
from fastapi.testclient import TestClient
from PIL import Image

from service.core.logs import request_id_var
from tests.conftest import (
    expected_toy_mask,
    jpeg_bytes,
    png_bytes,
    random_image,
    running_app,
    tiff_bytes,
)
from tests.figures import record
from tests.test_api import assert_error, assert_still_serves, mask_of
from tests.test_images import jpeg_declaring, png_declaring, tiff_declaring

UPLOAD_LIMIT = 1_000_000
GREY = random_image(24, 40, seed=61)
GREY16 = np.random.default_rng(62).integers(0, 300, (24, 40), dtype=np.uint16)
RGB16 = np.random.default_rng(63).integers(0, 300, (24, 40, 3), dtype=np.uint16)


# --- building awkward files -------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16_colour(arr: np.ndarray) -> bytes:
    """A valid 16-bit RGB (3 channels) or RGBA (4) PNG, written by hand (Pillow cannot)."""
    h, w, c = arr.shape
    rows = b"".join(b"\0" + arr[i].astype(">u2").tobytes() for i in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2 if c == 3 else 6, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(rows))
        + _chunk(b"IEND", b"")
    )


def _pil(img: Image.Image, fmt: str, **save: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def palette_png(grey: np.ndarray) -> bytes:
    """A palette PNG whose palette maps index i to grey (i, i, i)."""
    img = Image.fromarray(grey, mode="L").convert("P")
    img.putdata(grey.ravel().tolist())
    img.putpalette([v for i in range(256) for v in (i, i, i)])
    return _pil(img, "PNG")


def cmyk_jpeg() -> tuple[bytes, np.ndarray]:
    """A CMYK JPEG and the grey image the service makes of it (Pillow's RGB, channel mean)."""
    rgb = np.dstack([GREY, GREY[::-1], 255 - GREY])
    data = _pil(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return data, decoded.mean(axis=2, dtype=np.float32).astype(np.uint8)


def two_page_tiff() -> bytes:
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tw:
        tw.write(GREY)
        tw.write(GREY)
    return buf.getvalue()


def animated(fmt: str) -> bytes:
    frames = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (0, 100, 200)]
    return _pil(frames[0], fmt, save_all=True, append_images=frames[1:])


def multipart(fields: dict[str, bytes], boundary: str = "hostile") -> tuple[bytes, str]:
    """A multipart/form-data body written by hand, and its content type."""
    body = b""
    for name, data in fields.items():
        body += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="f"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    body += f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _chunks(data: bytes, size: int = 16384) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


# --- the table --------------------------------------------------------------------------------


@dataclass
class Case:
    """One request and what must come back: ``status`` with these words in the detail, or (200)
    exactly ``mask``."""

    id: str
    status: int
    says: tuple[str, ...] = ()
    code: str | None = None
    image: bytes | None = None
    truth: bytes | None = None
    params: dict[str, Any] = field(default_factory=dict)
    request: dict[str, Any] | None = None  # raw httpx arguments instead of image/truth
    method: str = "POST"
    path: str = "/segment"
    mask: np.ndarray | None = None


def _img(arr: np.ndarray) -> Case:
    return Case("", 200, image=png_bytes(arr), mask=expected_toy_mask(arr))


NOISE_BIG = random_image(1200, 1200, seed=64)  # noise PNG: ~1.4 MB, over UPLOAD_LIMIT
_CMYK, _CMYK_GREY = cmyk_jpeg()
_PNG, _JPEG, _TIFF = png_bytes(GREY), jpeg_bytes(GREY), tiff_bytes(GREY16)
_OVER_LIMIT_BODY, _MULTIPART = multipart({"image": png_bytes(NOISE_BIG)})
_EMPTY_MP_BODY, _ = multipart({})
_WRONG_FIELD_BODY, _ = multipart({"file": _PNG})
_RGBA = np.dstack([GREY, GREY, GREY, np.full(GREY.shape, 9, np.uint8)])
_LA = np.dstack([GREY, np.full(GREY.shape, 200, np.uint8)])
_TALL, _WIDE = random_image(100_000, 1, seed=65), random_image(1, 100_000, seed=66)
_NOT_INDICES = np.full(GREY.shape, 7, np.uint8)

CASES: list[Case] = [
    # -- the request itself is not an upload of an image
    Case("empty-body", 422, ("no image uploaded", "'image'"), "invalid_image", request={}),
    Case(
        "empty-multipart",
        422,
        ("no image uploaded",),
        "invalid_image",
        request={"content": _EMPTY_MP_BODY, "headers": {"content-type": _MULTIPART}},
    ),
    Case(
        "wrong-field-name",
        422,
        ("no image uploaded", "'image'"),
        "invalid_image",
        request={"content": _WRONG_FIELD_BODY, "headers": {"content-type": _MULTIPART}},
    ),
    Case(
        "missing-image-truth-only",
        422,
        ("no image uploaded",),
        "invalid_image",
        request={"files": {"ground_truth": ("t", _PNG, "image/png")}},
    ),
    Case(
        "raw-image-not-multipart",
        422,
        ("no image uploaded",),
        "invalid_image",
        request={"content": _PNG, "headers": {"content-type": "image/png"}},
    ),
    Case("wrong-method", 405, ("method not allowed",), "method_not_allowed", method="GET"),
    Case("unknown-path", 404, ("not found",), "not_found", path="/segmentation"),
    # -- not an image, or not a format the service reads
    Case("empty-file", 422, ("empty file",), "invalid_image", image=b""),
    Case("text-bytes", 415, ("not an image",), "unsupported_media_type", image=b"hello " * 20),
    Case("html", 415, ("not an image",), "unsupported_media_type", image=b"<html>x</html>"),
    Case("pdf", 415, ("PDF", "PNG, JPEG or TIFF"), "unsupported_media_type", image=b"%PDF-1.7 x"),
    # GIF is refused by design: lab images are PNG/JPEG/TIFF; the message says what to send.
    Case(
        "animated-gif", 415, ("GIF", "PNG, JPEG or TIFF"), "unsupported_media_type", animated("GIF")
    ),
    # -- damaged files
    Case("truncated-png", 422, ("truncated PNG",), "invalid_image", _PNG[: len(_PNG) // 2]),
    Case("truncated-jpeg", 422, ("truncated JPEG",), "invalid_image", _JPEG[: len(_JPEG) // 2]),
    Case("truncated-tiff", 422, ("truncated TIFF",), "invalid_image", _TIFF[: len(_TIFF) // 2]),
    Case("png-signature-only", 422, ("PNG",), "invalid_image", _PNG[:8]),
    # -- sizes
    Case("zero-width-png", 422, ("PNG",), "invalid_image", png_declaring(0, 5)),
    Case("zero-height-jpeg", 422, ("JPEG",), "invalid_image", jpeg_declaring(5, 0)),
    Case("zero-width-tiff", 422, ("no pixels", "0x5"), "invalid_image", tiff_declaring(0, 5)),
    Case("bomb-png-100000x100000", 413, ("pixels", "SEG_MAX_IMAGE_PIXELS"), "too_large"),
    Case("bomb-jpeg-60000x60000", 413, ("pixels", "SEG_MAX_IMAGE_PIXELS"), "too_large"),
    Case("bomb-tiff-100000x100000", 413, ("pixels", "SEG_MAX_IMAGE_PIXELS"), "too_large"),
    Case(
        "upload-over-limit-content-length",
        413,
        ("larger than", f"{UPLOAD_LIMIT:,}", "SEG_MAX_UPLOAD_BYTES"),
        "too_large",
        request={"content": _OVER_LIMIT_BODY, "headers": {"content-type": _MULTIPART}},
    ),
    Case(
        "upload-over-limit-chunked",
        413,
        ("larger than", f"{UPLOAD_LIMIT:,}"),
        "too_large",
        request={"content": _chunks(_OVER_LIMIT_BODY), "headers": {"content-type": _MULTIPART}},
    ),
    # -- pixel formats: unusable
    Case("png-16bit-rgb", 422, ("16-bit colour PNG", "TIFF"), "invalid_image", png16_colour(RGB16)),
    Case(
        "png-16bit-rgba",
        422,
        ("16-bit colour PNG",),
        "invalid_image",
        png16_colour(np.dstack([RGB16, RGB16[..., :1]])),
    ),
    Case(
        "tiff-float-nan",
        422,
        ("NaN",),
        "invalid_image",
        tiff_bytes(np.array([[1.0, np.nan]], np.float32)),
    ),
    Case(
        "tiff-float-inf",
        422,
        ("infinite",),
        "invalid_image",
        tiff_bytes(np.array([[np.inf, 0.0]], np.float32)),
    ),
    Case(
        "tiff-float64-minus-inf",
        422,
        ("infinite",),
        "invalid_image",
        tiff_bytes(np.array([[-np.inf, 0.0]], np.float64)),
    ),
    # A stack's mask is a multi-page TIFF: asked for as the default PNG, the answer says how
    # to ask (tests/test_stacks.py segments stacks).
    Case("tiff-multi-page", 422, ("stack", "format=tiff"), "invalid_parameter", two_page_tiff()),
    Case(
        "tiff-z-stack",
        422,
        ("stack", "multi-page TIFF", "format=tiff"),
        "invalid_parameter",
        tiff_bytes(np.zeros((5, 16, 16), np.uint16)),
    ),
    Case("animated-png", 422, ("animated", "3 frames"), "invalid_image", animated("PNG")),
    Case("tiff-bool", 422, ("pixel type",), "invalid_image", tiff_bytes(np.zeros((4, 4), bool))),
    # -- pixel formats and shapes that the service uses: the exact mask comes back
    Case("1x1", 200, image=png_bytes(GREY[:1, :1]), mask=expected_toy_mask(GREY[:1, :1])),
    Case("aspect-1x100000", 200, image=png_bytes(_WIDE), mask=expected_toy_mask(_WIDE)),
    Case("aspect-100000x1", 200, image=png_bytes(_TALL), mask=expected_toy_mask(_TALL)),
    Case("png-rgba-alpha", 200, image=png_bytes(_RGBA), mask=expected_toy_mask(GREY)),
    Case(
        "png-grey-alpha",
        200,
        image=_pil(Image.fromarray(_LA, "LA"), "PNG"),
        mask=expected_toy_mask(GREY),
    ),
    Case("png-palette", 200, image=palette_png(GREY), mask=expected_toy_mask(GREY)),
    Case("jpeg-cmyk", 200, image=_CMYK, mask=expected_toy_mask(_CMYK_GREY)),
    Case("png-16bit-grey", 200, image=png_bytes(GREY16), mask=expected_toy_mask(GREY16)),
    Case(
        "tiff-16bit-rgb",
        200,
        image=tiff_bytes(RGB16, photometric="rgb"),
        mask=expected_toy_mask(RGB16.mean(axis=2, dtype=np.float32).astype(np.uint16)),
    ),
    # -- ground truths
    Case(
        "truth-other-size",
        422,
        ("ground truth is 41x24", "40x24", "same size"),
        "invalid_ground_truth",
        image=_PNG,
        truth=png_bytes(np.zeros((24, 41), np.uint8)),
    ),
    Case(
        "truth-labels-outside-classes",
        422,
        ("labels [7]", "outside", "0..2"),
        "invalid_ground_truth",
        image=_PNG,
        truth=png_bytes(_NOT_INDICES),
        params={"model": "toy3"},
    ),
    Case(
        "truth-16bit-rgb-png",
        422,
        ("ground truth", "16-bit colour PNG"),
        "invalid_image",
        image=_PNG,
        truth=png16_colour(RGB16),
    ),
    Case(
        "truth-not-an-image",
        415,
        ("ground truth", "PDF"),
        "unsupported_media_type",
        image=_PNG,
        truth=b"%PDF-1.4",
    ),
    # -- model names and parameters
    Case("unknown-model", 404, ("no model named 'nope'", "toy"), "unknown_model", _PNG),
    Case("model-dotdot-slash", 422, ("model",), "invalid_parameter", _PNG),
    Case("model-dotdot", 422, ("model",), "invalid_parameter", _PNG),
    Case("model-absolute-path", 422, ("model",), "invalid_parameter", _PNG),
    Case("model-encoded-slash", 422, ("model",), "invalid_parameter", _PNG),
    Case("threshold-0", 422, ("threshold", "greater than 0"), "invalid_parameter", _PNG),
    Case("threshold-1", 422, ("threshold", "less than 1"), "invalid_parameter", _PNG),
    Case("threshold-negative", 422, ("threshold",), "invalid_parameter", _PNG),
    Case("threshold-nan", 422, ("threshold",), "invalid_parameter", _PNG),
    Case("threshold-text", 422, ("threshold", "number"), "invalid_parameter", _PNG),
    Case("threshold-on-multiclass", 422, ("binary models",), "invalid_parameter", _PNG),
    Case("overlap-negative", 422, ("overlap",), "invalid_parameter", _PNG),
    Case("overlap-0.76", 422, ("overlap", "0.75"), "invalid_parameter", _PNG),
    Case("overlap-inf", 422, ("overlap",), "invalid_parameter", _PNG),
    Case("blend-unknown", 422, ("blend",), "invalid_parameter", _PNG),
    Case("class-name-unknown", 422, ("nucleus", "background"), "invalid_parameter", _PNG),
]

_PARAMS: dict[str, dict[str, Any]] = {
    "bomb-png-100000x100000": {},
    "unknown-model": {"model": "nope"},
    "model-dotdot-slash": {"model": "../toy"},
    "model-dotdot": {"model": ".."},
    "model-absolute-path": {"model": "/etc/passwd"},
    "model-encoded-slash": {"model": "..%2F..%2Fetc"},
    "threshold-0": {"threshold": 0},
    "threshold-1": {"threshold": 1},
    "threshold-negative": {"threshold": -0.2},
    "threshold-nan": {"threshold": "nan"},
    "threshold-text": {"threshold": "half"},
    "threshold-on-multiclass": {"threshold": 0.5, "model": "toy3"},
    "overlap-negative": {"overlap": -0.1},
    "overlap-0.76": {"overlap": 0.76},
    "overlap-inf": {"overlap": "inf"},
    "blend-unknown": {"blend": "median"},
    "class-name-unknown": {"class_name": "nucleus"},
}
_BOMBS = {
    "bomb-png-100000x100000": png_declaring(100_000, 100_000),
    "bomb-jpeg-60000x60000": jpeg_declaring(60_000, 60_000),
    "bomb-tiff-100000x100000": tiff_declaring(100_000, 100_000),
}
for _case in CASES:
    _case.params = _case.params or _PARAMS.get(_case.id, {})
    _case.image = _BOMBS.get(_case.id, _case.image)
    if _case.mask is not None:
        _case.mask = _case.mask.reshape(_case.mask.shape[:2])
assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"


# --- running it ---------------------------------------------------------------------------------


class LogCapture(logging.Handler):
    """Every record of the ``service`` logger with the request ID it was logged under (the
    logger does not propagate, so pytest's caplog does not see it)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((request_id_var.get(), record.getMessage()))

    def for_request(self, request_id: str) -> list[str]:
        return [message for rid, message in self.lines if rid == request_id]


@pytest.fixture(scope="module")
def hostile(model_dir: Path) -> Iterator[tuple[TestClient, LogCapture]]:
    """The app (upload limit 1 MB, default pixel limit) and a capture of its log."""
    with running_app(model_dir, max_upload_bytes=UPLOAD_LIMIT) as client:
        capture = LogCapture()
        logger = logging.getLogger("service")  # configured by the app's lifespan by now
        logger.addHandler(capture)
        try:
            yield client, capture
        finally:
            logger.removeHandler(capture)


_OUTCOMES: dict[str, int] = {}


def send(client: TestClient, case: Case) -> httpx.Response:
    """The case's request."""
    if case.request is not None:
        return client.request(case.method, case.path, params=case.params, **case.request)
    if case.image is None:
        return client.request(case.method, case.path, params=case.params)
    files = {"image": ("upload", case.image, "application/octet-stream")}
    if case.truth is not None:
        files["ground_truth"] = ("truth", case.truth, "application/octet-stream")
    return client.request(case.method, case.path, params=case.params, files=files)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(hostile: tuple[TestClient, LogCapture], case: Case) -> None:
    client, log = hostile
    r = send(client, case)
    _OUTCOMES[case.id] = r.status_code
    if case.status == 200:
        mask = mask_of(r)
        assert case.mask is not None
        np.testing.assert_array_equal(mask, case.mask)
    else:
        body = assert_error(r, case.status, *case.says)  # also: no traceback, no server path
        assert body["code"] == case.code
        assert len(body["detail"]) < 400, "a message for a person, not a dump"
        logged = log.for_request(body["request_id"])
        assert any(f"-> {case.status}" in line for line in logged), (body, logged)
    assert_still_serves(client)


def test_figures_of_the_table() -> None:
    """Runs after the table (file order): writes what came back per case for the docs."""
    if len(_OUTCOMES) != len(CASES):
        pytest.skip("only part of the table ran")
    by_status: dict[str, int] = {}
    for status in _OUTCOMES.values():
        by_status[str(status)] = by_status.get(str(status), 0) + 1
    record(
        "hostile_inputs",
        {
            "cases": len(CASES),
            "by_status": by_status,
            "outcomes": dict(_OUTCOMES),
            "next_request_succeeded": len(CASES),
        },
    )


def test_decompression_bomb_over_http_allocates_nothing_large(
    hostile: tuple[TestClient, LogCapture],
) -> None:
    """The whole request, HTTP parsing included, stays far below what the header declares."""
    client, _ = hostile
    data = png_declaring(100_000, 100_000)  # 10^10 pixels = 10 GB of uint8, in 100-odd bytes
    tracemalloc.start()
    try:
        r = client.post("/segment", files={"image": ("bomb.png", data, "image/png")})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_error(r, 413, "10,000,000,000 pixels")
    assert peak < 32 << 20, peak
