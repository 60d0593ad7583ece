"""ASCO/CAP 2018 HER2 IHC scoring from detected cells.

Per cell: the membrane DAB intensity class (none / faint / weak-moderate / intense) from the
ring sectors' DAB optical density, and the completeness (fraction of ring sectors stained).
Per region: the fractions of tumour cells per class and the score 0 / 1+ / 2+ / 3+.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .cells import CellParams, Cells, detect_nuclei, measure_cells
from .stains import separate_hdab

LEVELS = ("0", "1+", "2+", "3+")
CLASSES = ("none", "faint", "weak_moderate", "intense")
#: ASCO/CAP: a level needs more than 10% of tumour cells.
CUTOFF = 0.10


@dataclass(frozen=True)
class ScoreParams:
    """Membrane classification thresholds (base-10 DAB OD) and tumour-cell selection."""

    #: A ring sector counts as stained when its maximum DAB OD reaches ``faint``.
    faint: float = 0.04
    #: Cell membrane intensity (mean over stained sectors) at which staining is weak-moderate ...
    weak: float = 0.16
    #: ... and intense.
    intense: float = 0.40
    #: Completeness (fraction of stained sectors) from which a membrane counts as complete.
    complete: float = 0.70
    #: Completeness below which a cell counts as unstained: short stained arcs are mostly a
    #: neighbour's membrane or granular background, not the cell's own membrane.
    min_completeness: float = 0.40
    #: Tumour cells: nucleus area (um^2) at least this, not spindle-shaped (minor/major axis
    #: ratio below ``spindle_aspect`` with a minor axis below ``spindle_minor_um``) ...
    tumour_min_area_um2: float = 40.0
    spindle_aspect: float = 0.5
    spindle_minor_um: float = 6.0
    #: ... not darker than ``lymph_darkness`` x the plump nuclei's median hematoxylin while
    #: smaller than ``lymph_max_area_um2`` (lymphocytes) ...
    lymph_darkness: float = 1.2
    lymph_max_area_um2: float = 70.0
    #: ... and at least ``density_min`` other nuclei within ``density_radius_um`` (nests).
    density_radius_um: float = 25.0
    density_min: int = 3


@dataclass
class HER2Result:
    """A HER2 score and the per-cell evidence behind it.

    Per-cell arrays (all detected cells, tumour or not): ``centroid`` (N, 2) (x, y) pixels of
    the scored image, ``cell_class`` (N,) int 0..3 indexing :data:`CLASSES`, ``completeness``
    (N,) in 0..1, ``intensity`` (N,) membrane DAB OD, ``tumour`` (N,) bool.
    """

    her2: str
    cells: int
    fractions: dict
    explanation: str
    centroid: np.ndarray = field(repr=False)
    cell_class: np.ndarray = field(repr=False)
    completeness: np.ndarray = field(repr=False)
    intensity: np.ndarray = field(repr=False)
    tumour: np.ndarray = field(repr=False)
    mpp: float = 0.5
    params: ScoreParams = field(default_factory=ScoreParams, repr=False)
    #: Set when the image does not look like a DAB IHC (e.g. an H&E was given).
    warning: str | None = None

    @property
    def level_index(self) -> int:
        return LEVELS.index(self.her2)

    def to_dict(self, per_cell: bool = False) -> dict:
        """JSON-able summary; ``per_cell=True`` adds the per-cell arrays as lists."""
        d = {
            "her2": self.her2,
            "cells": int(self.cells),
            "detected": int(len(self.centroid)),
            "fractions": {k: round(float(v), 4) for k, v in self.fractions.items()},
            "explanation": self.explanation,
            "mpp": float(self.mpp),
        }
        if self.warning:
            d["warning"] = self.warning
        if per_cell:
            d["per_cell"] = {
                "centroid": np.round(self.centroid, 1).tolist(),
                "class": [CLASSES[i] for i in self.cell_class],
                "completeness": np.round(self.completeness, 3).tolist(),
                "intensity": np.round(self.intensity, 3).tolist(),
                "tumour": self.tumour.astype(bool).tolist(),
            }
        return d

    def subset(self, keep: np.ndarray) -> "HER2Result":
        """The score of a subset of this result's cells (boolean or index array)."""
        out = summarize(
            self.centroid[keep], self.cell_class[keep], self.completeness[keep],
            self.intensity[keep], self.tumour[keep], mpp=self.mpp, params=self.params,
        )
        out.warning = self.warning
        return out

    @staticmethod
    def merge(results: Sequence["HER2Result"],
              offsets: Sequence[tuple[float, float]] | None = None) -> "HER2Result":
        """Pool the cells of several results (e.g. tiles; ``offsets`` (x, y) shift each one's
        centroids into a common frame) and score them together."""
        results = list(results)
        if not results:
            z = np.zeros(0)
            return summarize(np.zeros((0, 2)), z.astype(np.int8), z, z, z.astype(bool))
        offsets = offsets or [(0.0, 0.0)] * len(results)
        cen = np.concatenate([r.centroid + np.asarray(o, float) for r, o in zip(results, offsets)])
        cat = lambda a: np.concatenate([getattr(r, a) for r in results])  # noqa: E731
        out = summarize(cen, cat("cell_class"), cat("completeness"), cat("intensity"), cat("tumour"),
                        mpp=results[0].mpp, params=results[0].params)
        out.warning = next((r.warning for r in results if r.warning), None)
        return out


