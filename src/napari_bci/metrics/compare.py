"""Generated vs real IHC over a viewer region, headless: the sampling geometry of two layers,
the local-SSIM heatmap of a window, per-region scores and their CSV / QuPath GeoJSON export.

The Compare widget captures a :class:`LayerGeom` per layer on the main thread and runs
:func:`compute_heatmap` and :func:`measure_region` in workers. Geometry: layers map data to
world coordinates by ``scale`` and ``translate`` only (rotation, shear and affine are not
supported). The ground-truth layer defines the sampling grid; the generated layer is read at the
matching level, resampled only if its grid differs.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: The heatmap reads at most this many pixels per side of the visible region (else coarser).
MAX_VIEW_SIDE = 2048
#: A region is measured at the finest level where its bounding box has at most this many pixels
#: (two RGB windows plus ~15 float32 planes for SSIM: about 300 MB at the bound).
MAX_REGION_PIXELS = 2048 * 2048
#: Cells need about 1 um/px to be scored; coarser region reads report no predicted level.
MAX_HER2_MPP = 1.0


# -- geometry ---------------------------------------------------------------------------------------


@dataclass
class LayerGeom:
    """What the workers need from an image layer, captured on the main thread."""

    name: str
    levels: list
    scale: tuple[float, float]
    translate: tuple[float, float]
    downsamples: list[tuple[float, float]]
    mpp: float | None = None
    her2: str | None = None

    def shape(self, level: int) -> tuple[int, int]:
        return tuple(int(v) for v in self.levels[level].shape[:2])

    def world_to_level(self, level: int, yx_world) -> np.ndarray:
        """World (y, x) -> pixel (row, col) of ``level`` (pixel centres at integers)."""
        p = np.asarray(yx_world, dtype=np.float64)
        d = (p - np.asarray(self.translate)) / np.asarray(self.scale)
        return d / np.asarray(self.downsamples[level])

    def level_to_world(self, level: int, yx_px) -> np.ndarray:
        p = np.asarray(yx_px, dtype=np.float64) * np.asarray(self.downsamples[level])
        return p * np.asarray(self.scale) + np.asarray(self.translate)

    def pixel_world_size(self, level: int) -> float:
        return float(np.mean(np.asarray(self.scale) * np.asarray(self.downsamples[level])))

    def level_mpp(self, level: int, step: int = 1) -> float | None:
        return None if not self.mpp else self.mpp * float(np.mean(self.downsamples[level])) * step


@dataclass
class Window:
    """A sampling grid on a layer: level, pixel rows ``y0:y1:step`` and cols ``x0:x1:step``."""

    level: int
    y0: int
    y1: int
    x0: int
    x1: int
    step: int = 1

    @property
    def shape(self) -> tuple[int, int]:
        return (len(range(self.y0, self.y1, self.step)), len(range(self.x0, self.x1, self.step)))

    @property
    def empty(self) -> bool:
        return self.y1 <= self.y0 or self.x1 <= self.x0


def window_for_box(geom: LayerGeom, box_world, level: int, max_side: int | None = None,
                   max_pixels: int | None = None) -> Window:
    """The pixels of ``level`` whose centres fall in ``box_world`` (clipped to the image); the
    ``step`` grows until the window fits ``max_side`` per side and ``max_pixels`` in all."""
    y0w, y1w, x0w, x1w = box_world
    (py0, px0), (py1, px1) = geom.world_to_level(level, [(y0w, x0w), (y1w, x1w)])
    h, w = geom.shape(level)
    y0, x0 = max(int(math.ceil(py0)), 0), max(int(math.ceil(px0)), 0)
    y1, x1 = min(int(math.floor(py1)) + 1, h), min(int(math.floor(px1)) + 1, w)
    win = Window(level, y0, max(y1, y0), x0, max(x1, x0))
    step = 1
    while not win.empty:
        sh = Window(level, y0, y1, x0, x1, step).shape
        if (max_side is None or max(sh) <= max_side) and (max_pixels is None or sh[0] * sh[1] <= max_pixels):
            break
        step += 1
    win.step = step
    return win


def fit_window(geom: LayerGeom, box_world, *, start: int = 0, max_side: int | None = None,
                 max_pixels: int | None = None) -> Window:
    """The finest level ``>= start`` whose window over ``box_world`` fits the bounds (then a
    pixel step on the coarsest level if even that is too big)."""
    last = len(geom.levels) - 1
    for lv in range(min(start, last), last + 1):
        win = window_for_box(geom, box_world, lv)
        h, w = win.shape
        if (max_side is None or max(h, w) <= max_side) and (max_pixels is None or h * w <= max_pixels):
            return win
    return window_for_box(geom, box_world, last, max_side, max_pixels)


def read_window(geom: LayerGeom, win: Window) -> np.ndarray:
    arr = geom.levels[win.level]
    out = np.asarray(arr[win.y0:win.y1:win.step, win.x0:win.x1:win.step])
    if out.ndim == 3 and out.shape[2] == 4:
        out = out[..., :3]
    return np.ascontiguousarray(out.astype(np.uint8, copy=False))


def same_grid(a: LayerGeom, b: LayerGeom) -> bool:
    return (np.allclose(a.scale, b.scale) and np.allclose(a.translate, b.translate)
            and [a.shape(i) for i in range(len(a.levels))] == [b.shape(i) for i in range(len(b.levels))])


def read_on_grid(src: LayerGeom, ref: LayerGeom, win: Window) -> np.ndarray:
    """``src`` sampled on ``ref``'s window ``win`` (direct read when the grids agree, else the
    best ``src`` level resampled bilinearly; outside ``src`` is white)."""
    if same_grid(src, ref):
        return read_window(src, win)
    from scipy import ndimage

    target = ref.pixel_world_size(win.level) * win.step
    lv = 0
    for i in range(len(src.levels)):
        if src.pixel_world_size(i) <= target * 1.01:
            lv = i
    ys = np.arange(win.y0, win.y1, win.step, dtype=np.float64)
    xs = np.arange(win.x0, win.x1, win.step, dtype=np.float64)
    corners = ref.level_to_world(win.level, [(ys[0], xs[0]), (ys[-1], xs[-1])])
    (sy0, sx0), (sy1, sx1) = src.world_to_level(lv, corners)
    h, w = src.shape(lv)
    ry0, rx0 = max(int(math.floor(min(sy0, sy1))) - 1, 0), max(int(math.floor(min(sx0, sx1))) - 1, 0)
    ry1, rx1 = min(int(math.ceil(max(sy0, sy1))) + 2, h), min(int(math.ceil(max(sx0, sx1))) + 2, w)
    out = np.full((len(ys), len(xs), 3), 255, np.uint8)
    if ry1 <= ry0 or rx1 <= rx0:
        return out
    crop = np.asarray(src.levels[lv][ry0:ry1, rx0:rx1])[..., :3].astype(np.float32)
    gy = np.linspace(sy0, sy1, len(ys)) - ry0
    gx = np.linspace(sx0, sx1, len(xs)) - rx0
    yy, xx = np.meshgrid(gy, gx, indexing="ij")
    for c in range(3):
        out[..., c] = np.clip(np.rint(ndimage.map_coordinates(crop[..., c], [yy, xx], order=1, cval=255.0)), 0, 255)
    return out


# -- heatmap and regions (run in workers) ----------------------------------------------------------


def window_placement(geom: LayerGeom, win: Window) -> tuple[tuple[float, float], tuple[float, float]]:
    """``(scale, translate)`` that put an image of ``win``'s pixels where they are in the world."""
    ds = np.asarray(geom.downsamples[win.level]) * win.step
    scale = tuple(float(v) for v in np.asarray(geom.scale) * ds)
    translate = tuple(float(v) for v in geom.level_to_world(win.level, (win.y0, win.x0)))
    return scale, translate


