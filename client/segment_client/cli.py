"""``segment-client``: segment files, folders or globs with a running service and write the masks
(PNG, TIFF for stacks), scores against ground truths (CSV and JSON), a progress bar and a
summary; the exit status is 1 when any image failed, each failure listed with its reason.

    segment-client images/ --out masks/ --url http://host:8000 --truth-dir truths/ -j 2

Resumable: an image whose mask already exists in ``--out`` is skipped (its scores from the
previous run's ``metrics.json`` are kept), and masks are written whole or not at all.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import sys
import tempfile
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from segment_client.client import ClientError, JobStatus, SegmentClient, ServiceError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
MASK_SUFFIXES = (".png", ".tif")
TRUTH_SUFFIXES = ("", "_mask", "_masks", "_truth", "_gt", "_label", "_labels", "_seg")
METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
OBJECTS_CSV = "objects.csv"
LABELS_SUFFIX = ".labels"  # not a ground truth's name (_labels is, see TRUTH_SUFFIXES)
# Images over this many pixels go through a job so that their tiles show progress.
PROGRESS_ABOVE_PIXELS = 4_000_000
EXIT_FAILED = 1
EXIT_USAGE = 2


@dataclass
class Item:
    """One input image, the name its outputs take, and its ground truth if one was found."""

    path: Path
    name: str  # relative, without suffix: "plate1/well_A1"
    truth: Path | None = None


@dataclass
class Outcome:
    """What happened to one image."""

    item: Item
    status: str  # "ok", "skipped", "failed"
    output: Path | None = None
    reason: str | None = None
    code: str | None = None
    request_id: str | None = None
    scores: dict[str, Any] | None = None
    classes: list[str] = field(default_factory=list)
    objects: list[dict[str, Any]] | None = None


class UsageError(Exception):
    """The command line names nothing usable; said before any request is sent."""


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def collect_inputs(args: Sequence[str], recursive: bool = False) -> list[Item]:
    """Files as given, folders' images (by suffix), and glob patterns, each once; output names
    keep the folder structure under a folder argument and must not collide."""
    items: dict[Path, Item] = {}

    def add(path: Path, name: str) -> None:
        items.setdefault(path.resolve(), Item(path=path, name=name))

    for arg in args:
        path = Path(arg)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            found = sorted(
                p for p in path.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            for p in found:
                add(p, p.relative_to(path).with_suffix("").as_posix())
        elif path.is_file():
            add(path, path.stem)
        elif _is_glob(arg):
            matches = sorted(Path(p) for p in glob.glob(arg, recursive=True))
            files = [p for p in matches if p.is_file()]
            if not files:
                raise UsageError(f"no file matches {arg!r}")
            for p in files:
                add(p, p.stem)
        else:
            raise UsageError(f"{arg}: no such file or folder")
    if not items:
        looked = ", ".join(IMAGE_SUFFIXES)
        raise UsageError(f"no images found in {list(args)} (looked for {looked})")
    by_name: dict[str, list[Path]] = {}
    for item in items.values():
        by_name.setdefault(item.name, []).append(item.path)
    clashes = {n: ps for n, ps in by_name.items() if len(ps) > 1}
    if clashes:
        listed = "; ".join(f"{n}: {', '.join(map(str, ps))}" for n, ps in sorted(clashes.items()))
        raise UsageError(f"several inputs would write the same mask: {listed}")
    return sorted(items.values(), key=lambda i: i.name)


def pair_truths(items: Iterable[Item], truth_dir: Path) -> None:
    """Give each item the truth in ``truth_dir`` with its name (same relative path and stem,
    optionally followed by ``_mask``, ``_gt``, ``_labels``...; any image suffix)."""
    if not truth_dir.is_dir():
        raise UsageError(f"--truth-dir {truth_dir} is not a folder")
    for item in items:
        for tail in TRUTH_SUFFIXES:
            candidates = [truth_dir / f"{item.name}{tail}{s}" for s in IMAGE_SUFFIXES]
            candidates += [c.with_suffix(c.suffix.upper()) for c in candidates]
            found = next((c for c in candidates if c.is_file()), None)
            if found is not None:
                item.truth = found
                break


def existing_output(out_dir: Path, item: Item) -> Path | None:
    """The mask a previous run wrote for ``item``, if any."""
    for suffix in MASK_SUFFIXES:
        path = out_dir / f"{item.name}{suffix}"
        if path.is_file():
            return path
    return None


def image_pixels(path: Path) -> int | None:
    """Pixels of the whole image (every plane of a stack) from its header; None if unreadable
    here (the service will say why)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            with tifffile.TiffFile(path) as tif:
                return int(np.prod(tif.series[0].shape)) if tif.series else None
        with Image.open(path) as img:
            return int(img.width * img.height)
    except Exception:  # any damage: let the service answer it
        return None