def classify_cells(sector_dab: np.ndarray, params: ScoreParams = ScoreParams()):
    """Per cell: (class 0..3, completeness 0..1, intensity OD) from ``(N, sectors)`` sector DAB."""
    valid = np.isfinite(sector_dab)
    sd = np.where(valid, sector_dab, 0.0)
    stained = (sd >= params.faint) & valid
    nvalid = np.maximum(valid.sum(1), 1)
    completeness = stained.sum(1) / nvalid
    nst = stained.sum(1)
    intensity = np.where(nst > 0, (sd * stained).sum(1) / np.maximum(nst, 1), 0.0)
    cls = np.zeros(len(sd), np.int8)
    on = completeness >= params.min_completeness
    cls[on] = 1
    cls[on & (intensity >= params.weak)] = 2
    cls[on & (intensity >= params.intense)] = 3
    return cls, completeness.astype(np.float32), intensity.astype(np.float32)


def select_tumour(cells: Cells, mpp: float, params: ScoreParams = ScoreParams()) -> np.ndarray:
    """Tumour-cell flag. Excluded: small nuclei (lymphocytes, debris), spindle-shaped nuclei
    (fibroblasts, endothelium: low minor/major axis ratio), small hyperchromatic nuclei
    (lymphocytes: mean hematoxylin well above that of the plump nuclei of the image) and
    isolated cells (fewer than ``density_min`` neighbours within ``density_radius_um``:
    tumour cells grow in nests)."""
    from scipy.spatial import cKDTree

    n = len(cells)
    if n == 0:
        return np.zeros(0, bool)
    aspect = cells.minor_um / np.maximum(cells.major_um, 1e-6)
    spindle = (aspect < params.spindle_aspect) & (cells.minor_um < params.spindle_minor_um)
    plump = (cells.area_um2 >= params.tumour_min_area_um2) & ~spindle
    ref = float(np.median(cells.h_mean[plump])) if plump.sum() >= 5 else float(np.median(cells.h_mean))
    dark_small = (cells.h_mean > params.lymph_darkness * ref) & (cells.area_um2 < params.lymph_max_area_um2)
    tree = cKDTree(cells.centroid)
    near = tree.query_ball_point(cells.centroid, params.density_radius_um / mpp)
    counts = np.asarray([len(x) - 1 for x in near])
    return plump & ~dark_small & (counts >= params.density_min)


def level_from_fractions(fr: dict) -> tuple[str, str]:
    """ASCO/CAP 2018 decision on tumour-cell fractions -> (level, the deciding criterion)."""
    if fr["intense_complete"] > CUTOFF:
        return "3+", "intense complete"
    if fr["complete_weak_or_more"] > CUTOFF:
        return "2+", "weak-moderate complete"
    if fr["any"] > CUTOFF:
        return "1+", "faint incomplete"
    return "0", "no or faint"


def summarize(centroid, cell_class, completeness, intensity, tumour, *, mpp: float = 0.5,
              params: ScoreParams = ScoreParams()) -> HER2Result:
    """Score per-cell measurements (only tumour cells count) into a :class:`HER2Result`."""
    cell_class = np.asarray(cell_class, np.int8)
    completeness = np.asarray(completeness, np.float32)
    tumour = np.asarray(tumour, bool)
    t = tumour
    n = int(t.sum())
    cc, comp = cell_class[t], completeness[t] >= params.complete
    frac = (lambda m: float(m.sum()) / n) if n else (lambda m: 0.0)
    fr = {name: frac(cc == i) for i, name in enumerate(CLASSES)}
    fr["complete"] = frac(comp & (cc > 0))
    fr["complete_weak_or_more"] = frac(comp & (cc >= 2))
    fr["intense_complete"] = frac(comp & (cc == 3))
    fr["any"] = frac(cc > 0)
    level, _ = level_from_fractions(fr)
    if n == 0:
        expl = "0: no tumour cells detected"
    elif level == "3+":
        expl = f"3+: {fr['intense_complete']:.0%} of {n} tumour cells show intense complete staining"
    elif level == "2+":
        expl = (f"2+: {fr['complete_weak_or_more']:.0%} of {n} tumour cells show "
                "weak-moderate complete staining")
    elif level == "1+":
        expl = (f"1+: {fr['any']:.0%} of {n} tumour cells show faint/incomplete staining "
                f"({fr['complete_weak_or_more']:.0%} complete weak-moderate or stronger)")
    else:
        expl = f"0: {fr['any']:.0%} of {n} tumour cells show membrane staining (<= 10%)"
    return HER2Result(level, n, fr, expl, np.asarray(centroid, float).reshape(-1, 2), cell_class,
                      completeness, np.asarray(intensity, np.float32), tumour, float(mpp), params)


