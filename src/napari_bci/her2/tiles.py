"""HER2 scoring of large images: per-tile score maps and polygon regions on a pyramid.

Images are one ``(H, W, 3)`` array or a list of pyramid levels (level 0 first; numpy, dask or
zarr arrays: only the tiles needed are read). Cells are analysed at the coarsest level whose
pixel size is at most ``max_mpp`` (enough resolution for nuclei and membranes). All returned
coordinates are level-0 pixels (x, y).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from .scoring import LEVELS, HER2Result, _image_finding, empty_result, image_check, score
from .stains import StainModel, estimate_stain_model

#: Map label of a tile with tissue that is not assessable (too few tumour cells, pattern, ...).
NOT_ASSESSABLE = 5
#: Fixed display colours (RGBA 0..1) per map label: 0 = not scored, then 0, 1+, 2+, 3+, n/a.
LEVEL_COLOURS = {
    0: (0.0, 0.0, 0.0, 0.0),
    1: (0.27, 0.51, 0.71, 0.55),  # 0: steel blue
    2: (1.00, 0.85, 0.20, 0.55),  # 1+: yellow
    3: (1.00, 0.55, 0.10, 0.55),  # 2+: orange
    4: (0.85, 0.10, 0.10, 0.55),  # 3+: red
    NOT_ASSESSABLE: (0.55, 0.55, 0.55, 0.45),  # not assessable: grey
}
LEGEND = {"0": LEVEL_COLOURS[1], "1+": LEVEL_COLOURS[2], "2+": LEVEL_COLOURS[3], "3+": LEVEL_COLOURS[4],
          "n/a": LEVEL_COLOURS[NOT_ASSESSABLE]}


def map_label(res: HER2Result | None) -> int:
    """A tile's map label: 0 no tissue / not scored, 1-4 the level, :data:`NOT_ASSESSABLE`."""
    if res is None or res.reason_code == "no_tissue":
        return 0
    return NOT_ASSESSABLE if res.her2 is None else 1 + LEVELS.index(res.her2)


def as_levels(image) -> list:
    return list(image) if isinstance(image, (list, tuple)) else [image]


def choose_level(levels: Sequence, mpp: float, max_mpp: float = 1.0) -> tuple[int, float, float]:
    """(level index, its downsample from level 0, its mpp): the coarsest level with mpp <= max_mpp."""
    from ..pyramid import level_downsamples, pick_level

    i = pick_level(levels, mpp, max_mpp, prefer="finer", tolerance=1.001)
    ds = level_downsamples(levels)[i]
    return i, ds, mpp * ds


