"""The Python client and the ``segment-client`` command against a real uvicorn.

What a lab does with them: segment a folder that mixes good and broken files, get the masks,
the scores against ground truths, every failure with its reason and a non-zero exit, and run it
again to finish what is left. The client itself: arrays in and out, the service's errors as
exceptions with their code and request ID, and 503s retried after ``Retry-After``.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import os
import re
import stat
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile
from PIL import Image
from rich.console import Console
from segment_client import ClientError, SegmentClient, ServiceError
from segment_client.cli import run as cli_run
from segment_client.client import JobStatus

from bench.live_server import LiveServer
from bench.onnx_models import build_model
from tests.conftest import (
    expected_toy_mask,
    make_unloadable,
    png_bytes,
    random_image,
    tiff_bytes,
    toy_server,
    write_models,
)

REPO = Path(__file__).resolve().parents[1]
CLIENT = REPO / "client"


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The toy models behind a real uvicorn, shared by the module's tests."""
    with toy_server(model_dir, tmp_path_factory.mktemp("client_server")) as srv:
        yield srv


def toy_truth(img: np.ndarray) -> np.ndarray:
    """The exact answer of the ``toy`` model as a 0/1 truth."""
    return (expected_toy_mask(img) > 0).astype(np.uint8)


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Foreground IoU of two 0/1 masks."""
    inter = np.logical_and(pred, truth).sum()
    union = np.logical_or(pred, truth).sum()
    return float(inter / union)


# --- the library ----------------------------------------------------------------------------


def test_an_array_comes_back_as_a_mask_with_scores_and_timings(server: LiveServer) -> None:
    img = random_image(100, 140, seed=3)
    truth = toy_truth(img)
    truth[:10] = 1 - truth[:10]  # ten rows wrong: known scores
    with SegmentClient(server.url) as client:
        result = client.segment(img, ground_truth=truth)
        models = client.models()
    assert sorted(models) == ["toy", "toy3", "toy3lv", "toyobj"] and models["toy"]["default"]
    assert result.mask.shape == (100, 140) and result.mask.dtype == np.uint8
    np.testing.assert_array_equal(result.mask, toy_truth(img))
    assert result.scores is not None
    assert result.scores["iou"]["foreground"] == pytest.approx(iou(result.mask, truth))
    assert set(result.timings_ms) >= {"decode", "infer", "stitch", "encode"}
    assert result.request_id and result.document["model"] == "toy"


def test_paths_bytes_and_parameters_reach_the_service(server: LiveServer, tmp_path: Path) -> None:
    img = random_image(64, 64, seed=4, dtype=np.uint16)
    path = tmp_path / "cells.tif"
    path.write_bytes(tiff_bytes(img))
    with SegmentClient(server.url) as client:
        from_path = client.segment(path, model="toy3", overlap=0.5)
        from_bytes = client.segment(path.read_bytes(), model="toy3", overlap=0.5)
    assert from_path.document["model"] == "toy3" and from_path.document["overlap"] == 0.5
    np.testing.assert_array_equal(from_path.mask, from_bytes.mask)
    assert set(np.unique(from_path.mask)) <= {0, 1, 2}  # class indices, not palette colours


def test_the_services_errors_arrive_with_detail_code_and_request_id(server: LiveServer) -> None:
    with SegmentClient(server.url) as client:
        with pytest.raises(ServiceError) as bad:
            client.segment(b"GIF89a" + b"\0" * 64)
        with pytest.raises(ServiceError) as unknown:
            client.segment(random_image(8, 8), model="nope")
        with pytest.raises(ServiceError) as wrong_truth:
            client.segment(random_image(16, 16), ground_truth=np.zeros((8, 8), np.uint8))
    assert bad.value.status == 415 and bad.value.code == "unsupported_media_type"
    assert "GIF" in bad.value.detail and bad.value.request_id
    assert bad.value.request_id in str(bad.value)
    assert unknown.value.status == 404 and "toy" in unknown.value.detail
    assert wrong_truth.value.code == "invalid_ground_truth"
    assert "8x8" in wrong_truth.value.detail


def test_an_unreachable_service_and_a_missing_file_are_client_errors(tmp_path: Path) -> None:
    with SegmentClient("http://127.0.0.1:9", timeout=5) as client:
        with pytest.raises(ClientError, match="cannot reach the service"):
            client.segment(random_image(8, 8))
        with pytest.raises(ClientError, match="does not exist"):
            client.segment(tmp_path / "missing.tif")


def test_the_api_key_is_sent(model_dir: Path, tmp_path: Path) -> None:
    with toy_server(model_dir, tmp_path, api_key="s3cret") as srv:
        with SegmentClient(srv.url) as anonymous, pytest.raises(ServiceError) as refused:
            anonymous.segment(random_image(8, 8))
        with SegmentClient(srv.url, api_key="s3cret") as client:
            result = client.segment(random_image(8, 8))
    assert refused.value.status == 401 and refused.value.code == "unauthorized"
    assert result.mask.shape == (8, 8)


def test_a_busy_service_is_retried_after_retry_after(model_dir: Path, tmp_path: Path) -> None:
    """One worker, no queue: while a large image runs, the next request is a 503. Without
    retries the client raises it; with retries it waits Retry-After (2 s) and gets through."""
    big = png_bytes(random_image(3000, 3000, seed=5))
    with toy_server(model_dir, tmp_path, max_queue="0", retry_after_seconds="2") as srv:
        waits: list[float] = []

        def recording_sleep(seconds: float) -> None:
            waits.append(seconds)
            time.sleep(seconds)

        def occupy() -> None:
            httpx.post(f"{srv.url}/segment", files={"image": big}, timeout=300)

        with (
            SegmentClient(srv.url, retries=0) as impatient,
            SegmentClient(srv.url, retries=30, sleep=recording_sleep) as patient,
        ):
            worker = threading.Thread(target=occupy)
            worker.start()
            srv.wait_for_metric("segment_requests_in_flight", 1.0)
            with pytest.raises(ServiceError) as busy:
                impatient.segment(random_image(8, 8))
            result = patient.segment(random_image(8, 8))
            worker.join()
    assert busy.value.status == 503 and busy.value.code == "overloaded"
    assert busy.value.retry_after == 2.0
    assert waits and set(waits) == {2.0}, waits
    assert result.mask.shape == (8, 8)


def test_retries_are_bounded(model_dir: Path, tmp_path: Path) -> None:
    """A service that stays busy: the client gives up after its retries with the 503."""
    big = png_bytes(random_image(3000, 3000, seed=6))
    with toy_server(model_dir, tmp_path, max_queue="0", retry_after_seconds="1") as srv:
        waits: list[float] = []
        worker = threading.Thread(
            target=lambda: httpx.post(f"{srv.url}/segment", files={"image": big}, timeout=300)
        )
        worker.start()
        srv.wait_for_metric("segment_requests_in_flight", 1.0)
        with (
            SegmentClient(srv.url, retries=2, sleep=waits.append) as client,
            pytest.raises(ServiceError) as busy,
        ):
            client.segment(random_image(8, 8))
        worker.join()
    assert busy.value.status == 503 and waits == [1.0, 1.0]


def test_a_model_file_that_does_not_load_is_not_retried(tmp_path: Path) -> None:
    """Its 503 has no Retry-After and says the file must be replaced: the client raises it at
    once, whatever its retries."""
    root = write_models(tmp_path / "models")
    build_model(root / "toy" / "0" / "model.onnx", name="toy", tile_size=64, version="0")
    make_unloadable(root / "toy" / "0" / "model.onnx")
    waits: list[float] = []
    with (
        toy_server(root, tmp_path) as srv,
        SegmentClient(srv.url, retries=5, sleep=waits.append) as client,
    ):
        with pytest.raises(ServiceError) as lasting:
            client.segment(random_image(8, 8), model="toy@0")
        assert client.segment(random_image(8, 8)).mask.shape == (8, 8)
    assert lasting.value.code == "model_unavailable" and not lasting.value.retryable
    assert "must be replaced" in lasting.value.detail and waits == []


# --- the command ----------------------------------------------------------------------------


def make_folder(root: Path) -> dict[str, np.ndarray]:
    """A lab's folder: good PNG and 16-bit TIFF images with truths, and broken files."""
    images, truths = root / "images", root / "truths"
    images.mkdir(parents=True)
    truths.mkdir()
    good: dict[str, np.ndarray] = {}
    for i in range(3):
        img = random_image(80 + 10 * i, 120, seed=10 + i)
        (images / f"cell_{i}.png").write_bytes(png_bytes(img))
        truth = toy_truth(img)
        truth[: 5 * (i + 1)] = 0  # each image a little wrong, differently
        (truths / f"cell_{i}_mask.png").write_bytes(png_bytes(truth * 255))
        good[f"cell_{i}"] = truth
    img16 = random_image(70, 90, seed=20, dtype=np.uint16) * 64  # full 16-bit range
    (images / "deep.tif").write_bytes(tiff_bytes(img16))
    good["deep"] = np.zeros(0)  # no truth for this one
    # Broken: a truncated PNG, a text file named .tif, a GIF, and a truth of the wrong size.
    (images / "truncated.png").write_bytes(png_bytes(random_image(64, 64, seed=1))[:80])
    (images / "notes.tif").write_bytes(b"not an image at all\n" * 20)
    gif = io.BytesIO()
    Image.fromarray(random_image(16, 16)).save(gif, format="GIF")
    (images / "anim.tif").write_bytes(gif.getvalue())
    wrong = random_image(40, 40, seed=30)
    (images / "wrong_truth.png").write_bytes(png_bytes(wrong))
    (truths / "wrong_truth.png").write_bytes(png_bytes(np.zeros((20, 20), np.uint8)))
    (images / "README.txt").write_text("not picked up: not an image suffix")
    return good


