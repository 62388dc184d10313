"""Stacks and channels: multi-page TIFF and OME-TIFF, ``channel=``, plane-by-plane masks as a
multi-page TIFF with the image's axes, per-plane and overall scores, the pixel limit on the
whole stack, the OME physical pixel size, and a clear 422 for an ambiguous image.

The ``toy`` model thresholds ``x / 255`` at 0.5 per pixel, so every plane's exact mask is known.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tifffile
from fastapi.testclient import TestClient
from PIL import Image
from segment_client import SegmentClient

from tests.conftest import expected_toy_mask, random_image, tiff_bytes, toy_server

H, W = 40, 56


def ome(data: np.ndarray, axes: str, **metadata: Any) -> bytes:
    """An OME-TIFF written by tifffile."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, data, ome=True, metadata={"axes": axes, **metadata})
    return buf.getvalue()


def stack_tiff(data: np.ndarray) -> bytes:
    """A plain multi-page TIFF, one page per plane (tifffile's shaped metadata: axes QYX)."""
    return tiff_bytes(data, photometric="minisblack")


def planes(n: int, seed: int = 0) -> np.ndarray:
    return np.stack([random_image(H, W, seed=seed + i) for i in range(n)])


def toy(stack: np.ndarray) -> np.ndarray:
    """The toy model's exact mask of every plane, 0/255."""
    flat = stack.reshape(-1, *stack.shape[-2:])
    return np.stack([expected_toy_mask(p) for p in flat]).reshape(stack.shape)


def post(client: TestClient, image: bytes, truth: bytes | None = None, **params: Any) -> Any:
    files = {"image": ("image.tif", image)}
    if truth is not None:
        files["ground_truth"] = ("truth.tif", truth)
    return client.post("/segment", files=files, params=params)


def read_tiff(data: bytes) -> tuple[np.ndarray, str, tifffile.TiffFile]:
    tif = tifffile.TiffFile(io.BytesIO(data))
    return tif.series[0].asarray(), tif.series[0].axes, tif


DAPI_GFP = planes(2, seed=40)
CYX = ome(DAPI_GFP, "CYX", Channel={"Name": ["DAPI", "GFP"]}, PhysicalSizeX=0.65,
          PhysicalSizeY=0.65)  # fmt: skip


def test_an_ambiguous_multichannel_image_is_a_422_listing_its_channels(
    client: TestClient,
) -> None:
    r = post(client, CYX)
    assert r.status_code == 422 and r.json()["code"] == "invalid_parameter"
    detail = r.json()["detail"]
    assert "2 channels" in detail and "0 (DAPI)" in detail and "1 (GFP)" in detail
    assert "channel=" in detail
    unknown = post(client, CYX, channel="mCherry")
    assert unknown.status_code == 422 and "mCherry" in unknown.json()["detail"]
    assert "DAPI" in unknown.json()["detail"]
    assert post(client, CYX, channel="2").status_code == 422


@pytest.mark.parametrize("channel", ["GFP", "gfp", "1"])
def test_channel_picks_one_channel_by_name_or_index(client: TestClient, channel: str) -> None:
    r = post(client, CYX, channel=channel, format="json")
    assert r.status_code == 200, r.text
    body = r.json()
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png"]))))
    np.testing.assert_array_equal(mask, expected_toy_mask(DAPI_GFP[1]))
    assert body["image"]["format"] == "OME-TIFF" and body["image"]["channel"] == "GFP"
    assert body["image"]["physical_pixel_size"] == {"x": 0.65, "y": 0.65, "z": None, "unit": "µm"}


def test_rgb_samples_can_be_picked_too(client: TestClient) -> None:
    rgb = np.dstack([random_image(H, W, seed=s) for s in (1, 2, 3)])
    r = post(client, tiff_bytes(rgb, photometric="rgb"), channel="green")
    assert r.status_code == 200
    mask = np.asarray(Image.open(io.BytesIO(r.content)))
    np.testing.assert_array_equal(mask, expected_toy_mask(rgb[..., 1]))


def test_a_z_stack_comes_back_as_a_multipage_tiff_with_its_axes(client: TestClient) -> None:
    zyx = planes(5, seed=1)
    r = post(client, ome(zyx, "ZYX", PhysicalSizeX=0.2, PhysicalSizeY=0.2, PhysicalSizeZ=1.5),
             format="tiff")  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/tiff"
    mask, axes, tif = read_tiff(r.content)
    assert axes == "ZYX" and mask.shape == (5, H, W) and len(tif.pages) == 5
    np.testing.assert_array_equal(mask, toy(zyx))
    assert 'PhysicalSizeZ="1.5"' in (tif.ome_metadata or "")
    # Each plane is what /segment gives for that plane sent alone.
    alone = post(client, tiff_bytes(zyx[3]), format="tiff")
    np.testing.assert_array_equal(read_tiff(alone.content)[0], mask[3])
    # A stack asked for as one PNG: the 422 says what to ask for.
    png = post(client, stack_tiff(zyx))
    assert png.status_code == 422 and "format=tiff" in png.json()["detail"]