def thumbnail(levels: Sequence, target: int = 2048) -> np.ndarray:
    """The whole image small (long side about ``target`` to ``2 * target`` px) for per-image
    estimates: the coarsest level at least ``target`` px long, strided further if needed."""
    pick = levels[0]
    for lv in levels[::-1]:
        if max(lv.shape[:2]) >= target:
            pick = lv
            break
    step = max(1, int(max(pick.shape[:2]) // (2 * target)))
    a = pick[::step, ::step]
    if hasattr(a, "compute"):
        a = a.compute()
    a = np.asarray(a)
    return a[..., :3] if a.ndim == 3 and a.shape[-1] == 4 else a


def image_context(levels: Sequence, *, estimate_stains: bool = False) -> tuple[StainModel, dict | None]:
    """One stain model for the whole image (so all tiles share one background) and the colour
    verdict (H&E-like or grayscale: the finding for every tile; None when the colours pass)."""
    from .scoring import _check_rgb

    th = _check_rgb(thumbnail(levels))
    model = estimate_stain_model(th, estimate_vectors=estimate_stains)
    f = image_check(th, 0.0)
    return model, (f if f["code"] in ("not_ihc", "grayscale") else None)


def read_rgb(level, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """A window of one level as a numpy RGB uint8 array (clipped to the level)."""
    h, w = level.shape[:2]
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    a = level[y0:y1, x0:x1]
    if hasattr(a, "compute"):
        a = a.compute()
    a = np.asarray(a)
    return a[..., :3] if a.ndim == 3 and a.shape[-1] == 4 else a


def _tissue_fraction(rgb: np.ndarray) -> float:
    from ..stain import rgb_to_od

    return float((rgb_to_od(rgb[::4, ::4]).sum(-1) > 0.25).mean()) if rgb.size else 0.0


@dataclass
class TileScore:
    row: int
    col: int
    bbox: tuple[int, int, int, int]  # level-0 (x0, y0, x1, y1)
    result: HER2Result | None  # None: skipped (no tissue)

    @property
    def label(self) -> int:
        return map_label(self.result)


@dataclass
class ScoreMap:
    """A per-tile HER2 map: ``labels[r, c]`` = 0 (no tissue), 1 + level index, or
    :data:`NOT_ASSESSABLE` (tissue without a level: too few tumour cells, pattern, ...)."""

    labels: np.ndarray
    tile: int  # tile size in level-0 pixels
    mpp: float | None  # level-0 mpp
    analysis_mpp: float
    tiles: list[TileScore] = field(default_factory=list)
    origin: tuple[int, int] = (0, 0)  # level-0 (x, y) of labels[0, 0]'s corner

    @property
    def overall(self) -> HER2Result:
        """All scored tiles' cells pooled (centroids in level-0 pixels)."""
        rs = [t.result for t in self.tiles if t.result is not None]
        return HER2Result.merge(rs) if rs else empty_result(self.analysis_mpp, image=_image_finding(
            "no_tissue", "no tissue"))

    def to_dict(self) -> dict:
        return {
            "tile": self.tile,
            "shape": list(self.labels.shape),
            "analysis_mpp": self.analysis_mpp,
            "overall": self.overall.to_dict(),
            "tiles": [
                {"row": t.row, "col": t.col, "bbox": list(t.bbox), **t.result.to_dict()}
                for t in self.tiles if t.result is not None
            ],
        }


def _to_level0(res: HER2Result, off_xy, ds: float) -> HER2Result:
    res.centroid = (res.centroid + np.asarray(off_xy, float)) * ds
    if res.label_image is not None:
        res.label_origin = tuple((np.asarray(res.label_origin, float) + np.asarray(off_xy, float)) * ds)
        res.label_downsample = float(ds)
    return res


def iter_tiles(
    image,
    mpp: float = 0.5,
    *,
    tile_um: float = 256.0,
    max_mpp: float = 1.0,
    halo_um: float = 12.0,
    min_tissue: float = 0.05,
    bbox: tuple[int, int, int, int] | None = None,
    estimate_stains: bool = False,
    stain_model: StainModel | None = None,
    **score_kw,
) -> Iterator[TileScore]:
    """Score an image tile by tile (row-major). Each tile is analysed with a halo so border
    cells are whole; a cell belongs to the tile holding its centroid. ``bbox`` (level-0 x0, y0,
    x1, y1) limits the area. Tiles with less than ``min_tissue`` stained area are skipped.
    One stain model (background) and colour verdict is taken from the whole image."""
    levels = as_levels(image)
    li, ds, amp = choose_level(levels, mpp, max_mpp)
    model, colours = image_context(levels, estimate_stains=estimate_stains)
    model = stain_model or model
    lv = levels[li]
    H0, W0 = levels[0].shape[:2]
    tile0 = max(int(round(tile_um / mpp)), 16)
    bx0, by0, bx1, by1 = bbox or (0, 0, W0, H0)
    halo = int(np.ceil(halo_um / amp))
    for r, y in enumerate(range(by0, by1, tile0)):
        for c, x in enumerate(range(bx0, bx1, tile0)):
            x1, y1 = min(x + tile0, bx1), min(y + tile0, by1)
            lx0, ly0 = int(x / ds), int(y / ds)
            lx1, ly1 = int(np.ceil(x1 / ds)), int(np.ceil(y1 / ds))
            core = read_rgb(lv, lx0, ly0, lx1, ly1)
            if core.size == 0 or _tissue_fraction(core) < min_tissue:
                yield TileScore(r, c, (x, y, x1, y1), None)
                continue
            wx0, wy0 = max(lx0 - halo, 0), max(ly0 - halo, 0)
            win = read_rgb(lv, wx0, wy0, lx1 + halo, ly1 + halo)
            res = score(win, amp, stain_model=model, image=colours, **score_kw)
            cx, cy = res.centroid[:, 0] + wx0, res.centroid[:, 1] + wy0
            inside = (cx >= lx0) & (cx < lx1) & (cy >= ly0) & (cy < ly1)
            res = _to_level0(res.subset(inside), (wx0, wy0), ds)
            yield TileScore(r, c, (x, y, x1, y1), res)


def iter_score_map(image, mpp: float = 0.5, *, tile_um: float = 256.0, max_mpp: float = 1.0, **kw):
    """Generator form of :func:`score_map`: yields ``(done, total)`` per tile and returns the
    :class:`ScoreMap` (``StopIteration.value``; use ``yield from``)."""
    levels = as_levels(image)
    H0, W0 = levels[0].shape[:2]
    tile0 = max(int(round(tile_um / mpp)), 16)
    bx0, by0, bx1, by1 = kw.get("bbox") or (0, 0, W0, H0)
    ny, nx = -(-(by1 - by0) // tile0), -(-(bx1 - bx0) // tile0)
    labels = np.zeros((ny, nx), np.uint8)
    tiles = []
    _, _, amp = choose_level(levels, mpp, max_mpp)
    for i, t in enumerate(iter_tiles(levels, mpp, tile_um=tile_um, max_mpp=max_mpp, **kw)):
        tiles.append(t)
        labels[t.row, t.col] = t.label
        yield i + 1, ny * nx
    return ScoreMap(labels, tile0, mpp, amp, tiles, (bx0, by0))


def score_map(
    image,
    mpp: float = 0.5,
    *,
    tile_um: float = 256.0,
    max_mpp: float = 1.0,
    progress: Callable[[int, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    **kw,
) -> ScoreMap:
    """Per-tile HER2 score map of a whole image or pyramid (see :func:`iter_tiles`; ``bbox``
    limits it to a level-0 box, the map's origin). ``labels[r, c]`` is 0 where no tumour cell
    was found, else 1 + the level index or :data:`NOT_ASSESSABLE`; ``overall`` pools all tiles'
    cells (a not-assessable tile's cells still count in the pool)."""
    return run_steps(iter_score_map(image, mpp, tile_um=tile_um, max_mpp=max_mpp, **kw),
                     progress, cancelled, "HER2 scoring cancelled")


def run_steps(gen, progress: Callable[[int, int], None] | None, cancelled: Callable[[], bool] | None,
              message: str):
    """Run a generator that yields ``(done, total)`` and returns its result: report each step to
    ``progress``; raise :class:`~napari_bci.errors.Cancelled` (``message``) when ``cancelled()``."""
    from ..errors import Cancelled

    while True:
        if cancelled is not None and cancelled():
            gen.close()
            raise Cancelled(message)
        try:
            done, total = next(gen)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(done, total)


def polygon_mask(polygon_xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise a polygon given as (x, y) vertices into a boolean mask of ``shape`` (rows, cols)."""
    from skimage.draw import polygon2mask

    p = np.asarray(polygon_xy, float)
    return polygon2mask(shape, p[:, ::-1])


def score_polygon(image, polygon, mpp: float = 0.5, *, max_mpp: float = 1.0, **kw) -> HER2Result:
    """Score the cells inside a region of an image or pyramid: ``polygon`` is an ``(K, 2)``
    array of (x, y) level-0 pixel vertices (napari convention: pixel centres at integers) or a
    :class:`napari_bci.regions.Region` (GeoJSON convention, holes and several parts allowed).
    Centroids of the result are level-0 pixels."""
    levels = as_levels(image)
    li, ds, amp = choose_level(levels, mpp, max_mpp)
    lv = levels[li]
    h, w = lv.shape[:2]
    if "stain_model" not in kw:
        kw["stain_model"], kw["image"] = image_context(levels,
                                                       estimate_stains=kw.get("estimate_stains", False))
    is_region = hasattr(polygon, "mask") and hasattr(polygon, "bounds")
    if is_region:
        bx0, by0, bx1, by1 = polygon.bounds
        lo, hi = np.array([bx0 - 0.5, by0 - 0.5]) / ds, np.array([bx1 - 0.5, by1 - 0.5]) / ds
    else:
        p = np.asarray(polygon, float).reshape(-1, 2) / ds
        lo, hi = p.min(0), p.max(0)
    x0, y0 = max(int(np.floor(lo[0])), 0), max(int(np.floor(lo[1])), 0)
    x1, y1 = min(int(np.ceil(hi[0])) + 1, w), min(int(np.ceil(hi[1])) + 1, h)
    if x1 <= x0 or y1 <= y0:
        return empty_result(amp, image=_image_finding("outside", "the region lies outside the image"))
    m = int(np.ceil(16.0 / amp))  # context around the region for the local background
    wx0, wy0 = max(x0 - m, 0), max(y0 - m, 0)
    win = read_rgb(lv, wx0, wy0, x1 + m, y1 + m)
    if is_region:
        mask = polygon.mask(win.shape[:2], offset_xy=(wx0 * ds, wy0 * ds), downsample=ds)
    else:
        mask = polygon_mask(p - [wx0, wy0], win.shape[:2])
    res = score(win, amp, mask=mask, **kw)
    return _to_level0(res, (wx0, wy0), ds)