def run_cli(args: list[str]) -> tuple[int, str]:
    """``segment-client`` in-process; its exit status and what it printed."""
    out = io.StringIO()
    console = Console(file=out, width=400, force_terminal=False)
    status = cli_run(args, console=console)
    return status, out.getvalue()


def test_a_folder_of_good_and_broken_files(server: LiveServer, tmp_path: Path) -> None:
    truths = make_folder(tmp_path)
    out = tmp_path / "masks"
    args = [str(tmp_path / "images"), "--out", str(out), "--url", server.url]
    args += ["--truth-dir", str(tmp_path / "truths"), "--concurrency", "2"]
    status, printed = run_cli(args)

    assert status == 1, printed
    written = sorted(p.name for p in out.iterdir() if p.suffix == ".png")
    assert written == ["cell_0.png", "cell_1.png", "cell_2.png", "deep.png"]
    for name in ("cell_0", "cell_1", "cell_2"):
        mask = np.asarray(Image.open(out / f"{name}.png"))
        img = np.asarray(Image.open(tmp_path / "images" / f"{name}.png"))
        np.testing.assert_array_equal(mask, expected_toy_mask(img))
    # Every failure, with the service's reason and code.
    assert "8 images: 4 segmented, 0 skipped" in printed and "4 failed" in printed
    assert "truncated.png (invalid_image)" in printed and "damaged or truncated PNG" in printed
    assert "notes.tif (unsupported_media_type)" in printed
    assert "anim.tif (unsupported_media_type)" in printed and "GIF" in printed
    assert "wrong_truth.png (invalid_ground_truth)" in printed and "20x20" in printed
    assert "request " in printed
    # Scores: one row per image with a truth, the mean over images, and all pixels pooled.
    doc = json.loads((out / "metrics.json").read_text())
    by_image = {i["image"]: i for i in doc["images"]}
    assert sorted(by_image) == ["cell_0", "cell_1", "cell_2"]
    for name, row in by_image.items():
        pred = np.asarray(Image.open(out / f"{name}.png")) > 0
        assert row["iou"]["foreground"] == pytest.approx(iou(pred, truths[name]))
        assert row["truth"].endswith(f"{name}_mask.png")
    expected_mean = np.mean([r["mean_iou"] for r in by_image.values()])
    assert doc["mean"]["mean_iou"] == pytest.approx(expected_mean)
    assert doc["pooled"]["iou"]["foreground"] < 1.0
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == [
        "cell_0",
        "cell_1",
        "cell_2",
        "mean over images",
        "all pixels pooled",
    ]
    first = by_image["cell_0"]["iou"]["foreground"]
    assert float(rows[0]["iou_foreground"]) == pytest.approx(first, abs=1e-6)
    assert float(rows[3]["mean_iou"]) == pytest.approx(expected_mean, abs=1e-6)

    # Resume: the masks that exist are skipped (their scores kept); the broken files fail again.
    (out / "cell_1.png").unlink()
    status, printed = run_cli(args)
    assert status == 1
    assert "8 images: 1 segmented, 3 skipped" in printed and "4 failed" in printed
    again = json.loads((out / "metrics.json").read_text())
    assert sorted(i["image"] for i in again["images"]) == ["cell_0", "cell_1", "cell_2"]
    assert again["mean"]["mean_iou"] == pytest.approx(doc["mean"]["mean_iou"])