def _umask() -> int:
    """The process's umask, thread-safely where Linux tells it (``/proc/self/status``);
    elsewhere as it was at import (setting it to read it is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _IMPORT_UMASK


def _import_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_IMPORT_UMASK = _import_umask()


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (a stopped run leaves no half mask that a
    resumed run would take for done), with the permissions of any new file (the umask's: a
    temporary file is private, 0600, until it is renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _ratio(num: int, den: int) -> float | None:
    return None if den == 0 else num / den


def summarise_scores(outcomes: Sequence[Outcome]) -> dict[str, Any] | None:
    """Per-image scores, their mean over images (per class and overall), and the scores of all
    pixels pooled (from the summed per-class counts)."""
    scored = [o for o in outcomes if o.scores is not None]
    if not scored:
        return None
    with_classes = [o.classes for o in scored if o.classes]
    classes = with_classes[0] if with_classes else list((scored[0].scores or {})["iou"])
    images = [
        {
            "image": o.item.name,
            "truth": str(o.item.truth) if o.item.truth else None,
            "iou": o.scores["iou"],
            "dice": o.scores["dice"],
            "mean_iou": o.scores["mean_iou"],
            "mean_dice": o.scores["mean_dice"],
            "pixels": o.scores.get("pixels"),
            "objects": o.scores.get("objects"),
        }
        for o in scored
        if o.scores is not None
    ]
    mean = {
        "iou": {c: _mean(i["iou"].get(c) for i in images) for c in classes},
        "dice": {c: _mean(i["dice"].get(c) for i in images) for c in classes},
        "mean_iou": _mean(i["mean_iou"] for i in images),
        "mean_dice": _mean(i["mean_dice"] for i in images),
    }
    pooled: dict[str, Any] | None = None
    if all(i["pixels"] for i in images):
        tp = {c: sum(i["pixels"][c]["tp"] for i in images) for c in classes}
        fp = {c: sum(i["pixels"][c]["fp"] for i in images) for c in classes}
        fn = {c: sum(i["pixels"][c]["fn"] for i in images) for c in classes}
        iou = {c: _ratio(tp[c], tp[c] + fp[c] + fn[c]) for c in classes}
        dice = {c: _ratio(2 * tp[c], 2 * tp[c] + fp[c] + fn[c]) for c in classes}
        pooled = {
            "iou": iou,
            "dice": dice,
            "mean_iou": _mean(iou.values()),
            "mean_dice": _mean(dice.values()),
        }
    return {"classes": classes, "images": images, "mean": mean, "pooled": pooled}


# Object-level scores per image in metrics.csv (models that give instances, with a truth).
OBJECT_COLUMNS = ("f1", "precision", "recall", "ap50", "mean_ap", "mean_matched_iou")


def write_metrics(out_dir: Path, summary: dict[str, Any]) -> None:
    """``metrics.json`` (everything) and ``metrics.csv`` (one row per image, then the mean over
    images and the pooled scores)."""
    write_atomically(out_dir / METRICS_JSON, json.dumps(summary, indent=2).encode())
    classes = summary["classes"]
    header = ["image", "truth", "mean_iou", "mean_dice"]
    header += [f"iou_{c}" for c in classes] + [f"dice_{c}" for c in classes]
    header += [f"objects_{k}" for k in OBJECT_COLUMNS] + ["objects_labelled_f1"]

    def row(name: str, truth: str | None, scores: dict[str, Any]) -> list[str]:
        cells = [scores["mean_iou"], scores["mean_dice"]]
        cells += [scores["iou"].get(c) for c in classes] + [scores["dice"].get(c) for c in classes]
        objects = scores.get("objects") or {}
        cells += [objects.get(k) for k in OBJECT_COLUMNS]
        # F1 without predicted objects cut by the border that the truth leaves unlabelled
        cells.append((objects.get("labelled_only") or {}).get("f1"))
        return [name, truth or ""] + ["" if v is None else f"{v:.6f}" for v in cells]

    lines = [row(i["image"], i["truth"], i) for i in summary["images"]]
    lines.append(row("mean over images", None, summary["mean"]))
    if summary["pooled"] is not None:
        lines.append(row("all pixels pooled", None, summary["pooled"]))
    tmp = out_dir / f".{METRICS_CSV}.part"
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(lines)
    os.replace(tmp, out_dir / METRICS_CSV)


def write_objects(out_dir: Path, outcomes: Sequence[Outcome]) -> int:
    """``objects.csv``: one row per object of every image labelled (output=labels), with the
    image's name first; rows of images a resumed run skipped are kept from the earlier file.
    Returns the rows written."""
    path = out_dir / OBJECTS_CSV
    skipped = {o.item.name for o in outcomes if o.status == "skipped"}
    rows: list[dict[str, Any]] = []
    try:
        with path.open(newline="") as f:
            rows += [r for r in csv.DictReader(f) if r.get("image") in skipped]
    except OSError:
        pass
    for o in outcomes:
        rows += [{"image": o.item.name, **r} for r in o.objects or []]
    header: list[str] = []
    for row in rows:
        header += [k for k in row if k not in header]
    tmp = out_dir / f".{OBJECTS_CSV}.part"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header or ["image"], restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return len(rows)


def previous_scores(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Per-image scores of an earlier run into the same folder (for the images resume skips)."""
    try:
        doc = json.loads((out_dir / METRICS_JSON).read_text())
        return {i["image"]: i for i in doc.get("images", [])}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return {}


