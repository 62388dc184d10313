"""The page at ``/`` for people, in a real headless Chromium against a real uvicorn.

A person picks an image and its ground truth, segments it, and sees the image beside the mask
overlay (checked by pixel content: the mask colour where the mask is, the image elsewhere),
the IoU/Dice table and a download link; with no console error and no request anywhere but the
service. A second run does it on a service that needs an API key.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.cdp import Page, browser
from tests.conftest import expected_toy_mask, png_bytes, random_image, tiff_bytes, toy_server
from tests.test_docs import EXTERNAL, references

H, W = 120, 180
MAGENTA = np.array([255, 0, 255])  # class 1's overlay colour in service/web/app.js


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing in CI: `make deploy-tools` installs it")
        pytest.skip("no chromium: `sudo apt-get install --no-install-recommends chromium`")
    return path


def test_the_page_and_its_files_reference_only_the_service(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'data-key-required="false"' in r.text
    for text in (r.text, client.get("/ui/app.js").text, client.get("/ui/app.css").text):
        assert not EXTERNAL.findall(text), EXTERNAL.findall(text)
    urls = references(r.text)
    assert set(urls) == {"data:,", "/ui/app.css", "/ui/app.js", "#"}
    assert client.get("/ui/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/ui/nope.js").status_code == 404


def test_preview_is_an_8bit_stretched_png_of_bounded_size(client: TestClient) -> None:
    img = np.linspace(1000, 3000, 300 * 500).reshape(300, 500).astype(np.uint16)
    r = client.post("/preview", files={"image": tiff_bytes(img)}, params={"max_side": 250})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert (r.headers["x-image-width"], r.headers["x-image-height"]) == ("500", "300")
    preview = Image.open(io.BytesIO(r.content))
    assert preview.mode == "L" and preview.size == (250, 150)
    pixels = np.asarray(preview)
    assert pixels.min() <= 2 and pixels.max() >= 253  # the 16-bit range, stretched
    bad = client.post("/preview", files={"image": b"GIF89a" + b"\0" * 40})
    assert bad.status_code == 415


def overlay_agreement(page: Page, shot: np.ndarray, selector: str, mask: np.ndarray) -> dict:
    """Sample the canvas in the screenshot at the centre of every image pixel: how many of the
    mask's pixels show the mask colour, and how many others show the grey image."""
    rect = page.rect(selector)
    ys = (rect["y"] + (np.arange(H) + 0.5) * rect["height"] / H).astype(int)
    xs = (rect["x"] + (np.arange(W) + 0.5) * rect["width"] / W).astype(int)
    rgb = shot[np.ix_(ys, xs)][..., :3].astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    coloured = (r - g > 60) & (b - g > 60)  # magenta blended over grey
    grey = (np.abs(r - g) < 12) & (np.abs(b - g) < 12)
    on = mask > 0
    return {
        "mask_coloured": float(coloured[on].mean()),
        "background_grey": float(grey[~on].mean()),
    }


def run_page(page: Page, url: str, image: Path, truth: Path) -> np.ndarray:
    """Segment ``image`` with ``truth`` through the page; the screenshot afterwards."""
    page.wait_for("document.body.dataset.state === 'ready'")
    page.set_files("#image-input", image)
    page.set_files("#truth-input", truth)
    page.wait_for("!document.getElementById('run').disabled")
    assert page.evaluate("document.getElementById('image-name').textContent").startswith(image.name)
    page.evaluate("document.getElementById('run').click()")
    page.wait_for("['done', 'error'].includes(document.body.dataset.state)")
    status = page.evaluate("document.getElementById('status').textContent")
    assert page.evaluate("document.body.dataset.state") == "done", status
    page.evaluate("document.getElementById('result').scrollIntoView()")
    return np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB"))


