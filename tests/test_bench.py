"""The benchmark harness runs end to end (``--quick``: tiny synthetic images, one repeat).

No wall-time assertions: CI machines differ; this proves that every case runs and reports.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.flops import conv_flops
from bench.run import MODEL, main
from service.core.config import DEFAULT_OVERLAP
from service.inference.precision import CpuFeatures

pytest.importorskip("keras")


@pytest.mark.slow
def test_quick_run_writes_every_case(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    main(["--quick", "--out", str(out)])
    res = json.loads(out.with_suffix(".json").read_text())
    assert {r["image"] for r in res["images"]} == {"synthetic 420x300", "synthetic 640x640"}
    for row in res["images"]:
        assert set(row["seconds"]) == {"tutorial", "raw", "pipeline", "raw_defaults", "defaults"}
        assert row["service_tiles"] >= row["default_tiles"] >= row["tutorial_tiles"] > 0
    # The defaults are the service's: the precision auto picks here, the default overlap.
    defaults = res["model"]["defaults"]
    assert defaults["overlap"] == DEFAULT_OVERLAP and defaults["why"]
    assert defaults["precision"] == ("int8" if CpuFeatures.read().int8_dot else "fp32")
    http = res["http"]["workers 1 x intra_op 2 (default)"]
    assert http["errors"] == 0 and http["eight_clients"]["ok"] == 8
    burst = http["burst"]
    assert burst["ok"] + burst["rejected_503"] == burst["sent"] and burst["rejected_503"] > 0
    assert [m["side"] for m in res["memory"]] == [512, 1024]
    assert all(m["peak_kib"] >= m["idle_kib"] > 0 for m in res["memory"])
    assert res["efficiency"]["raw_fraction"] > 0 and res["peak_gflops"]["median"] > 0
    assert len(res["targets"]) == 6  # the 16384^2 memory target only in the full run
    assert res["sources"] is None  # quality per source: the full run's
    text = out.read_text()
    for heading in (
        "## Machine",
        "## Cases 1-3",
        "## Case 4",
        "## Case 5",
        "## Case 6",
        "## Targets",
    ):
        assert heading in text
    # Re-rendering from the JSON gives the same report.
    again = tmp_path / "again.md"
    main(["--from-json", str(out.with_suffix(".json")), "--out", str(again)])
    assert again.read_text() == text


def test_conv_flops_of_the_bundled_unet() -> None:
    # 1.29 M parameters at 256^2: about 5.7 GFLOP per tile, mostly 3x3 convolutions.
    gflop = conv_flops(MODEL, 256, 1)["gflop"]
    assert 5.0 < gflop < 6.5
    assert conv_flops(MODEL, 256, 1, batch=2)["gflop"] == pytest.approx(2 * gflop)


@pytest.mark.slow
def test_host_floor_quick_run_compares_both_paths(tmp_path: Path) -> None:
    """``python -m bench.host_floor --quick`` (CI): both paths run, give the same PNG (checked
    inside), and the report has the throughput and each stage's cost."""
    from bench.host_floor import main as host_floor

    doc = tmp_path / "host_floor.md"
    assert host_floor(["--quick", "--doc", str(doc)]) == 0
    data = json.loads(doc.with_suffix(".json").read_text())
    (row,) = data["results"]
    assert row["side"] == 512 and row["serial_mpx_s"] > 0 and row["overlapped_mpx_s"] > 0
    assert set(row["stages_ns_per_px"]) >= {"decode", "statistics", "cut", "encode"}
    assert "overlapped MPx/s" in doc.read_text()


@pytest.mark.slow
def test_generalist_bench_scores_a_source_every_way_and_writes_its_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bbbc038: Path
) -> None:
    """One source (the DSB quadrant) instead of all six: every model with and without
    diameter=, Otsu, and a baseline given a training scale by ``--baseline-scale``."""
    from bench import generalist
    from service.core.config import REPO_MODELS
    from training.presets import PRESETS

    pairs = [p for p in PRESETS["nuclei"].splits()["test"] if p.source == "dsb2018"]
    monkeypatch.setattr(generalist, "source_pairs", lambda: {"dsb2018": ("test split", pairs)})
    monkeypatch.setattr(generalist, "DOC", tmp_path / "generalist.md")
    bundled = REPO_MODELS / "nuclei" / "1" / "model.onnx"
    baseline = generalist._with_scale(bundled, 40.0, tmp_path)
    result = generalist.run({"nuclei": bundled, "baseline": baseline})
    entry = result["sources"]["dsb2018"]
    assert {"otsu", "nuclei", "nuclei + diameter", "baseline", "baseline + diameter"} <= set(entry)
    assert result["object_diameter"]["baseline"] == 40.0
    for key in ("nuclei", "nuclei + diameter", "otsu"):
        assert 0.0 < entry[key]["iou"] <= 1.0 and entry[key]["truth_objects"] == 29
    # The same weights told a larger training scale see the nuclei rescaled: another answer.
    assert entry["baseline + diameter"]["iou"] != entry["nuclei + diameter"]["iou"]
    generalist.write_doc(result)
    text = (tmp_path / "generalist.md").read_text()
    assert "| dsb2018 | test split | 1 | 23.3 |" in text
    assert json.loads((tmp_path / "generalist.json").read_text())["sources"]["dsb2018"]