@dataclass
class HeatmapResult:
    smap: np.ndarray
    mean: float
    window: Window
    scale: tuple[float, float]
    translate: tuple[float, float]


def compute_heatmap(gen: LayerGeom, truth: LayerGeom, win: Window, kind: str) -> HeatmapResult:
    """Local SSIM of the generated vs ground-truth pixels in ``win`` (truth's grid), and where the
    map goes in world coordinates."""
    from ..metrics.ssim import ssim_map, ssim_mean, window as ssim_window

    b = read_window(truth, win)
    a = read_on_grid(gen, truth, win)
    if min(a.shape[:2]) < ssim_window(kind).size:
        raise ValueError("visible region too small for the SSIM window")
    smap = ssim_map(a, b, kind=kind, data_range=255.0)
    return HeatmapResult(smap.astype(np.float32), ssim_mean(smap, kind), win, *window_placement(truth, win))


#: Registration check views computed for the visible region (``compute_check``).
CHECK_VIEWS = ("Swipe", "Checkerboard", "Difference")


@dataclass
class CheckResult:
    image: np.ndarray  # RGB uint8 (Swipe, Checkerboard) or float32 0-1 (Difference)
    window: Window
    scale: tuple[float, float]
    translate: tuple[float, float]
    cell_px: float | None = None  # level-0 px per checkerboard square

    @property
    def rgb(self) -> bool:
        return self.image.ndim == 3