def test_big_images_go_through_jobs_with_the_same_outcome(
    server: LiveServer, tmp_path: Path
) -> None:
    """With ``--progress-above`` under the images' size every image is a job (whose tiles the
    progress bar shows): the same masks, scores and failures as the synchronous path."""
    make_folder(tmp_path)
    out = tmp_path / "masks"
    args = [str(tmp_path / "images"), "--out", str(out), "--url", server.url]
    args += ["--truth-dir", str(tmp_path / "truths"), "--progress-above", "100"]
    status, printed = run_cli(args)
    assert status == 1 and "8 images: 4 segmented, 0 skipped" in printed and "4 failed" in printed
    assert "truncated.png (invalid_image)" in printed and "damaged or truncated PNG" in printed
    assert "wrong_truth.png (invalid_ground_truth)" in printed and "20x20" in printed
    for name in ("cell_0", "cell_1", "cell_2"):
        mask = np.asarray(Image.open(out / f"{name}.png"))
        img = np.asarray(Image.open(tmp_path / "images" / f"{name}.png"))
        np.testing.assert_array_equal(mask, expected_toy_mask(img))
    doc = json.loads((out / "metrics.json").read_text())
    assert [i["image"] for i in doc["images"]] == ["cell_0", "cell_1", "cell_2"]
    log = server.output(200_000)
    assert log.count("POST /jobs") >= 6  # every image whose header says > 100 pixels


