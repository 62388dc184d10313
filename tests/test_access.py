"""Access and error hygiene: API key, CORS, request IDs on errors and in the log, and a model
file missing at start-up. (The key's basic 401/200 behaviour is in test_api.py.)"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.core.config import Settings
from service.core.logs import LogFormat, configure_logging
from service.main import create_app
from tests.conftest import png_bytes, random_image, running_app, wait_ready, write_models
from tests.test_api import GOOD, assert_error, assert_still_serves, post
from tests.test_hostile_inputs import LogCapture

ORIGIN = "https://lab.example.org"


@contextmanager
def captured_log() -> Iterator[LogCapture]:
    """Records of the ``service`` logger (add after the app's lifespan configured it)."""
    capture = LogCapture()
    logger = logging.getLogger("service")
    logger.addHandler(capture)
    try:
        yield capture
    finally:
        logger.removeHandler(capture)


# --- API key ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-API-Key": ""},
        {"X-API-Key": "s3cre"},
        {"X-API-Key": "s3cret-and-more"},
        {"X-API-Key": "S3CRET"},
        {"X-API-Key": "s3cr\xe9t".encode("latin-1")},  # not ASCII: a 401, never a 500
        {"Authorization": "Basic czNjcmV0"},
        {"Authorization": "Bearer"},
        {"Authorization": "s3cret"},
    ],
    ids=["none", "empty", "prefix", "longer", "case", "latin1", "basic", "bearer-empty", "raw"],
)
def test_wrong_or_missing_keys_are_401_on_every_protected_endpoint(
    make_client: Any, headers: dict[str, Any]
) -> None:
    with make_client(api_key="s3cret", metrics_require_key=True) as client:
        for method, path in [
            ("POST", "/segment"),
            ("GET", "/models"),
            ("GET", "/models/toy"),
            ("GET", "/v1/models"),
            ("GET", "/metrics"),
        ]:
            files = {"image": ("a.png", png_bytes(GOOD), "image/png")} if method == "POST" else None
            r = client.request(method, path, headers=headers, files=files)
            body = assert_error(r, 401, "API key")
            assert body["code"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
            assert "s3cret" not in r.text
        for path in ("/healthz", "/readyz"):  # orchestrators poll these without a key
            assert client.get(path, headers=headers).status_code == 200


def test_api_key_is_compared_in_constant_time() -> None:
    """Behaviour cannot show constant time on a shared CI box; the code must use the
    constant-time comparison (and nothing else that compares the key)."""
    source = (Path(__file__).parents[1] / "service" / "api" / "deps.py").read_text()
    assert "hmac.compare_digest(" in source
    assert "== expected" not in source and "expected ==" not in source


# --- CORS ---------------------------------------------------------------------------------------


def _preflight(client: TestClient, origin: str) -> Any:
    return client.options(
        "/segment",
        headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
    )


def test_cors_is_off_unless_configured(client: TestClient) -> None:
    r = client.get("/healthz", headers={"Origin": ORIGIN})
    assert r.status_code == 200
    assert not any(h.startswith("access-control-") for h in r.headers)
    r = post(client, png_bytes(GOOD), headers={"Origin": ORIGIN})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    r = _preflight(client, ORIGIN)
    assert "access-control-allow-origin" not in r.headers
    assert r.status_code == 405  # no CORS layer: OPTIONS is just a method /segment lacks


def test_cors_allows_only_the_configured_origins(make_client: Any) -> None:
    with make_client(cors_origins=[ORIGIN]) as client:
        r = client.get("/healthz", headers={"Origin": ORIGIN})
        assert r.headers["access-control-allow-origin"] == ORIGIN
        r = _preflight(client, ORIGIN)
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in r.headers["access-control-allow-methods"]
        other = "https://evil.example.com"
        assert (
            "access-control-allow-origin"
            not in client.get("/healthz", headers={"Origin": other}).headers
        )
        assert _preflight(client, other).status_code == 400
        assert_still_serves(client)


# --- request IDs on every error, and in the log ---------------------------------------------


def test_every_kind_of_error_carries_a_request_id_that_is_logged(make_client: Any) -> None:
    with make_client(api_key="k", max_upload_bytes=5000) as client, captured_log() as log:
        key = {"X-API-Key": "k"}
        responses = [
            post(client, png_bytes(GOOD)),  # 401
            post(client, b"GIF89a....", headers=key),  # 415
            post(client, png_bytes(GOOD)[:50], headers=key),  # 422
            post(client, png_bytes(GOOD), headers=key, model="nope"),  # 404
            post(client, png_bytes(GOOD), headers=key, threshold=3),  # 422 (validation)
            post(client, png_bytes(random_image(100, 100)), headers=key),  # 413
            client.get("/nowhere"),  # 404 (routing)
            client.delete("/models", headers=key),  # 405
        ]
        seen = set()
        for r in responses:
            assert r.status_code >= 400
            body = assert_error(r, r.status_code)
            rid = body["request_id"]
            assert rid == r.headers["x-request-id"] and len(rid) == 32
            assert any(f"-> {r.status_code}" in line for line in log.for_request(rid)), rid
            seen.add(r.status_code)
        assert seen == {401, 404, 405, 413, 415, 422}


def test_an_unexpected_error_is_a_500_without_internals_with_a_logged_request_id(
    model_dir: Path,
) -> None:
    """A handler that fails in a way nobody planned (an extra route of the real app raising)."""
    settings = Settings(
        model_dir=model_dir, default_model="toy", providers=["CPUExecutionProvider"]
    )
    app = create_app(settings)

    def fails() -> None:
        raise RuntimeError(f"cannot open {model_dir}/secret/config.py")

    app.add_api_route("/fails", fails)
    with TestClient(app, raise_server_exceptions=False) as client, captured_log() as log:
        wait_ready(client)
        r = client.get("/fails", headers={"X-Request-ID": "lab-run-500"})
        body = assert_error(r, 500, "request ID")
        assert body == {
            "detail": "internal error; quote the request ID",
            "code": "internal",
            "request_id": "lab-run-500",
        }
        assert str(model_dir) not in r.text and "RuntimeError" not in r.text
        lines = log.for_request("lab-run-500")
        assert any("unexpected error on GET /fails" in line for line in lines), log.lines
        assert_still_serves(client)


# --- a model file missing or corrupt at start-up ---------------------------------------------


def test_a_version_folder_without_model_file_degrades_readiness_but_the_others_serve(
    tmp_path: Path,
) -> None:
    models = write_models(tmp_path / "models")
    (models / "lost" / "3").mkdir(parents=True)  # deployed without its model.onnx
    (models / "lost" / "2").mkdir()
    (models / "lost" / "2" / "model.onnx").write_bytes(b"")  # an older version, empty
    with running_app(models, expect_ready=503) as client:
        body = client.get("/readyz").json()
        assert body["status"] == "degraded"
        assert body["models"] == ["toy", "toy3", "toy3lv", "toyobj"]
        assert body["failed"]["lost"] == "FileNotFoundError: model.onnx is missing in 3/"
        assert set(body["failed"]) == {"lost", "lost@2"}  # every version is loaded
        listed = client.get("/models").json()
        assert listed["failed"] == body["failed"]
        assert str(models) not in str(listed)
        assert_error(post(client, png_bytes(GOOD), model="lost"), 404, "failed to load")
        assert_error(post(client, png_bytes(GOOD), model="lost@2"), 404, "failed to load")
        assert_still_serves(client)


def test_model_load_failures_are_logged_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator's log names the model, the file and the reason (the log may hold paths)."""
    models = write_models(tmp_path / "models", corrupt="broken")
    (models / "lost" / "1").mkdir(parents=True)
    capture = LogCapture()
    logger = logging.getLogger("service")

    def configure_and_capture(level: str, fmt: LogFormat) -> None:
        """create_app replaces the handlers, then the lifespan starts the loader: capture from
        there."""
        configure_logging(level, fmt)
        logger.addHandler(capture)

    monkeypatch.setattr("service.main.configure_logging", configure_and_capture)
    try:
        with running_app(models, expect_ready=503):
            pass
    finally:
        logger.removeHandler(capture)
    errors = [message for _, message in capture.lines if "could not be loaded" in message]
    assert len(errors) == 2, capture.lines
    broken, lost = sorted(errors)
    assert broken.startswith(f"model broken could not be loaded from {models}/broken/1/model.onnx")
    assert "InvalidProtobuf" in broken or "INVALID_PROTOBUF" in broken or "Fail" in broken, broken
    assert lost.startswith("model lost could not be loaded")
    assert lost.endswith("FileNotFoundError: model.onnx is missing in 1/")
    ready = [message for _, message in capture.lines if message.startswith("ready:")]
    assert ready and "'broken'" in ready[0] and "'lost'" in ready[0]