class Runner:
    """Segments items on ``concurrency`` threads through one :class:`SegmentClient`."""

    def __init__(
        self,
        client: SegmentClient,
        out_dir: Path,
        params: dict[str, Any],
        *,
        progress: Progress | None,
        progress_above: int,
    ) -> None:
        self.client = client
        self.out_dir = out_dir
        self.params = params
        self.progress = progress
        self.progress_above = progress_above
        self._lock = threading.Lock()
        self._jobs_supported = True

    def _tile_bar(self, item: Item) -> tuple[TaskID | None, Any]:
        """A progress line for one big image, and the callback that moves it."""
        if self.progress is None:
            return None, lambda status: None
        task = self.progress.add_task(f"  {item.name}", total=None)
        progress = self.progress

        def update(status: JobStatus) -> None:
            label = f"  {item.name} ({status.state})"
            progress.update(
                task, completed=status.tiles_done, total=status.tiles_total, description=label
            )

        return task, update

    def segment(self, item: Item) -> Outcome:
        """One image: segment, write its mask, keep its scores; never raises for the image's
        own failure (it becomes the outcome's reason)."""
        truth = item.truth
        try:
            pixels = image_pixels(item.path)
            use_job = self._jobs_supported and pixels is not None and pixels > self.progress_above
            task: TaskID | None = None
            if use_job:
                task, update = self._tile_bar(item)
                try:
                    result = self.client.segment(
                        item.path, ground_truth=truth, progress=update, **self.params
                    )
                except ServiceError as exc:
                    if exc.status not in (404, 405) or exc.code not in (None, "not_found"):
                        raise
                    self._jobs_supported = False  # an older service without /jobs
                    result = self.client.segment(item.path, ground_truth=truth, **self.params)
                finally:
                    if task is not None and self.progress is not None:
                        self.progress.remove_task(task)
            else:
                result = self.client.segment(item.path, ground_truth=truth, **self.params)
        except ServiceError as exc:
            return Outcome(
                item, "failed", reason=exc.detail, code=exc.code, request_id=exc.request_id
            )
        except ClientError as exc:
            return Outcome(item, "failed", reason=str(exc), code="client")
        if result.labels is not None:  # before the mask: a resumed run skips by the mask
            suffix = ".tif" if result.labels_format == "tiff" else ".png"
            labels = self.out_dir / f"{item.name}{LABELS_SUFFIX}{suffix}"
            write_atomically(labels, result.labels_bytes)
        suffix = ".tif" if result.mask_format == "tiff" else ".png"
        output = self.out_dir / f"{item.name}{suffix}"
        write_atomically(output, result.mask_bytes)
        scores = result.scores
        if scores is not None and result.object_scores is not None:
            scores = {**scores, "objects": result.object_scores}
        return Outcome(
            item,
            "ok",
            output=output,
            request_id=result.request_id,
            scores=scores,
            classes=list(result.document.get("classes") or []),
            objects=result.objects,
        )


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="segment-client",
        description="Segment images with a running U-Net segmentation service; write the masks, "
        "and with --truth-dir IoU/Dice per image and class (metrics.csv, metrics.json).",
        epilog="Exit status: 0 all images done, 1 some image failed (each listed with its "
        "reason), 2 nothing to do or a bad command line.",
    )
    p.add_argument("inputs", nargs="+", help="image files, folders, or glob patterns ('*.tif')")
    p.add_argument("-o", "--out", type=Path, required=True, help="folder for the masks")
    p.add_argument(
        "--url",
        default=os.environ.get("SEGMENT_URL", "http://localhost:8000"),
        help="service address (env SEGMENT_URL; default http://localhost:8000)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("SEGMENT_API_KEY"),
        help="the service's API key (env SEGMENT_API_KEY)",
    )
    p.add_argument("-m", "--model", help="model name (default: the service's default model)")
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "fp16", "int8"),
        help="the model variant to run (default auto: what the service measured to pay on its "
        "host; fp32 gives exactly the reference masks)",
    )
    p.add_argument("--threshold", type=float, help="binary models: probability cut-off")
    p.add_argument("--overlap", type=float, help="tile overlap, 0 to 0.75")
    p.add_argument("--blend", choices=("gaussian", "cosine", "constant"))
    p.add_argument(
        "--diameter",
        type=float,
        help="the objects' diameter in pixels: images are rescaled to the model's training "
        "scale (models with object_diameter)",
    )
    p.add_argument("--class-name", help="write this class's mask only")
    p.add_argument(
        "--output",
        choices=("mask", "labels"),
        help="labels: also write each image's objects as <name>.labels.png (16-bit; TIFF for "
        f"stacks) and one row per object in {OBJECTS_CSV} (models that give instances)",
    )
    p.add_argument("--channel", help="stacks with channels: a channel index or OME name")
    p.add_argument("--truth-dir", type=Path, help="ground truths, paired with images by name")
    p.add_argument("-r", "--recursive", action="store_true", help="look into sub-folders too")
    p.add_argument("-j", "--concurrency", type=int, default=1, help="images in flight (1)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request (600)")
    p.add_argument("--retries", type=int, default=5, help="tries after a 503 busy answer (5)")
    p.add_argument(
        "--progress-above",
        type=int,
        default=PROGRESS_ABOVE_PIXELS,
        help="images over this many pixels go through a job and show their tiles' progress",
    )
    p.add_argument("--overwrite", action="store_true", help="redo images whose mask exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _params(args: argparse.Namespace) -> dict[str, Any]:
    params = {
        "model": args.model,
        "precision": args.precision,
        "threshold": args.threshold,
        "overlap": args.overlap,
        "blend": args.blend,
        "diameter": args.diameter,
        "class_name": args.class_name,
        "channel": args.channel,
        "output": args.output,
    }
    return {k: v for k, v in params.items() if v is not None}


def _count(n: int, noun: str) -> str:
    """ "1 image", "2 images"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _fmt(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.4f}"


def run(argv: Sequence[str] | None = None, console: Console | None = None) -> int:
    """The command; returns the exit status."""
    args = build_parser().parse_args(argv)
    err = console or Console(stderr=True)
    if args.concurrency < 1:
        err.print("error: --concurrency must be at least 1")
        return EXIT_USAGE
    try:
        items = collect_inputs(args.inputs, args.recursive)
        if args.truth_dir is not None:
            pair_truths(items, args.truth_dir)
    except UsageError as exc:
        err.print(f"error: {exc}")
        return EXIT_USAGE
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    earlier = previous_scores(out_dir)
    outcomes: list[Outcome] = []
    todo: list[Item] = []
    for item in items:
        done = None if args.overwrite else existing_output(out_dir, item)
        if done is not None:
            kept = earlier.get(item.name)
            scores = kept if kept is not None and item.truth is not None else None
            outcomes.append(Outcome(item, "skipped", output=done, scores=scores))
        else:
            todo.append(item)

    show = not args.no_progress
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=not show,
    )
    params = _params(args)
    with (
        SegmentClient(args.url, args.api_key, timeout=args.timeout, retries=args.retries) as client,
        progress,
    ):
        overall = progress.add_task("images", total=len(items), completed=len(outcomes))
        runner = Runner(
            client, out_dir, params, progress=progress, progress_above=args.progress_above
        )
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            futures = [pool.submit(runner.segment, item) for item in todo]
            for future in as_completed(futures):
                outcome = future.result()
                outcomes.append(outcome)
                progress.advance(overall)
                if outcome.status == "failed":
                    progress.console.print(
                        f"[red]failed[/red] {escape(str(outcome.item.path))}: "
                        f"{escape(outcome.reason or '')}"
                    )

    outcomes.sort(key=lambda o: o.item.name)
    summary = summarise_scores(outcomes) if args.truth_dir is not None else None
    if summary is not None:
        write_metrics(out_dir, summary)
    if args.output == "labels":
        rows = write_objects(out_dir, outcomes)
        err.print(f"{_count(rows, 'object')} in {out_dir / OBJECTS_CSV}")
    return report(outcomes, summary, out_dir, err)


def report(
    outcomes: Sequence[Outcome], summary: dict[str, Any] | None, out_dir: Path, err: Console
) -> int:
    """Print the summary; the exit status."""
    ok = [o for o in outcomes if o.status == "ok"]
    skipped = [o for o in outcomes if o.status == "skipped"]
    failed = [o for o in outcomes if o.status == "failed"]
    err.print(
        f"{_count(len(outcomes), 'image')}: {len(ok)} segmented, {len(skipped)} skipped (mask "
        f"already in {out_dir}), {len(failed)} failed"
    )
    if summary is not None:
        scored = len(summary["images"])
        mean = summary["mean"]
        err.print(
            f"scores for {_count(scored, 'image')} with a ground truth: mean IoU "
            f"{_fmt(mean['mean_iou'])}, mean Dice {_fmt(mean['mean_dice'])} (per image and "
            f"class in {out_dir / METRICS_CSV} and {out_dir / METRICS_JSON})"
        )
    for o in failed:
        rid = f" [request {o.request_id}]" if o.request_id else ""
        code = f" ({o.code})" if o.code else ""
        err.print(f"FAILED {o.item.path}{code}: {o.reason}{rid}", markup=False)
    return EXIT_FAILED if failed else 0


def main() -> None:
    """Entry point of ``segment-client``."""
    sys.exit(run())