def analyse(rgb: np.ndarray, mpp: float = 0.5, *, estimate_stains: bool = False,
            cell_params: CellParams = CellParams(), params: ScoreParams = ScoreParams()):
    """Detect and measure all cells of an RGB IHC image: returns (Cells, class, completeness,
    intensity, tumour)."""
    h, d = separate_hdab(rgb, estimate=estimate_stains)
    nuclei = detect_nuclei(h, mpp, cell_params)
    cells = measure_cells(nuclei, h, d, mpp, cell_params)
    cls, comp, inten = classify_cells(cells.sector_dab, params)
    tum = select_tumour(cells, mpp, params)
    return cells, cls, comp, inten, tum


#: Mean eosin OD over tissue above which an image is taken for an H&E, not a DAB IHC.
EOSIN_WARNING_OD = 0.08


def stain_warning(rgb: np.ndarray) -> str | None:
    """A warning when ``rgb`` is grayscale or looks like an eosin (H&E) stain rather than
    hematoxylin-DAB."""
    from ..stain import HED_MATRIX, rgb_to_od, separate

    step = max(1, int(np.sqrt(rgb.shape[0] * rgb.shape[1] / 250_000)))
    sub = rgb[::step, ::step]
    tissue = rgb_to_od(sub).sum(-1) > 0.3
    if tissue.sum() < 100:
        return None
    px = sub[tissue].astype(np.int16)
    if float(np.abs(np.diff(px, axis=1)).mean()) < 2.0:
        return "the image has no colour (grayscale): hematoxylin and DAB cannot be separated"
    e = float(np.maximum(separate(sub, HED_MATRIX)[..., 1], 0)[tissue].mean())
    if e > EOSIN_WARNING_OD:
        return (f"the image looks like an H&E stain (mean eosin OD {e:.2f}), not a HER2 DAB IHC; "
                "eosin is read as DAB and the score is not meaningful")
    return None


def _check_rgb(rgb) -> np.ndarray:
    from ..errors import InputError

    a = np.asarray(rgb)
    if a.ndim == 3 and a.shape[-1] == 4:
        a = a[..., :3]
    if a.ndim != 3 or a.shape[-1] != 3:
        raise InputError("image", f"expected an H x W x 3 RGB image, got shape {a.shape}")
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and a.size and a.max() <= 1.0:
            a = a * 255.0
        a = np.clip(a, 0, 255).astype(np.uint8)
    return a


def score(rgb, mpp: float = 0.5, mask: np.ndarray | None = None, *, estimate_stains: bool = False,
          cell_params: CellParams = CellParams(), params: ScoreParams = ScoreParams()) -> HER2Result:
    """Score an RGB HER2 IHC image (or the cells whose centroid lies in ``mask``) under ASCO/CAP
    2018. ``mpp``: microns per pixel of ``rgb``. Centroids are (x, y) pixels of ``rgb``."""
    a = _check_rgb(rgb)
    if mpp is None or not np.isfinite(mpp) or mpp <= 0:
        from ..errors import InputError

        raise InputError("mpp", f"microns per pixel must be positive, got {mpp}")
    off = (0, 0)
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != a.shape[:2]:
            from ..errors import InputError

            raise InputError("mask", f"shape {mask.shape} differs from the image's {a.shape[:2]}")
        ys, xs = np.nonzero(mask)
        if len(ys) == 0:
            return summarize(np.zeros((0, 2)), np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0, bool),
                             mpp=mpp, params=params)
        m = int(np.ceil(2 * cell_params.background_um / mpp))
        y0, y1 = max(ys.min() - m, 0), min(ys.max() + m + 1, a.shape[0])
        x0, x1 = max(xs.min() - m, 0), min(xs.max() + m + 1, a.shape[1])
        a, off = a[y0:y1, x0:x1], (x0, y0)
    cells, cls, comp, inten, tum = analyse(a, mpp, estimate_stains=estimate_stains,
                                           cell_params=cell_params, params=params)
    cen = cells.centroid + np.asarray(off, float)
    res = summarize(cen, cls, comp, inten, tum, mpp=mpp, params=params)
    if mask is not None and len(cen):
        xi = np.clip(np.rint(cen[:, 0]).astype(int), 0, mask.shape[1] - 1)
        yi = np.clip(np.rint(cen[:, 1]).astype(int), 0, mask.shape[0] - 1)
        res = res.subset(mask[yi, xi])
    res.warning = stain_warning(a)
    return res
