"""Evaluate a folder of generated IHC patches against the ground truth (BCI challenge style)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import InputError
from ..levels import HER2_LEVELS as LEVEL_ORDER
from .pair import METRIC_KEYS, compare_pair
from .ssim import window

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
BCI_WINDOW = window("uniform").size  # the BCI metric's SSIM window


def _images(d: Path) -> dict[str, Path]:
    if not d.exists():
        raise InputError(d, "no such directory")
    if not d.is_dir():
        raise InputError(d, "not a directory")
    return {p.name: p for p in sorted(d.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}


def _few(names) -> str:
    names = sorted(names)
    s = ", ".join(names[:5])
    return s + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _by_stem(files: dict[str, Path]) -> dict[str, Path] | None:
    """``files`` keyed by name without the suffix, or None when two share a stem."""
    out = {p.stem: p for p in files.values()}
    return out if len(out) == len(files) else None


def match_folders(pred_dir, gt_dir) -> list[tuple[str, Path, Path]]:
    """``(name, pred, gt)`` for files with the same name in both folders, the suffix aside
    (``generate`` writes PNG, a dataset's truth may be JPEG) unless a folder holds two files of
    one stem; ``name`` is the prediction's. InputError when a folder is empty or a file has no
    partner (a silently smaller test set would skew means)."""
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    pred, gt = _images(pred_dir), _images(gt_dir)
    if not pred:
        raise InputError(pred_dir, f"no images ({', '.join(IMAGE_SUFFIXES)}) in the prediction folder")
    if not gt:
        raise InputError(gt_dir, f"no images ({', '.join(IMAGE_SUFFIXES)}) in the ground-truth folder")
    sp, sg = _by_stem(pred), _by_stem(gt)
    if sp is not None and sg is not None:
        pred, gt = sp, sg
    only_pred = set(pred) - set(gt)
    only_gt = set(gt) - set(pred)
    if only_pred:
        raise InputError(pred_dir, f"{len(only_pred)} prediction(s) without ground truth in {gt_dir}: "
                                     f"{_few(pred[k].name for k in only_pred)}")
    if only_gt:
        raise InputError(gt_dir, f"{len(only_gt)} ground-truth image(s) without a prediction in {pred_dir}: "
                                   f"{_few(gt[k].name for k in only_gt)}")
    return [(pred[n].name, pred[n], gt[n]) for n in sorted(pred)]


def read_rgb(path: Path) -> np.ndarray:
    """An image file as ``H x W x 3`` uint8 (InputError naming the file otherwise)."""
    from ..io.patches import read_patch

    return read_patch(path)


def level_of(name: str) -> str | None:
    """The HER2 level in a BCI file name (``00001_test_2+.png`` -> ``"2+"``), else None."""
    from ..io.bci import parse_bci_name

    parsed = parse_bci_name(name)
    return None if parsed is None else parsed.her2


def _summary(rows: list[dict], keys) -> dict:
    out: dict = {"n": len(rows)}
    for k in keys:
        v = np.array([r[k] for r in rows], dtype=np.float64)
        # BCI's figure is the plain mean: one identical pair (PSNR inf) makes it inf.
        out[k] = float(np.mean(v)) if len(v) else float("nan")
        out[f"{k}_std"] = float(np.std(v)) if len(v) else float("nan")
    return out


def evaluate_folders(
    pred_dir,
    gt_dir,
    *,
    mpp: float | None = None,
    tolerant: bool = True,
    device: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict, list[dict]]:
    """Compare every prediction with its ground truth.

    Returns ``(summary, rows)``: ``summary`` has ``n``, the mean and ``<key>_std`` (population
    std) of every metric, and ``per_level`` (the same per HER2 level parsed from BCI names;
    files without a level go under ``"unknown"``); ``rows`` has one dict per image.
    """
    pairs = match_folders(pred_dir, gt_dir)
    # ssim_local equals ssim on whole images; it only means something for regions.
    keys = tuple(k for k in METRIC_KEYS if k != "ssim_local") if tolerant else ("psnr", "ssim")
    rows = []
    for i, (name, pp, gp) in enumerate(pairs):
        a, b = read_rgb(pp), read_rgb(gp)
        if a.shape != b.shape:
            raise InputError(pp, f"size {a.shape[1]}x{a.shape[0]} differs from the ground truth's "
                                 f"{b.shape[1]}x{b.shape[0]} ({gp})")
        if min(a.shape[:2]) < BCI_WINDOW:
            raise InputError(pp, f"{a.shape[1]}x{a.shape[0]} px is smaller than the {BCI_WINDOW}x{BCI_WINDOW} SSIM "
                                 "window of the BCI metric")
        m = compare_pair(a, b, mpp=mpp, tolerant=tolerant, device=device)
        row = {"name": name, "her2": level_of(name) or "unknown"}
        row.update({k: m[k] for k in keys})
        rows.append(row)
        if progress is not None:
            progress(i + 1, len(pairs))
    summary = _summary(rows, keys)
    per_level = {}
    levels = sorted({r["her2"] for r in rows}, key=lambda s: (LEVEL_ORDER + ("unknown",)).index(s))
    for lv in levels:
        per_level[lv] = _summary([r for r in rows if r["her2"] == lv], keys)
    summary["per_level"] = per_level
    summary["metrics"] = list(keys)
    return summary, rows


def write_csv(path, rows: list[dict]) -> None:
    """Per-image rows as CSV, written atomically."""
    path = Path(path)
    if not rows:
        raise ValueError("no rows to write")
    write_atomic_text(path, lambda f: _csv(f, rows))


def _csv(f, rows):
    w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def write_atomic_text(path: Path, write: Callable) -> None:
    """Write a text file with ``write(f)``, atomically (:func:`napari_bci.io.writers.atomic_output`)."""
    from ..io.writers import atomic_output

    with atomic_output(path) as f:
        write(f)


def json_safe(obj):
    """Replace non-finite floats (inf PSNR of identical images, NaN correlations) by None,
    since JSON has no inf/NaN."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
