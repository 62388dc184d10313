"""The instance step's knobs chosen on validation images (training.tuning), with a real ONNX
Runtime session of the ``toyobj`` test model (foreground from 0.5 of the intensity, cores
from 0.75)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import tifffile

from bench.onnx_models import build_model
from service.inference.modelmeta import Instances
from tests.test_instances import CENTRES, nuclei_image
from training.data import Pair
from training.tuning import SEED_THRESHOLDS, SPECK_FRACTIONS, tune_instances


def test_the_knobs_are_chosen_by_f1_on_the_validation_images(tmp_path: Path) -> None:
    meta = build_model(
        tmp_path / "m.onnx",
        name="toyobj",
        tile_size=64,
        object_diameter=20.0,
        instances=Instances(seed_threshold=0.5, min_area_fraction=0.1),
    )
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))

    def predictor(tiles: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {"input_1": tiles})[0])

    pairs = []
    for i in range(2):
        image, labels = nuclei_image(160, 160, CENTRES[: 3 + i])
        # Specks of 12 and 20 px: the 0.05 rule (15.7 px) keeps the second (a false object),
        # the 0.1 rule (31.4 px) drops both.
        image[150:154, 2:5] = 230
        image[2:6, 150:155] = 230
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "masks").mkdir(exist_ok=True)
        tifffile.imwrite(tmp_path / "images" / f"v{i}.tif", image)
        tifffile.imwrite(tmp_path / "masks" / f"v{i}.tif", labels.astype(np.uint16))
        pairs.append(
            Pair(f"v{i}", tmp_path / "images" / f"v{i}.tif", tmp_path / "masks" / f"v{i}.tif", "s")
        )
    chosen, table = tune_instances(meta, predictor, pairs)
    assert len(table) == len(SEED_THRESHOLDS) * len(SPECK_FRACTIONS)
    by_knobs = {(r["seed_threshold"], r["min_area_fraction"]): r["mean_f1"] for r in table}
    assert by_knobs[(0.5, 0.1)] == 1.0  # every nucleus found, the specks dropped
    assert by_knobs[(0.5, 0.05)] < 1.0  # the 20 px speck is a false object
    assert (chosen.seed_threshold, chosen.min_area_fraction) == (0.5, 0.1)  # defaults win ties
