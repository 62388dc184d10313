"""Training-step speed of a preset's network on any Keras 3 backend (CPU TensorFlow, GPU JAX).

Standalone on purpose: it needs only Keras and NumPy (no TensorFlow, no ``tf.data``), so the very
same model, loss, metrics and batches can be timed on a machine with JAX and a GPU. Patches come
from a ``.npz`` written by ``python -m bench.training_speed make-patches`` (real training patches).

    python -m bench.training_speed make-patches nuclei .whl/patches.npz
    KERAS_BACKEND=jax python -m bench.training_speed time .whl/patches.npz --epochs 3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

_RECIPE = ("name", "classes", "arch", "batch_size", "learning_rate", "seed")


def make_patches(preset: str, out: Path, count: int = 128) -> None:
    """Cut ``count`` random training patches of the preset (normalised, float16 to stay small)."""
    from training.architectures import options_for
    from training.dataset import load_frames, random_patches
    from training.presets import PRESETS

    config = PRESETS[preset]
    frames = load_frames(
        config.splits()["train"],
        config.normalization,
        config.mask_mode,
        label_values=config.label_values,
        boundary_width=config.boundary_width,
    )
    gen = random_patches(frames, config.tile_size, config.seed, config.fg_bias)
    images, classes = zip(*(next(gen) for _ in range(count)), strict=True)
    # The recipe travels inside the file: the GPU machine has neither TensorFlow nor pydantic.
    recipe = {key: getattr(config, key) for key in _RECIPE}
    recipe["options"] = options_for(config.arch, config.options)
    np.savez_compressed(
        out,
        images=np.stack(images).astype(np.float16),
        classes=np.stack(classes),
        recipe=np.array(json.dumps(recipe)),
    )


def time_training(patches: Path, epochs: int) -> dict[str, object]:
    """Seconds per training step (after one warm-up epoch) for the recipe's model and batch.

    Same model, loss, metrics, optimiser and batch size as ``training.train`` uses.
    """
    import keras

    from training.architectures import build_model
    from training.losses import bce_dice_loss, cce_dice_loss, segmentation_metrics

    data = np.load(patches)
    r = json.loads(str(data["recipe"]))
    x = data["images"].astype(np.float32)
    k = len(r["classes"])
    onehot = np.eye(k, dtype=np.float32)
    y = data["classes"][..., None].astype(np.float32) if k == 2 else onehot[data["classes"]]
    keras.utils.set_random_seed(r["seed"])
    model = build_model(r["arch"], x.shape[-1], 1 if k == 2 else k, **r["options"])
    model.compile(
        optimizer=keras.optimizers.Adam(r["learning_rate"]),
        loss=bce_dice_loss if k == 2 else cce_dice_loss,
        metrics=segmentation_metrics(r["classes"]),
    )
    batch = r["batch_size"]
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0)  # compilation and warm-up
    steps = epochs * (len(x) // batch)
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0)
    wall = time.perf_counter() - start
    return {
        "backend": keras.backend.backend(),
        "name": r["name"],
        "steps": steps,
        "batch_size": batch,
        "tile": x.shape[1],
        "patches": len(x),
        "seconds": round(wall, 2),
        "seconds_per_step": round(wall / steps, 4),
    }


def main(argv: list[str] | None = None) -> None:
    """``make-patches`` or ``time``."""
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make-patches")
    p.add_argument("preset")
    p.add_argument("out", type=Path)
    p = sub.add_parser("time")
    p.add_argument("patches", type=Path)
    p.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    if args.cmd == "make-patches":
        make_patches(args.preset, args.out)
    else:
        print(json.dumps(time_training(args.patches, args.epochs)))


if __name__ == "__main__":
    main()