def compute_check(fixed: LayerGeom, warped: LayerGeom, win: Window, view: str, *,
                  cell_um: float = 100.0, split_x: float | None = None) -> CheckResult:
    """A registration check of the fixed (IHC) layer and the registered H&E in ``win`` (fixed's
    grid): ``"Checkerboard"`` (squares of ``cell_um`` micrometres, or level-0 px when the pixel
    size is unknown, anchored to level 0 so they stay put while panning and zooming),
    ``"Swipe"`` (registered H&E left of world x ``split_x``, IHC right of it, a yellow line on
    the cut) or ``"Difference"`` (absolute hematoxylin OD difference, 0-1)."""
    from ..registration.images import od_channel

    if view not in CHECK_VIEWS:
        raise ValueError(f"unknown check view {view!r} (use {', '.join(CHECK_VIEWS)})")
    f = read_window(fixed, win)
    m = read_on_grid(warped, fixed, win)
    scale, translate = window_placement(fixed, win)
    h, w = f.shape[:2]
    cell = None
    if view == "Difference":
        img = np.abs(od_channel(f) - od_channel(m)).clip(0, 1).astype(np.float32)
    elif view == "Checkerboard":
        cell = float(cell_um / fixed.mpp) if fixed.mpp else float(cell_um)
        # level-0 row/column of each window pixel's centre
        rows = (np.arange(h) * win.step + win.y0 + 0.5) * fixed.downsamples[win.level][0]
        cols = (np.arange(w) * win.step + win.x0 + 0.5) * fixed.downsamples[win.level][1]
        board = ((rows // cell)[:, None] + (cols // cell)[None, :]) % 2 == 1
        img = np.where(board[..., None], m, f)
    else:
        # columns whose centre lies left of split_x (column j is at world x translate + j * scale)
        cut = w // 2 if split_x is None else int(np.clip(np.ceil((split_x - translate[1]) / scale[1]), 0, w))
        img = f.copy()
        img[:, :cut] = m[:, :cut]
        line = max(1, w // 400)
        img[:, max(cut - line, 0):min(cut + line, w)] = (255, 220, 0)
    return CheckResult(np.ascontiguousarray(img), win, scale, translate, cell)


@dataclass
class RegionScore:
    region: Any  # napari_bci.regions.Region (level-0 px of the truth layer)
    level: int
    step: int
    metrics: dict = field(default_factory=dict)
    area_um2: float | None = None
    area_px: float = 0.0
    her2_pred: str | None = None  # the level, or "not assessable (<reason>)"
    her2_truth: str | None = None
    error: str | None = None
    her2_row: dict = field(default_factory=dict)  # napari_bci.her2.scoring.export_row of the score

    def row(self) -> dict:
        d = {"region": self.region.label, "level": self.level if self.step == 1 else f"{self.level} (1/{self.step})",
             "area": self.area_um2 if self.area_um2 is not None else self.area_px,
             "her2_pred": self.her2_pred or "", "her2_truth": self.her2_truth or ""}
        d.update(self.metrics)
        return d


def _her2(rgb: np.ndarray, mpp: float, mask: np.ndarray) -> dict:
    """The rule-based HER2 score of the region's generated pixels as a flat row (its
    ``her2_display`` is the level or "not assessable (<reason>)")."""
    from ..her2 import score
    from ..her2.scoring import export_row

    return export_row(score(rgb, mpp=mpp, mask=mask))


def measure_region(region, gen: LayerGeom, truth: LayerGeom, *, predict_her2: bool = True) -> RegionScore:
    """All metrics of one region at the finest level whose read fits :data:`MAX_REGION_PIXELS`."""
    from ..metrics import compare_pair

    x0, y0, x1, y1 = region.bounds
    # region coordinates are GeoJSON-style level-0 px of the truth layer; world box of the pixels
    (wy0, wx0), (wy1, wx1) = truth.level_to_world(0, [(y0 - 0.5, x0 - 0.5), (y1 - 0.5, x1 - 0.5)])
    win = fit_window(truth, (wy0, wy1, wx0, wx1), max_pixels=MAX_REGION_PIXELS)
    mpp0 = truth.mpp
    sc = RegionScore(region, win.level, win.step, area_px=region.area_px, her2_truth=truth.her2)
    if mpp0:
        sc.area_um2 = region.area_px * mpp0 * mpp0
    if win.empty or min(win.shape) < 7:
        sc.error = "outside the image or smaller than the 7x7 SSIM window"
        return sc
    # grid pixel i is level pixel y0 + i * step, centred at GeoJSON (y0 + i * step) * dl + 0.5
    dl = float(np.mean(truth.downsamples[win.level]))
    ds = dl * win.step
    off = (win.x0 * dl + 0.5 - 0.5 * ds, win.y0 * dl + 0.5 - 0.5 * ds)
    mask = region.mask(win.shape, offset_xy=off, downsample=ds)
    if not mask.any():
        sc.error = "region covers no pixel at this level"
        return sc
    b = read_window(truth, win)
    a = read_on_grid(gen, truth, win)
    lmpp = truth.level_mpp(win.level, win.step)
    sc.metrics = compare_pair(a, b, mpp=lmpp, mask=mask)
    if predict_her2:
        m = lmpp or 0.5
        if m <= MAX_HER2_MPP:
            try:
                sc.her2_row = _her2(a, m, mask)
                sc.her2_pred = sc.her2_row["her2_display"]
            except Exception as e:  # a scorer failure must not lose the metrics
                sc.her2_pred = f"error: {e}"
        else:
            sc.her2_pred = f"not assessable (read at {m:.2g} um/px, coarser than {MAX_HER2_MPP} um/px)"
    return sc


# -- export --------------------------------------------------------------------------------------------
def export_csv(scores: list[RegionScore], path) -> None:
    """One row per measured region, written atomically."""
    from .evaluate import write_atomic_text
    from .pair import METRIC_KEYS

    if not scores:
        raise ValueError("no measured regions to export")
    her2_cols = ["her2_assessable", "her2_reason", "her2_tumour_cells", "her2_h_score", "her2_pattern", "her2_rule"]
    cols = ["region", "id", "level", "step", "area_px", "area_um2", *METRIC_KEYS, "her2_pred", *her2_cols,
            "her2_truth", "error"]

    def write(f):
        w = csv.writer(f)
        w.writerow(cols)
        for s in scores:
            vals = {"region": s.region.label, "id": s.region.id, "level": s.level, "step": s.step,
                    "area_px": s.area_px, "area_um2": s.area_um2, "her2_pred": s.her2_pred,
                    "her2_truth": s.her2_truth, "error": s.error, **s.metrics,
                    **{f"her2_{k}": s.her2_row.get(k) for k in ("assessable", "reason", "tumour_cells", "h_score",
                                                                 "pattern", "rule")}}
            w.writerow(["" if vals.get(c) is None else (f"{vals[c]:.6g}" if isinstance(vals[c], float)
                                                       else vals[c]) for c in cols])

    write_atomic_text(Path(path), write)


def export_geojson(scores: list[RegionScore], path) -> None:
    """The measured regions as QuPath GeoJSON: the metrics as measurements; the predicted HER2
    level (or "not assessable") as the QuPath classification of regions that have none."""
    from ..her2 import LEVELS
    from ..regions import write_geojson

    if not scores:
        raise ValueError("no measured regions to export")
    import dataclasses

    out = []
    for s in scores:
        r = dataclasses.replace(s.region)
        m = dict(r.measurements)
        if s.area_um2 is not None:
            m["Area µm^2"] = s.area_um2
        m["Area px^2"] = s.area_px
        m["Pyramid level"] = s.level
        m.update({f"Compare: {k}": v for k, v in s.metrics.items()})
        if s.her2_pred in LEVELS:
            m["HER2 predicted (0-3)"] = LEVELS.index(s.her2_pred)
        if s.her2_truth in LEVELS:
            m["HER2 ground truth (0-3)"] = LEVELS.index(s.her2_truth)
        m.update({f"HER2: {k}": v for k, v in s.her2_row.items() if isinstance(v, (int, float))
                  and not isinstance(v, bool)})
        r.measurements = m
        if s.her2_pred and not r.classification:  # a class the user gave the region is kept
            r.classification = f"HER2 {s.her2_pred}" if s.her2_pred in LEVELS else "HER2 not assessable"
        out.append(r)
    write_geojson(path, out)