def check_result(page: Page, shot: np.ndarray, mask: np.ndarray, service_url: str) -> None:
    overlay = overlay_agreement(page, shot, "#overlay-view", mask)
    assert overlay["mask_coloured"] > 0.97 and overlay["background_grey"] > 0.97, overlay
    plain = overlay_agreement(page, shot, "#image-view", mask)
    assert plain["mask_coloured"] < 0.01, plain  # the image itself, beside it, is not coloured
    table = page.evaluate("document.getElementById('scores').innerText")
    assert "foreground" in table and "background" in table and "1.0000" in table
    link = page.evaluate(
        "(() => { const a = document.getElementById('download');"
        " return {href: a.href, name: a.download}; })()"
    )
    assert link["href"].startswith("blob:") and link["name"] == "cells.mask.png"
    downloaded = page.evaluate(
        "fetch(document.getElementById('download').href).then(r => r.arrayBuffer())"
        ".then(b => Array.from(new Uint8Array(b)))"
    )
    got = np.asarray(Image.open(io.BytesIO(bytes(downloaded))))
    np.testing.assert_array_equal(got, mask)
    assert page.errors() == []
    outside = [u for u in page.requests() if not u.startswith((service_url, "data:", "blob:"))]
    assert outside == []


def lab_files(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    img = random_image(H, W, seed=11)
    mask = expected_toy_mask(img)
    image, truth = tmp_path / "cells.png", tmp_path / "truth.png"
    image.write_bytes(png_bytes(img))
    truth.write_bytes(png_bytes(mask))
    return image, truth, mask


@pytest.mark.slow
@pytest.mark.browser
def test_segmenting_in_a_real_browser(model_dir: Path, tmp_path: Path) -> None:
    path = chromium()
    image, truth, mask = lab_files(tmp_path)
    with (
        toy_server(model_dir, tmp_path / "server") as srv,
        browser(path, tmp_path / "profile") as page,
    ):
        page.goto(f"{srv.url}/")
        shot = run_page(page, srv.url, image, truth)
        check_result(page, shot, mask, srv.url)
        assert page.evaluate("document.getElementById('key-panel').hidden")

        # A broken file: the service's reason, code and request ID, in plain sight.
        broken = tmp_path / "broken.png"
        broken.write_bytes(png_bytes(random_image(H, W))[:100])
        page.set_files("#image-input", broken)
        page.evaluate("document.getElementById('run').click()")
        page.wait_for("document.body.dataset.state === 'error'")
        status = page.evaluate("document.getElementById('status').textContent")
        assert "damaged or truncated PNG" in status and "(invalid_image)" in status
        assert "[request " in status
        # The only errors the browser logged are the two 422 answers themselves.
        assert all("422" in e for e in page.errors()) and len(page.errors()) == 2


@pytest.mark.slow
@pytest.mark.browser
def test_the_page_with_an_api_key(model_dir: Path, tmp_path: Path) -> None:
    path = chromium()
    image, truth, mask = lab_files(tmp_path)
    with (
        toy_server(model_dir, tmp_path / "server", api_key="lab-key") as srv,
        browser(path, tmp_path / "profile") as page,
    ):
        page.goto(f"{srv.url}/")
        page.wait_for("document.body.dataset.state === 'need-key'")
        assert not page.evaluate("document.getElementById('key-panel').hidden")
        assert "API key" in page.evaluate("document.getElementById('status').textContent")
        assert not [u for u in page.requests() if "/models" in u]  # asked first, no 401
        page.evaluate("document.getElementById('api-key').value = 'lab-key'")
        page.evaluate("document.getElementById('save-key').click()")
        shot = run_page(page, srv.url, image, truth)
        check_result(page, shot, mask, srv.url)


@pytest.mark.slow
@pytest.mark.browser
def test_the_page_rescales_to_the_models_scale_when_given_a_diameter(tmp_path: Path) -> None:
    """A model that carries its training scale gets a diameter field; the run reports the
    rescaling; a model without one shows no field."""
    from bench.onnx_models import build_model

    root = tmp_path / "models"
    build_model(root / "scaled/1/model.onnx", name="scaled", tile_size=32, object_diameter=10.0)
    build_model(root / "plain/1/model.onnx", name="plain", tile_size=32)
    image, truth, _ = lab_files(tmp_path)
    with (
        toy_server(root, tmp_path / "server", default_model="scaled") as srv,
        browser(chromium(), tmp_path / "profile") as page,
    ):
        page.goto(f"{srv.url}/")
        page.wait_for("document.body.dataset.state === 'ready'")
        select = "m => { const s = document.getElementById('model'); s.value = m;"
        select += " s.dispatchEvent(new Event('change')); }"
        page.evaluate(f"({select})('scaled')")
        assert not page.evaluate("document.getElementById('diameter-label').hidden")
        assert "10 px" in page.evaluate("document.getElementById('diameter').placeholder")
        page.evaluate("document.getElementById('diameter').value = '20'")
        run_page(page, srv.url, image, truth)
        summary = page.evaluate("document.getElementById('summary').textContent")
        assert "rescaled \u00d70.50 to 90\u00d760" in summary, summary  # multiplication signs
        assert "scaled v1 (fp32)," in summary, summary  # the precision that ran
        page.evaluate(f"({select})('plain')")
        assert page.evaluate("document.getElementById('diameter-label').hidden")
        assert page.errors() == []


@pytest.mark.slow
@pytest.mark.browser
def test_objects_are_counted_and_outlined_and_an_error_clears_the_result(
    model_dir: Path, tmp_path: Path
) -> None:
    """A model that gives instances: the page counts the objects (with the F1 against a
    ground truth) and outlines them. An error afterwards leaves nothing of that result on
    screen; a chosen ground truth can be removed; the diameter's placeholder fits its box."""
    from tests.test_instances import CENTRES, nuclei_image

    img, labels = nuclei_image(200, 200, CENTRES)
    image, truth = tmp_path / "nuclei.png", tmp_path / "nuclei_truth.tif"
    image.write_bytes(png_bytes(img))
    truth.write_bytes(tiff_bytes(labels.astype(np.uint16)))
    with (
        toy_server(model_dir, tmp_path / "server", default_model="toyobj") as srv,
        browser(chromium(), tmp_path / "profile") as page,
    ):
        page.goto(f"{srv.url}/")
        shot = run_page(page, srv.url, image, truth)
        objects = page.evaluate("document.getElementById('objects').textContent")
        assert objects == "5 objects (F1 1.000 against the ground truth)", objects
        rect = page.rect("#overlay-view")
        ys = (rect["y"] + (np.arange(200) + 0.5) * rect["height"] / 200).astype(int)
        xs = (rect["x"] + (np.arange(200) + 0.5) * rect["width"] / 200).astype(int)
        rgb = shot[np.ix_(ys, xs)].astype(int)
        yellow = (rgb[..., 0] > 150) & (rgb[..., 1] > 150) & (rgb[..., 2] < 100)
        # the outline between the two touching nuclei is drawn, their centres are not
        assert yellow[35:46, 48].any() and not yellow[40, 40] and not yellow[40, 57]
        assert "outlines" in page.evaluate("document.getElementById('legend').textContent")

        page.evaluate("document.getElementById('truth-clear').click()")
        assert page.evaluate("document.getElementById('truth-name').textContent") == "none"
        assert page.evaluate("document.getElementById('truth-clear').hidden")

        broken = tmp_path / "broken.png"
        broken.write_bytes(png_bytes(img)[:100])
        page.set_files("#image-input", broken)
        page.evaluate("document.getElementById('run').click()")
        page.wait_for("document.body.dataset.state === 'error'")
        assert page.evaluate("document.getElementById('result').hidden")
        assert page.evaluate("document.getElementById('objects').textContent") == ""
        assert page.evaluate("document.getElementById('overlay-view').width") == 1
        assert not page.evaluate("document.getElementById('download').hasAttribute('href')")

        fits = (
            "(() => { const i = document.getElementById('diameter');"
            " const c = document.createElement('canvas').getContext('2d');"
            " c.font = getComputedStyle(i).font;"
            " return c.measureText(i.placeholder).width <= i.clientWidth; })()"
        )
        assert page.evaluate("document.getElementById('diameter').placeholder").endswith("px)")
        assert page.evaluate(fits)


def plane_agreement(page: Page, mask: np.ndarray) -> dict:
    """``overlay_agreement`` of the overlay as now drawn, for a mask of the test's size."""
    page.evaluate("document.getElementById('result').scrollIntoView()")
    shot = np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB"))
    return overlay_agreement(page, shot, "#overlay-view", mask)


@pytest.mark.slow
@pytest.mark.browser
def test_a_stack_plane_by_plane_and_a_channel_picked_from_the_file(
    model_dir: Path, tmp_path: Path
) -> None:
    """A 3-plane stack: the first plane's overlay at once, the others on a slider, each with
    its own scores. A 2-channel OME-TIFF: the channels, by name, in a picker; the one picked
    is segmented and shown."""
    import tifffile

    planes = np.stack([random_image(H, W, seed=20 + k) for k in range(3)])
    masks = np.stack([expected_toy_mask(p) for p in planes])
    truth = (masks > 0).astype(np.uint8)
    truth[2, :30] = 1 - truth[2, :30]  # plane 3 scores below 1
    stack, stack_truth = tmp_path / "stack.tif", tmp_path / "stack_truth.tif"
    tifffile.imwrite(stack, planes, metadata={"axes": "ZYX"})
    tifffile.imwrite(stack_truth, truth, metadata={"axes": "ZYX"})
    two = np.stack([random_image(H, W, seed=30), random_image(H, W, seed=31)])
    channels = tmp_path / "two.ome.tif"
    tifffile.imwrite(
        channels, two, ome=True, metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "GFP"]}}
    )
    with (
        toy_server(model_dir, tmp_path / "server") as srv,
        browser(chromium(), tmp_path / "profile") as page,
    ):
        page.goto(f"{srv.url}/")
        run_page(page, srv.url, stack, stack_truth)
        assert not page.evaluate("document.getElementById('planes').hidden")
        assert page.evaluate("document.getElementById('plane').max") == "2"
        assert page.evaluate("document.getElementById('plane-name').textContent").startswith(
            "1 of 3 (Z=0)"
        )
        first = plane_agreement(page, masks[0])
        assert first["mask_coloured"] > 0.97 and first["background_grey"] > 0.97, first
        assert "1.0000" in page.evaluate("document.getElementById('scores').innerText")
        page.evaluate(
            "(() => { const s = document.getElementById('plane'); s.value = '2';"
            " s.dispatchEvent(new Event('input')); })()"
        )
        page.wait_for("document.getElementById('plane-name').textContent.startsWith('3 of 3')")
        third = plane_agreement(page, masks[2])
        assert third["mask_coloured"] > 0.97 and third["background_grey"] > 0.97, third
        table = page.evaluate("document.getElementById('scores').innerText")
        assert "1.0000" not in table.split("mean")[1], table  # plane 3's own, imperfect scores
        link = page.evaluate("document.getElementById('download').download")
        assert link == "stack.mask.tif"

        page.set_files("#image-input", channels)
        page.wait_for("!document.getElementById('channel-label').hidden")
        options = page.evaluate(
            "Array.from(document.getElementById('channel').options).map(o => o.textContent)"
        )
        assert options == ["0: DAPI", "1: GFP"]
        page.evaluate("document.getElementById('channel').value = '1'")
        page.evaluate("document.getElementById('truth-clear').click()")
        page.evaluate("document.getElementById('run').click()")
        page.wait_for("['done', 'error'].includes(document.body.dataset.state)")
        status = page.evaluate("document.getElementById('status').textContent")
        assert page.evaluate("document.body.dataset.state") == "done", status
        assert page.evaluate("document.getElementById('planes').hidden")
        gfp = plane_agreement(page, expected_toy_mask(two[1]))
        assert gfp["mask_coloured"] > 0.97 and gfp["background_grey"] > 0.97, gfp
        assert page.errors() == []
