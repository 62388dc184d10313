"""``/jobs``: progress on long work, against a real uvicorn.

A job answers 202 at once, reports tiles done of the total and an ETA while it runs, gives what
``/segment`` would have given (byte for byte), can be cancelled while it waits or runs, shares
``/segment``'s admission (503 when full), and its results are bounded in count, bytes and age,
lost only by their TTL (or their owner's DELETE).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from segment_client import JobStatus, SegmentClient

from bench.live_server import LiveServer
from tests.conftest import expected_toy_mask, png_bytes, random_image, toy_server

BIG = 3000  # toy model, tile 64: 54 x 54 = 2916 tiles (overlap 0.125), a few seconds
POLL_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def big_png() -> bytes:
    return png_bytes(random_image(BIG, BIG, seed=7))


def post_job(srv: LiveServer, image: bytes, truth: bytes | None = None, **params: Any) -> dict:
    files = {"image": ("image.png", image)}
    if truth is not None:
        files["ground_truth"] = ("truth.png", truth)
    r = httpx.post(f"{srv.url}/jobs", files=files, params=params, timeout=60)
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/jobs/{r.json()['id']}"
    return dict(r.json())


def status(srv: LiveServer, job_id: str) -> dict:
    r = httpx.get(f"{srv.url}/jobs/{job_id}", timeout=10)
    assert r.status_code == 200, r.text
    return dict(r.json())


def wait_until(srv: LiveServer, job_id: str, predicate: Any) -> dict:
    """Poll the job until ``predicate(status)`` holds (bounded)."""
    deadline = time.monotonic() + POLL_TIMEOUT_S
    while True:
        doc = status(srv, job_id)
        if predicate(doc):
            return doc
        assert time.monotonic() < deadline, doc
        time.sleep(0.02)


def finished(doc: dict) -> bool:
    return doc["state"] in ("succeeded", "failed", "cancelled")


# New jobs a test may post when a poll comes only after the toy job's last tile (below).
RETRIES = 5


def test_a_job_reports_progress_and_answers_what_segment_answers(
    model_dir: Path, tmp_path: Path, big_png: bytes
) -> None:
    """The toy job runs about 0.3 s on a Zen 5 core: where a poll starved beside CI's other
    tests comes only after its last tile, the job is posted again, up to RETRIES times."""
    with toy_server(model_dir, tmp_path) as srv:
        for _ in range(RETRIES):
            created = post_job(srv, big_png)
            assert created["state"] in ("queued", "running") and created["tiles_done"] == 0
            running = wait_until(
                srv, created["id"], lambda d: 0 < d["tiles_done"] < 54 * 54 or finished(d)
            )
            if not finished(running):
                break
        assert running["state"] == "running" and running["tiles_total"] == 54 * 54
        assert running["eta_seconds"] is not None and running["eta_seconds"] > 0
        assert 0 < running["progress"] < 1
        done = wait_until(srv, created["id"], finished)
        assert done["state"] == "succeeded" and done["tiles_done"] == done["tiles_total"]
        assert done["expires_at"] > done["finished_at"] and done["error"] is None

        result = httpx.get(f"{srv.url}{done['result_url']}", timeout=30)
        again = httpx.get(f"{srv.url}{done['result_url']}", timeout=30)  # kept until the TTL
        direct = httpx.post(f"{srv.url}/segment", files={"image": big_png}, timeout=300)
    assert result.status_code == 200 and result.headers["content-type"] == "image/png"
    assert result.content == direct.content == again.content
    assert result.headers["x-model"] == direct.headers["x-model"]


def test_a_job_with_a_truth_gives_the_json_answer(model_dir: Path, tmp_path: Path) -> None:
    img = random_image(200, 300, seed=8)
    truth = (expected_toy_mask(img) > 0).astype(np.uint8)
    with toy_server(model_dir, tmp_path) as srv:
        job = post_job(srv, png_bytes(img), png_bytes(truth), per_class="true")
        done = wait_until(srv, job["id"], finished)
        r = httpx.get(f"{srv.url}/jobs/{job['id']}/result", params={"format": "json"}, timeout=30)
    doc = r.json()
    assert r.status_code == 200 and doc["request_id"] == job["request_id"]
    assert doc["metrics"]["mean_iou"] == 1.0 and set(doc["class_masks"]) == {
        "background",
        "foreground",
    }
    assert doc["tiles"] == done["tiles_total"] == 4 * 6  # 200x300, tile 64, step 48


def test_a_failed_job_says_why_as_segment_would(model_dir: Path, tmp_path: Path) -> None:
    broken = png_bytes(random_image(64, 64))[:80]
    with toy_server(model_dir, tmp_path) as srv:
        job = post_job(srv, broken)
        done = wait_until(srv, job["id"], finished)
        result = httpx.get(f"{srv.url}/jobs/{job['id']}/result", timeout=10)
        unknown = httpx.get(f"{srv.url}/jobs/{'0' * 32}", timeout=10)
        malformed = httpx.get(f"{srv.url}/jobs/nope", timeout=10)
        bad_param = httpx.post(
            f"{srv.url}/jobs", files={"image": broken}, params={"overlap": 2}, timeout=10
        )
    assert done["state"] == "failed"
    assert done["error"]["status"] == 422 and done["error"]["code"] == "invalid_image"
    assert "damaged or truncated PNG" in done["error"]["detail"]
    assert result.status_code == 422 and result.json()["code"] == "invalid_image"
    assert unknown.status_code == 404 and "expired" in unknown.json()["detail"]
    assert malformed.status_code == 422
    assert bad_param.status_code == 422 and "overlap" in bad_param.json()["detail"]


def test_cancelling_a_running_job_frees_its_worker(
    model_dir: Path, tmp_path: Path, big_png: bytes
) -> None:
    """The toy job runs about 0.3 s on a Zen 5 core: a cancel that arrives after its last tile
    (a client starved beside CI's other tests; seen once) finds it succeeded, so it is tried
    again on a new job, up to RETRIES times."""
    with toy_server(model_dir, tmp_path, max_queue="0") as srv:
        for _ in range(RETRIES):
            job = post_job(srv, big_png)
            wait_until(srv, job["id"], lambda d: d["tiles_done"] > 0)
            deleted = httpx.delete(f"{srv.url}/jobs/{job['id']}", timeout=10)
            assert deleted.status_code == 200
            done = wait_until(srv, job["id"], finished)
            srv.wait_for_metric("segment_requests_in_flight", 0.0)
            if done["state"] != "succeeded":
                break
        after = httpx.post(f"{srv.url}/segment", files={"image": png_bytes(random_image(8, 8))})
        result = httpx.get(f"{srv.url}/jobs/{job['id']}/result", timeout=10)
    assert done["state"] == "cancelled" and done["tiles_done"] < done["tiles_total"]
    assert result.status_code == 410 and result.json()["code"] == "job_cancelled"
    assert after.status_code == 200


def test_jobs_share_the_admission_of_segment(
    model_dir: Path, tmp_path: Path, big_png: bytes
) -> None:
    """One worker and one place to wait: a running job and a queued one fill the service; the
    next job and the next /segment are refused at once, the queued job can be cancelled."""
    small = png_bytes(random_image(8, 8))
    with toy_server(model_dir, tmp_path, max_queue="1", retry_after_seconds="3") as srv:
        first = post_job(srv, big_png)
        second = post_job(srv, small)
        assert status(srv, second["id"])["state"] == "queued"
        refused_job = httpx.post(f"{srv.url}/jobs", files={"image": small}, timeout=10)
        refused_sync = httpx.post(f"{srv.url}/segment", files={"image": small}, timeout=10)
        cancelled = httpx.delete(f"{srv.url}/jobs/{second['id']}", timeout=10).json()
        # The place the queued job held is free again at once.
        accepted = post_job(srv, small)
        httpx.delete(f"{srv.url}/jobs/{first['id']}", timeout=10)
        assert wait_until(srv, accepted["id"], finished)["state"] == "succeeded"
    for refused in (refused_job, refused_sync):
        assert refused.status_code == 503 and refused.headers["retry-after"] == "3"
        assert refused.json()["code"] == "overloaded"
    assert cancelled["state"] == "cancelled" and cancelled["tiles_done"] == 0


def test_results_are_bounded_in_count_and_lost_only_by_their_ttl(
    model_dir: Path, tmp_path: Path
) -> None:
    small = png_bytes(random_image(32, 32))
    with toy_server(model_dir, tmp_path, max_jobs="2", job_ttl_seconds="3") as srv:
        jobs = [post_job(srv, small) for _ in range(2)]
        for job in jobs:
            wait_until(srv, job["id"], finished)
        assert srv.metric("segment_jobs_kept") == 2
        held = srv.metric("segment_job_result_bytes")
        assert held is not None and 0 < held < 10_000  # two small masks, not their reservation
        full = httpx.post(f"{srv.url}/jobs", files={"image": small}, timeout=10)
        # Refusing the third job dropped neither result.
        kept = [httpx.get(f"{srv.url}/jobs/{j['id']}/result", timeout=10) for j in jobs]
        # Deleting one makes room.
        assert httpx.delete(f"{srv.url}/jobs/{jobs[0]['id']}", timeout=10).status_code == 200
        assert httpx.get(f"{srv.url}/jobs/{jobs[0]['id']}", timeout=10).status_code == 404
        third = post_job(srv, small)
        wait_until(srv, third["id"], finished)
        time.sleep(3.5)  # the TTL: every result is gone, and room is back
        assert srv.metric("segment_jobs_kept") == 0
        assert srv.metric("segment_job_result_bytes") == 0
        expired = httpx.get(f"{srv.url}/jobs/{third['id']}/result", timeout=10)
        fresh = post_job(srv, small)
    assert full.status_code == 503 and "SEG_MAX_JOBS" in full.json()["detail"]
    assert 1 <= int(full.headers["retry-after"]) <= 4
    assert all(r.status_code == 200 for r in kept)
    assert expired.status_code == 404 and "expired" in expired.json()["detail"]
    assert fresh["state"] in ("queued", "running", "succeeded")


def test_failed_jobs_do_not_lock_the_store_and_their_records_stay_bounded(
    model_dir: Path, tmp_path: Path
) -> None:
    """SEG_MAX_JOBS counts the jobs that wait, run or hold a result: broken uploads, however
    many, never make /jobs refuse the next good one. A failed job's record (why it failed)
    stays until its TTL, the newest SEG_MAX_JOBS of them."""
    broken = png_bytes(random_image(64, 64))[:80]
    small = png_bytes(random_image(32, 32))
    with toy_server(model_dir, tmp_path, max_jobs="2") as srv:
        failed = []
        for _ in range(5):
            failed.append(post_job(srv, broken))
            assert wait_until(srv, failed[-1]["id"], finished)["state"] == "failed"
        good = [post_job(srv, small) for _ in range(2)]
        for job in good:
            assert wait_until(srv, job["id"], finished)["state"] == "succeeded"
        full = httpx.post(f"{srv.url}/jobs", files={"image": small}, timeout=10)
        records = [httpx.get(f"{srv.url}/jobs/{j['id']}", timeout=10) for j in failed]
    assert full.status_code == 503 and "SEG_MAX_JOBS" in full.json()["detail"]
    assert [r.status_code for r in records] == [404, 404, 404, 200, 200]
    assert all(r.json()["error"]["code"] == "invalid_image" for r in records[3:])


def test_results_are_bounded_in_bytes(model_dir: Path, tmp_path: Path, big_png: bytes) -> None:
    """The mask's bytes are reserved from the image's header when the job is admitted: while a
    3000² job runs, an image whose mask could exceed what is left waits (503); one whose mask
    could never fit the store is refused for good (413). Both before anything runs."""
    later, never = png_bytes(random_image(1100, 1100)), png_bytes(random_image(3200, 3200))
    with toy_server(model_dir, tmp_path, max_job_result_bytes="10000000") as srv:
        running = post_job(srv, big_png)  # reserves ~9.0 MB for seconds
        too_big = httpx.post(f"{srv.url}/jobs", files={"image": later}, timeout=10)
        too_large = httpx.post(f"{srv.url}/jobs", files={"image": never}, timeout=10)
        wait_until(srv, running["id"], finished)
    assert too_big.status_code == 503
    assert "SEG_MAX_JOB_RESULT_BYTES" in too_big.json()["detail"]
    assert too_large.status_code == 413 and too_large.json()["code"] == "too_large"
    assert "SEG_MAX_JOB_RESULT_BYTES" in too_large.json()["detail"]


def test_jobs_need_the_api_key(model_dir: Path, tmp_path: Path) -> None:
    with toy_server(model_dir, tmp_path, api_key="k") as srv:
        r = httpx.post(f"{srv.url}/jobs", files={"image": png_bytes(random_image(8, 8))})
        g = httpx.get(f"{srv.url}/jobs/{'0' * 32}")
    assert r.status_code == 401 and g.status_code == 401


def test_the_client_follows_a_job_to_its_mask(
    model_dir: Path, tmp_path: Path, big_png: bytes
) -> None:
    seen: list[JobStatus] = []
    img = random_image(1000, 1200, seed=9)
    with toy_server(model_dir, tmp_path) as srv, SegmentClient(srv.url) as client:
        result = client.segment(img, progress=seen.append)
    np.testing.assert_array_equal(result.mask, expected_toy_mask(img) > 0)
    assert seen[-1].state == "succeeded" and seen[-1].tiles_done == seen[-1].tiles_total
    assert all(s.tiles_total in (None, seen[-1].tiles_total) for s in seen)
