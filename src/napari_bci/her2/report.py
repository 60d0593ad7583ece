"""A one-page HER2 report for a slide or its regions: a CSV table (one row per region, the
fields of :func:`napari_bci.her2.scoring.export_row`) and a PNG with the scored image, the cell
overlay (tumour cells coloured by membrane class, rejected cells grey) and the table."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .scoring import CLASSES, HER2Result, export_row

#: Overlay colours (RGB 0..255) per membrane class (none, faint, weak-moderate, intense) and for
#: detected cells that are not counted as tumour cells.
CLASS_RGB = ((89, 140, 242), (255, 242, 77), (255, 140, 26), (217, 13, 13))
REJECTED_RGB = (150, 150, 150)
#: Columns of the report table (CSV has every :func:`export_row` field).
TABLE = (("region", "region"), ("HER2", "her2_display"), ("tumour cells", "tumour_cells"),
         ("none %", "pct_none"), ("faint %", "pct_faint"), ("weak-mod %", "pct_weak_moderate"),
         ("intense %", "pct_intense"), ("complete %", "pct_complete"), ("incompl. %", "pct_incomplete"),
         ("H-score", "h_score"),
         ("pattern", "pattern"))


def report_rows(results: dict[str, HER2Result]) -> list[dict]:
    """``[{"region": name, **export_row(result)}, ...]`` in the order given."""
    return [{"region": name, **export_row(r)} for name, r in results.items()]


def write_csv(path, results: dict[str, HER2Result]) -> Path:
    """The report table as CSV (atomic)."""
    from ..io.writers import atomic_output

    rows = report_rows(results)
    with atomic_output(Path(path), newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()) if rows else ["region"])
        w.writeheader()
        w.writerows(rows)
    return Path(path)


def overlay(rgb: np.ndarray, result: HER2Result, *, offset_xy=(0.0, 0.0), downsample: float = 1.0,
            radius: int = 3) -> np.ndarray:
    """``rgb`` with a dot per detected cell: class colour for tumour cells, grey for the
    rejected ones. ``result`` centroids are mapped by ``(c - offset_xy) / downsample``."""
    from skimage.draw import disk

    out = np.array(rgb[..., :3], np.uint8, copy=True)
    cen = (np.asarray(result.centroid, float) - np.asarray(offset_xy, float)) / downsample
    for (x, y), t, k in zip(cen, result.tumour, result.cell_class):
        if 0 <= x < out.shape[1] and 0 <= y < out.shape[0]:
            rr, cc = disk((y, x), radius, shape=out.shape[:2])
            out[rr, cc] = CLASS_RGB[int(k)] if t else REJECTED_RGB
    return out


def render(rgb: np.ndarray, results: dict[str, HER2Result], *, title: str = "", offset_xy=(0.0, 0.0),
           downsample: float = 1.0, notes: list[str] | None = None, width: int = 1100) -> np.ndarray:
    """The report page (RGB uint8): title, verdict lines, the overlay of the first result (all
    results' cells when several regions), the table, the rules and warnings."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=15)
    small = ImageFont.load_default(size=13)
    results = dict(results)
    merged = HER2Result.merge(list(results.values())) if len(results) > 1 else next(iter(results.values()))
    ov = overlay(rgb, merged, offset_xy=offset_xy, downsample=downsample)
    scale = min(1.0, (width - 40) / ov.shape[1], 700 / ov.shape[0])
    ovi = Image.fromarray(ov)
    if scale < 1:
        ovi = ovi.resize((max(int(ov.shape[1] * scale), 1), max(int(ov.shape[0] * scale), 1)), Image.LANCZOS)
    rows = report_rows(results)
    lines = []
    for r in rows:
        lines += [f"{r['region']}: {r['her2_display']}"]
    for name, res in results.items():
        lines.append(f"{name}: {res.explanation}" + (f"  [rule {res.rule}]" if res.rule else ""))
        lines += [f"  warning: {w}" for w in res.warnings]
    lines += list(notes or [])
    line_h, row_h = 20, 19
    h = 40 + line_h * len(lines) + ovi.height + 30 + row_h * (len(rows) + 1) + 90
    page = Image.new("RGB", (width, h), "white")
    d = ImageDraw.Draw(page)
    d.text((20, 10), title or "HER2 (ASCO/CAP 2018) report", fill="black", font=font)
    y = 36
    for ln in lines:
        d.text((20, y), ln[:150], fill=(150, 0, 0) if "warning" in ln or "not assessable" in ln else "black",
               font=small)
        y += line_h
    page.paste(ovi, (20, y))
    y += ovi.height + 8
    x = 20
    for name, rgbc in zip(CLASSES + ("not tumour",), CLASS_RGB + (REJECTED_RGB,)):
        d.rectangle([x, y, x + 14, y + 14], fill=tuple(rgbc), outline="black")
        d.text((x + 18, y), name.replace("_", "-"), fill="black", font=small)
        x += 130
    y += 26
    widths = (120, 310, 85, 58, 55, 80, 65, 80, 75, 60, 85)
    for ri, row in enumerate([{k: h for h, k in TABLE}] + rows):
        x = 20
        for (head, key), wcol in zip(TABLE, widths):
            v = row.get(key, "")
            text = f"{v:g}" if isinstance(v, float) else str(v)
            d.text((x, y), text[: max(int(wcol / 6.2), 4)], fill="black", font=small)
            x += wcol
        y += row_h
    rules = ("3+ > 10% complete intense; 2+ > 10% complete weak-moderate; 1+ > 10% faint/incomplete; "
             "0 otherwise. H-score = 1 x %faint + 2 x %weak-moderate + 3 x %intense.")
    d.text((20, y + 8), rules, fill=(60, 60, 60), font=small)
    return np.asarray(page)


def write_report(path, rgb: np.ndarray, results: dict[str, HER2Result], **kw) -> tuple[Path, Path]:
    """Write ``<path>.csv`` and ``<path>.png`` (``path`` without or with either suffix);
    returns both paths. ``kw`` goes to :func:`render`."""
    from ..io.writers import write_image_atomic

    if not results:
        raise ValueError("no HER2 results to report")
    p = Path(path)
    stem = p.with_suffix("") if p.suffix.lower() in (".csv", ".png") else p
    csv_path, png_path = stem.with_name(stem.name + ".csv"), stem.with_name(stem.name + ".png")
    write_csv(csv_path, results)
    write_image_atomic(png_path, render(rgb, results, **kw))
    return csv_path, png_path
