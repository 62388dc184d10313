"""``/docs`` and ``/redoc`` work on a lab network cut off from the internet.

Every page the service serves for its documentation references only the service itself: its
Swagger UI and ReDoc files come from the ``fastapi-offline`` package, not a CDN. Checked twice:
by fetching each page and everything it references, and by rendering the pages in a real
headless Chromium that can resolve no host but the service's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import toy_server

PAGES = ("/docs", "/redoc", "/docs/oauth2-redirect")
EXTERNAL = re.compile(r"(?:https?:)?//[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
BROWSER_TIMEOUT_S = 120


class _References(HTMLParser):
    """Every ``src`` and ``href`` of a page, and the spec URL ReDoc is given."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in ("src", "href", "spec-url") and v]


def references(html: str) -> list[str]:
    """What a page makes a browser load."""
    parser = _References()
    parser.feed(html)
    return parser.urls


@pytest.mark.parametrize("page", PAGES)
def test_docs_pages_reference_only_the_service(client: TestClient, page: str) -> None:
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert not EXTERNAL.findall(r.text), EXTERNAL.findall(r.text)
    urls = references(r.text)
    if page != "/docs/oauth2-redirect":  # that page is a script only
        assert urls, "the page loads nothing?"
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 100, url
    if page == "/docs":
        assert "url: '/openapi.json'" in r.text
        assert '"validatorUrl": null' in r.text  # no badge fetched from validator.swagger.io


def test_the_openapi_document_names_no_external_host(client: TestClient) -> None:
    """What both pages render: no link in it may send a browser elsewhere either."""
    r = client.get("/openapi.json")
    assert r.status_code == 200 and "/segment" in r.json()["paths"]
    assert not EXTERNAL.findall(r.text), EXTERNAL.findall(r.text)


def test_the_docs_assets_are_what_the_pages_need(client: TestClient) -> None:
    js = client.get("/docs-assets/swagger-ui-bundle.js")
    assert "javascript" in js.headers["content-type"] and b"SwaggerUIBundle" in js.content
    css = client.get("/docs-assets/swagger-ui.css").text
    urls = re.findall(r"url\(\s*['\"]?([^'\")]*)", css)
    assert urls and not [u for u in urls if not u.startswith("data:")]
    assert b"Redoc" in client.get("/docs-assets/redoc.standalone.js").content


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing in CI: `make deploy-tools` installs it")
        pytest.skip("no chromium: `sudo apt-get install --no-install-recommends chromium`")
    return path


def render(chromium: str, url: str, profile: Path) -> str:
    """The DOM of ``url`` after its scripts ran, in a headless Chromium that can resolve no
    host but 127.0.0.1: any CDN reference would fail to load and leave the page blank."""
    proc = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",  # root in CI containers
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--virtual-time-budget=15000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=BROWSER_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.browser
def test_a_real_browser_renders_the_docs_offline(model_dir: Path, tmp_path: Path) -> None:
    chromium = _chromium()
    with toy_server(model_dir, tmp_path / "server") as srv:
        swagger = render(chromium, f"{srv.url}/docs", tmp_path / "profile")
        redoc = render(chromium, f"{srv.url}/redoc", tmp_path / "profile")
    # Swagger UI built its page from /openapi.json: the title and each operation are there.
    assert "U-Net segmentation service" in swagger
    assert 'class="opblock' in swagger and "/segment" in swagger and "/models" in swagger
    # ReDoc likewise (it renders the operations' summaries into its menu).
    assert "U-Net segmentation service" in redoc and "Segment an image" in redoc