def test_plain_multipage_tiffs_are_stacks_too(client: TestClient) -> None:
    stack = planes(3, seed=9)
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tw:
        for p in stack:
            tw.write(p)  # three separate pages, no metadata
    r = post(client, buf.getvalue(), format="tiff")
    assert r.status_code == 200, r.text
    mask, axes, _ = read_tiff(r.content)
    assert axes.endswith("YX") and mask.shape == (3, H, W)
    np.testing.assert_array_equal(mask, toy(stack))


def test_tczyx_with_a_channel_gives_per_plane_and_overall_scores(client: TestClient) -> None:
    data = np.stack(
        [np.stack([planes(3, seed=10 * t + 5 * c) for c in range(2)]) for t in range(2)]
    )  # T, C, Z, Y, X
    assert data.shape == (2, 2, 3, H, W)
    names = {"Name": ["DAPI", "GFP"]}
    image = ome(data, "TCZYX", Channel=names, PhysicalSizeX=0.5, PhysicalSizeY=0.5)
    dapi = data[:, 0]
    truth = (toy(dapi) > 0).astype(np.uint8)
    truth[1, 2, :10] = 1 - truth[1, 2, :10]  # one plane partly wrong
    r = post(client, image, ome(truth, "TZYX"), channel="DAPI", format="json")
    assert r.status_code == 200, r.text
    body = r.json()
    mask = tifffile.imread(io.BytesIO(base64.b64decode(body["mask_tiff"])))
    assert mask.shape == (2, 3, H, W)
    np.testing.assert_array_equal(mask, toy(dapi))
    info = body["image"]
    assert info["axes"] == "TCZYX" and info["plane_axes"] == "TZ" and info["planes"] == 6
    assert info["channels"] == ["DAPI", "GFP"] and info["channel"] == "DAPI"
    assert info["physical_pixel_size"]["x"] == 0.5
    planes_ = body["planes"]
    assert [p["index"] for p in planes_] == [{"T": t, "Z": z} for t in range(2) for z in range(3)]
    wrong = planes_[-1]["metrics"]["iou"]["foreground"]
    assert wrong < 1.0
    assert all(p["metrics"]["mean_iou"] == 1.0 for p in planes_[:-1])
    pred, true = mask > 0, truth > 0
    pooled = np.logical_and(pred, true).sum() / np.logical_or(pred, true).sum()
    assert body["metrics"]["iou"]["foreground"] == pytest.approx(pooled)
    assert body["tiles"] == 6  # one 64-pixel tile per 40x56 plane


def test_a_stack_truth_must_have_the_stacks_shape(client: TestClient) -> None:
    zyx = stack_tiff(planes(4))
    flat = post(client, zyx, tiff_bytes(np.zeros((H, W), np.uint8)), format="json")
    fewer = post(client, zyx, stack_tiff(np.zeros((3, H, W), np.uint8)), format="json")
    for r in (flat, fewer):
        assert r.status_code == 422 and r.json()["code"] == "invalid_ground_truth"
    assert "same planes and size" in flat.json()["detail"]
    assert "(3, 40, 56)" in fewer.json()["detail"] and "(4, 40, 56)" in fewer.json()["detail"]


def test_the_pixel_limit_counts_every_plane(make_client: Any) -> None:
    """Ten planes of 40x56: each plane (2,240 pixels) is under a 10,000-pixel limit, the
    stack (22,400) is not."""
    with make_client(max_image_pixels=10_000) as c:
        r = post(c, stack_tiff(planes(10)), format="tiff")
        one = post(c, tiff_bytes(planes(1)[0]), format="tiff")
    assert r.status_code == 413 and r.json()["code"] == "too_large"
    assert "10 planes" in r.json()["detail"] and "22,400" in r.json()["detail"]
    assert one.status_code == 200


def test_a_2d_mask_as_tiff(client: TestClient) -> None:
    img = random_image(H, W, seed=3)
    r = post(client, tiff_bytes(img), format="tiff")
    assert r.headers["content-type"] == "image/tiff"
    np.testing.assert_array_equal(read_tiff(r.content)[0], expected_toy_mask(img))


