"""``GET /``: a page for people. Drop an image (and a ground truth), pick the model, threshold
and overlap, and see the image beside the mask overlay, the per-class IoU/Dice table and a
download link for the mask.

Plain HTML, CSS and JavaScript from ``service/web/``, served by the service itself: no build
step, nothing fetched from the internet. The page talks to the same API as any client
(``/models``, ``/preview``, ``/segment``), with the API key a person types in when one is set.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse

from service.api.deps import SettingsDep
from service.api.problems import ApiError, ErrorCode

WEB = Path(__file__).resolve().parents[2] / "web"
ASSETS = {"app.js": "text/javascript", "app.css": "text/css"}

router = APIRouter(tags=["page"], include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
def page(settings: SettingsDep) -> HTMLResponse:
    """The page; it is told whether the service needs an API key, so that it asks for one
    before its first request instead of meeting a 401."""
    html = (WEB / "index.html").read_text(encoding="utf-8")
    required = "true" if settings.api_key is not None else "false"
    body = '<body data-state="loading">'
    html = html.replace(body, f'{body[:-1]} data-key-required="{required}">', 1)
    return HTMLResponse(html)


@router.get("/ui/{name}")
def asset(name: str) -> FileResponse:
    """The page's script and style sheet."""
    if name not in ASSETS:
        raise ApiError(404, ErrorCode.NOT_FOUND, f"no page asset {name!r}")
    return FileResponse(WEB / name, media_type=ASSETS[name])