def test_globs_single_files_and_a_clean_exit(server: LiveServer, tmp_path: Path) -> None:
    make_folder(tmp_path)
    out = tmp_path / "masks"
    pattern = str(tmp_path / "images" / "cell_*.png")
    status, printed = run_cli([pattern, "--out", str(out), "--url", server.url, "--no-progress"])
    assert status == 0, printed
    assert sorted(p.name for p in out.iterdir()) == ["cell_0.png", "cell_1.png", "cell_2.png"]
    status, printed = run_cli([pattern, "--out", str(out), "--url", server.url])
    assert status == 0 and "0 segmented, 3 skipped" in printed


def test_the_precision_reaches_the_service(server: LiveServer, tmp_path: Path) -> None:
    """``--precision`` is the service's ``precision=``: fp32 runs; int8, which the toy model
    does not have, is the service's 422 naming what it has, per image."""
    make_folder(tmp_path)
    pattern = str(tmp_path / "images" / "cell_0.png")
    base = [pattern, "--url", server.url, "--no-progress"]
    status, printed = run_cli([*base, "--out", str(tmp_path / "a"), "--precision", "fp32"])
    assert status == 0 and (tmp_path / "a" / "cell_0.png").is_file(), printed
    status, printed = run_cli([*base, "--out", str(tmp_path / "b"), "--precision", "int8"])
    assert status == 1 and "(invalid_parameter)" in printed and "['fp32']" in printed, printed