def test_stacks_through_a_job_and_the_client(model_dir: Path, tmp_path: Path) -> None:
    zyx = planes(4, seed=20)
    path = tmp_path / "stack.ome.tif"
    path.write_bytes(ome(zyx, "ZYX"))
    with toy_server(model_dir, tmp_path / "srv") as srv, SegmentClient(srv.url) as client:
        via_job = client.segment(path, progress=lambda s: None)
        direct = client.segment(path)
        job = httpx.post(f"{srv.url}/jobs", files={"image": path.read_bytes()}).json()
        client.wait(job["id"])
        as_tiff = httpx.get(f"{srv.url}/jobs/{job['id']}/result", params={"format": "tiff"})
        status = client.job(job["id"])
    np.testing.assert_array_equal(via_job.mask, toy(zyx) > 0)
    np.testing.assert_array_equal(direct.mask, via_job.mask)
    assert via_job.mask_format == "tiff" and via_job.document["image"]["planes"] == 4
    assert status.tiles_total == 4 and status.tiles_done == 4
    np.testing.assert_array_equal(read_tiff(as_tiff.content)[0], toy(zyx))


def test_an_imagej_hyperstack_channel_reads_only_its_pages(client: TestClient) -> None:
    """ZCYX as ImageJ writes it (pages Z-major): the chosen channel's planes, in Z order."""
    data = np.stack([planes(2, seed=60 + 2 * z) for z in range(3)])  # Z, C, Y, X
    buf = io.BytesIO()
    tifffile.imwrite(buf, data, imagej=True, metadata={"axes": "ZCYX"})
    layout_axes = tifffile.TiffFile(io.BytesIO(buf.getvalue())).series[0].axes
    assert layout_axes == "ZCYX"
    r = post(client, buf.getvalue(), channel="1", format="tiff")
    assert r.status_code == 200, r.text
    mask, axes, _ = read_tiff(r.content)
    assert axes == "ZYX"
    np.testing.assert_array_equal(mask, toy(data[:, 1]))
    ambiguous = post(client, buf.getvalue(), format="tiff")
    assert ambiguous.status_code == 422 and "2 channels" in ambiguous.json()["detail"]


def test_each_planes_class_masks_and_preview_for_the_page(client: TestClient) -> None:
    """What the page shows a stack with, plane by plane: ``per_class`` gives each plane's
    class PNGs, and ``/preview`` previews any plane and says how many there are; a
    multi-channel image's preview names its channels."""
    zyx = planes(3, seed=60)
    r = post(client, ome(zyx, "ZYX"), format="json", per_class="true")
    assert r.status_code == 200, r.text
    per_plane = r.json()["plane_class_masks"]
    assert len(per_plane) == 3 and r.json()["plane_outlines_png"] is None
    for k, masks in enumerate(per_plane):
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(masks["foreground"]))))
        np.testing.assert_array_equal(got, toy(zyx)[k])
    assert post(client, ome(zyx, "ZYX"), format="json").json()["plane_class_masks"] is None

    def preview(image: bytes, **params: Any) -> Any:
        return client.post("/preview", files={"image": ("i.tif", image)}, params=params)

    first, third = preview(ome(zyx, "ZYX")), preview(ome(zyx, "ZYX"), plane=2)
    assert first.headers["X-Image-Planes"] == "3" and "X-Image-Channels" not in first.headers
    assert first.content != third.content
    shown = np.asarray(Image.open(io.BytesIO(third.content))).astype(int)
    assert np.corrcoef(shown.ravel(), zyx[2].ravel())[0, 1] > 0.99  # plane 3, stretched
    wrong = preview(ome(zyx, "ZYX"), plane=3)
    assert wrong.status_code == 422 and "it has 3 (0 to 2)" in wrong.json()["detail"]
    named = preview(CYX, channel="GFP")
    assert named.status_code == 200 and json.loads(named.headers["X-Image-Channels"]) == [
        "DAPI",
        "GFP",
    ]
    assert named.headers["X-Image-Planes"] == "1"


def test_each_planes_outlines_for_a_model_with_instances(make_client: Any) -> None:
    from tests.test_instances import CENTRES, nuclei_image

    img, _ = nuclei_image(120, 120, CENTRES)
    stack = np.stack([img, img[::-1]])
    with make_client(default_model="toyobj") as c:
        r = post(c, ome(stack, "ZYX"), format="json", per_class="true", output="labels")
    assert r.status_code == 200, r.text
    lines = [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(p))))
        for p in r.json()["plane_outlines_png"]
    ]
    assert len(lines) == 2 and all(o.max() == 255 for o in lines)
    np.testing.assert_array_equal(lines[1], lines[0][::-1])  # plane 2 is plane 1 upside down