def test_nothing_to_do_is_a_usage_error(tmp_path: Path) -> None:
    status, printed = run_cli([str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert status == 2 and "no such file or folder" in printed
    status, printed = run_cli([str(tmp_path / "*.tif"), "--out", str(tmp_path / "o")])
    assert status == 2 and "no file matches" in printed
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(png_bytes(random_image(8, 8)))
    (tmp_path / "b" / "x.png").write_bytes(png_bytes(random_image(8, 8)))
    status, printed = run_cli(
        [str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png"), "--out", str(tmp_path)]
    )
    assert status == 2 and "would write the same mask" in printed


def test_the_command_is_installed_and_answers_help() -> None:
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "segment-client"), "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0 and "--truth-dir" in proc.stdout and "--concurrency" in proc.stdout


# --- installable on its own -----------------------------------------------------------------


def client_dependencies() -> set[str]:
    """Import names of what ``client/pyproject.toml`` declares."""
    config = tomllib.loads((CLIENT / "pyproject.toml").read_text())
    declared = config["project"]["dependencies"]
    names = {re.split(r"[<>=\[ ;]", d, maxsplit=1)[0] for d in declared}
    return {{"pillow": "PIL"}.get(n, n) for n in names}


def test_the_client_imports_only_what_it_declares() -> None:
    """Read from the source: the standard library, its declared dependencies and itself; never
    the service (whose dependencies a lab's laptop does not have)."""
    allowed = client_dependencies() | set(sys.stdlib_module_names) | {"segment_client"}
    assert "fastapi" not in allowed and "service" not in allowed
    wrong = set()
    for path in sorted((CLIENT / "segment_client").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            wrong |= {f"{path.name}: {n}" for n in names if n.split(".")[0] not in allowed}
    assert not wrong, sorted(wrong)


def test_importing_the_client_loads_nothing_of_the_service() -> None:
    code = (
        "import sys, segment_client, segment_client.cli\n"
        "heavy = {'service', 'training', 'fastapi', 'starlette', 'onnxruntime', 'uvicorn'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_stacks_are_written_as_multipage_tiffs(server: LiveServer, tmp_path: Path) -> None:
    """A Z stack's mask is a multi-page TIFF with its axes; a two-channel image needs
    ``--channel``, and gets a PNG (one plane)."""
    folder = tmp_path / "images"
    folder.mkdir()
    zyx = np.stack([random_image(40, 60, seed=s) for s in range(3)])
    tifffile.imwrite(folder / "zstack.ome.tif", zyx, ome=True, metadata={"axes": "ZYX"})
    cyx = np.stack([random_image(40, 60, seed=s) for s in (7, 8)])
    tifffile.imwrite(
        folder / "two_channels.ome.tif",
        cyx,
        ome=True,
        metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "GFP"]}},
    )
    out = tmp_path / "masks"
    status, printed = run_cli([str(folder), "--out", str(out), "--url", server.url])
    assert status == 1 and "two_channels.ome.tif (invalid_parameter)" in printed
    assert "0 (DAPI), 1 (GFP)" in printed
    stack = tifffile.TiffFile(out / "zstack.ome.tif")
    assert stack.series[0].axes == "ZYX"
    expected = np.stack([expected_toy_mask(p) for p in zyx])
    np.testing.assert_array_equal(stack.series[0].asarray(), expected)

    status, printed = run_cli(
        [str(folder), "--out", str(out), "--url", server.url, "--channel", "GFP"]
    )
    assert status == 0, printed
    gfp = np.asarray(Image.open(out / "two_channels.ome.png"))
    np.testing.assert_array_equal(gfp, expected_toy_mask(cyx[1]))


# --- instances ------------------------------------------------------------------------------


def test_labels_and_the_object_table_come_back(server: LiveServer) -> None:
    from tests.test_instances import CENTRES, nuclei_image

    image, truth = nuclei_image(200, 200, CENTRES)
    with SegmentClient(server.url) as client:
        result = client.segment(image, model="toyobj", output="labels", ground_truth=truth)
    assert result.labels is not None and result.labels.dtype == np.uint16
    assert result.labels.max() == len(CENTRES) and result.objects is not None
    assert [row["id"] for row in result.objects] == list(range(1, len(CENTRES) + 1))
    assert result.object_scores is not None and result.object_scores["f1"] == 1.0
    np.testing.assert_array_equal(result.mask, truth > 0)


def test_the_command_writes_label_images_and_objects_csv(
    server: LiveServer, tmp_path: Path
) -> None:
    from tests.test_instances import CENTRES, nuclei_image

    images, truths, out = tmp_path / "images", tmp_path / "truths", tmp_path / "out"
    images.mkdir()
    truths.mkdir()
    for i in range(2):
        image, truth = nuclei_image(200, 200, CENTRES[: 3 + i])
        (images / f"well_{i}.png").write_bytes(png_bytes(image))
        (truths / f"well_{i}.tif").write_bytes(tiff_bytes(truth.astype(np.uint16)))
    args = [str(images), "--out", str(out), "--url", server.url, "--model", "toyobj"]
    args += ["--output", "labels", "--truth-dir", str(truths)]
    status, printed = run_cli(args)
    assert status == 0, printed
    assert "7 objects in" in printed
    labels = np.asarray(Image.open(out / "well_1.labels.png"))
    assert labels.max() == 4 and (out / "well_1.png").is_file()
    with (out / "objects.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["image"], r["id"]) for r in rows][:4] == [
        ("well_0", "1"), ("well_0", "2"), ("well_0", "3"), ("well_1", "1"),
    ]  # fmt: skip
    assert {"area", "centroid_x", "equivalent_diameter", "mean_intensity"} <= set(rows[0])
    with (out / "metrics.csv").open() as f:
        metrics = list(csv.DictReader(f))
    assert metrics[0]["objects_f1"] == metrics[0]["objects_labelled_f1"] == "1.000000"
    assert metrics[-1]["objects_labelled_f1"] == ""  # the summary rows: per image only

    # A resumed run keeps the skipped images' objects.
    (out / "well_1.png").unlink()
    status, printed = run_cli(args)
    assert status == 0 and "7 objects in" in printed, printed


def test_written_files_follow_the_umask_and_one_image_is_one_image(
    server: LiveServer, tmp_path: Path
) -> None:
    """Colleagues can read the masks: files follow the umask (027 gives 0640, not mkstemp's
    0600), and the summary says "1 image"."""
    image = tmp_path / "cell.png"
    image.write_bytes(png_bytes(random_image(40, 40, seed=9)))
    truth = tmp_path / "truths"
    truth.mkdir()
    (truth / "cell.png").write_bytes(png_bytes(toy_truth(random_image(40, 40, seed=9))))
    out = tmp_path / "out"
    old = os.umask(0o027)  # not the umask the client was imported under
    try:
        status, printed = run_cli(
            [str(image), "--out", str(out), "--url", server.url, "--truth-dir", str(truth)]
        )
    finally:
        os.umask(old)
    assert status == 0, printed
    assert "1 image: 1 segmented" in printed and "scores for 1 image with" in printed
    for name in ("cell.png", "metrics.csv", "metrics.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o640, name


def test_a_job_status_reads_as_one_line() -> None:
    doc = {
        "id": "abc",
        "state": "running",
        "tiles_done": 40,
        "tiles_total": 121,
        "eta_seconds": 12.4,
        "error": None,
    }
    status = JobStatus.from_json(doc)
    assert str(status) == "running, tiles 40/121 (33 %), ETA 12 s"
    assert "raw" not in repr(status)
    done = JobStatus.from_json({**doc, "state": "failed", "error": {"detail": "bad image"}})
    assert str(done) == "failed, tiles 40/121 (33 %), bad image"
