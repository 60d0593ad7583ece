"""ASCO/CAP 2018 HER2 IHC scoring from detected cells, with assessability and stain pattern.

Per cell: the membrane DAB intensity class (none / faint / weak-moderate / intense) from the
ring sectors' DAB optical density, the completeness (fraction of ring sectors stained) and the
stain pattern (where the DAB lies: nucleus, cytoplasm or membrane band). Per region: the
fractions of tumour cells per class, the H-score, and either the level 0 / 1+ / 2+ / 3+ or
*not assessable* with the reason (see :func:`summarize`, docs/her2.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..levels import HER2_LEVELS as LEVELS
from .cells import CellParams, Cells, add_dab_nuclei, detect_nuclei, measure_cells
from .stains import StainModel, estimate_stain_model

CLASSES = ("none", "faint", "weak_moderate", "intense")
PATTERNS = ("membranous", "cytoplasmic", "nuclear")
#: ASCO/CAP: a level needs more than 10% of tumour cells.
CUTOFF = 0.10
#: Machine-readable reasons a result is not assessable (``HER2Result.reason_code``).
REASONS = ("not_ihc", "grayscale", "no_tissue", "resolution", "outside", "too_few_cells", "pattern")


@dataclass(frozen=True)
class ScoreParams:
    """Membrane classification thresholds (base-10 DAB OD above the image's background),
    tumour-cell selection and assessability bounds."""

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
    #: Fewer tumour cells than this: not assessable (one cell moves a fraction by 1 point at
    #: 100 cells; a level then rests on at least 11 stained cells; docs/her2.md).
    min_tumour_cells: int = 100
    #: Coarsest pixel size at which membranes are measured (um/px); synthetic levels hold up
    #: to 1.4 um/px and fail at 2.0 (docs/her2.md).
    max_mpp: float = 1.2
    #: Stain pattern: a cell's DAB pattern is judged when one compartment's mean DAB reaches
    #: this OD; nuclear when the nucleus holds ``pattern_ratio`` x the cytoplasm and membrane
    #: band, cytoplasmic when the cytoplasm holds ``pattern_ratio`` x the membrane band.
    pattern_min_od: float = 0.10
    pattern_ratio: float = 1.5
    cyto_ratio: float = 1.25
    #: Share of pattern-stained tumour cells from which a nuclear / cytoplasmic pattern is
    #: the image's pattern (and warned about from half of that).
    pattern_share: float = 0.5


@dataclass
class HER2Result:
    """A HER2 score (or *not assessable* with its reason) and the per-cell evidence behind it.

    Per-cell arrays (all detected cells, tumour or not): ``centroid`` (N, 2) (x, y) pixels of
    the scored image, ``cell_class`` (N,) int 0..3 indexing :data:`CLASSES`, ``completeness``
    (N,) in 0..1, ``intensity`` (N,) membrane DAB OD, ``tumour`` (N,) bool, ``compartments``
    (N, 3) mean DAB of nucleus, cytoplasm and membrane band, ``cell_pattern`` (N,) int: -1
    unstained, else the index in :data:`PATTERNS`.
    """

    her2: str | None
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
    compartments: np.ndarray | None = field(default=None, repr=False)
    cell_pattern: np.ndarray | None = field(default=None, repr=False)
    #: Why there is no level (None when assessable), and its code (one of :data:`REASONS`).
    reason: str | None = None
    reason_code: str | None = None
    warnings: list = field(default_factory=list)
    #: The image's stain pattern: ``{"pattern", "stained", "membranous", "cytoplasmic", "nuclear"}``.
    pattern: dict = field(default_factory=dict)
    h_score: float = 0.0
    #: The ASCO/CAP criterion that decided the level ("" when not assessable).
    rule: str = ""
    #: Image-level findings kept when cells are subset or pooled (reason, code, warnings).
    image: dict = field(default_factory=dict, repr=False)
    stain: dict | None = field(default=None, repr=False)
    #: Cell outlines (``score(..., keep_labels=True)``): the cell label image, each result
    #: cell's label in it, and where the image lies: level-0 (x, y) of its pixel (0, 0) and
    #: level-0 pixels per label pixel. None after pooling (tiles, regions).
    label_image: np.ndarray | None = field(default=None, repr=False)
    label_ids: np.ndarray | None = field(default=None, repr=False)
    label_origin: tuple[float, float] = (0.0, 0.0)
    label_downsample: float = 1.0

    @property
    def assessable(self) -> bool:
        return self.her2 is not None

    @property
    def level_index(self) -> int | None:
        return None if self.her2 is None else LEVELS.index(self.her2)

    @property
    def warning(self) -> str | None:
        """All warnings in one line (None without any)."""
        return "; ".join(self.warnings) or None

    def display(self) -> str:
        """What a table shows: ``"2+"`` or ``"not assessable (too few tumour cells: 12 < 100)"``."""
        return display_text(self)

    def to_dict(self, per_cell: bool = False) -> dict:
        """JSON-able summary; ``per_cell=True`` adds the per-cell arrays as lists."""
        d = {
            "her2": self.her2,
            "assessable": self.assessable,
            "reason": self.reason,
            "reason_code": self.reason_code,
            "display": self.display(),
            "cells": int(self.cells),
            "detected": int(len(self.centroid)),
            "fractions": {k: round(float(v), 4) for k, v in self.fractions.items()},
            "h_score": round(float(self.h_score), 1),
            "pattern": {k: (round(float(v), 4) if isinstance(v, float) else v)
                        for k, v in self.pattern.items()},
            "rule": self.rule,
            "explanation": self.explanation,
            "warnings": list(self.warnings),
            "mpp": float(self.mpp),
        }
        if self.stain:
            d["stain"] = self.stain
        if per_cell:
            pat = self.cell_pattern if self.cell_pattern is not None else np.full(len(self.centroid), -1)
            d["per_cell"] = {
                "centroid": np.round(self.centroid, 1).tolist(),
                "class": [CLASSES[i] for i in self.cell_class],
                "completeness": np.round(self.completeness, 3).tolist(),
                "intensity": np.round(self.intensity, 3).tolist(),
                "tumour": self.tumour.astype(bool).tolist(),
                "pattern": [PATTERNS[i] if i >= 0 else "unstained" for i in pat],
            }
        return d

    def export_row(self) -> dict:
        """One flat row (scalars only) for CSV / GeoJSON measurements; see :func:`export_row`."""
        return export_row(self)

    def _arrays(self):
        n = len(self.centroid)
        comp = self.compartments if self.compartments is not None else np.zeros((n, 3), np.float32)
        return (self.centroid, self.cell_class, self.completeness, self.intensity, self.tumour, comp)

    def subset(self, keep: np.ndarray) -> "HER2Result":
        """The score of a subset of this result's cells (boolean or index array)."""
        c, k, cm, it, t, co = self._arrays()
        out = summarize(c[keep], k[keep], cm[keep], it[keep], t[keep], compartments=co[keep],
                        mpp=self.mpp, params=self.params, image=self.image, stain=self.stain)
        if self.label_image is not None:
            out.label_image, out.label_ids = self.label_image, self.label_ids[keep]
            out.label_origin, out.label_downsample = self.label_origin, self.label_downsample
        return out

    @staticmethod
    def merge(results: Sequence["HER2Result"],
              offsets: Sequence[tuple[float, float]] | None = None) -> "HER2Result":
        """Pool the cells of several results (e.g. tiles; ``offsets`` (x, y) shift each one's
        centroids into a common frame) and score them together. An image-level reason (H&E,
        resolution, ...) carries over when every part with tissue has one."""
        results = list(results)
        if not results:
            return empty_result(image=_image_finding("no_tissue", "no tissue"))
        offsets = offsets or [(0.0, 0.0)] * len(results)
        arrs = [r._arrays() for r in results]
        cen = np.concatenate([a[0] + np.asarray(o, float) for a, o in zip(arrs, offsets)])
        cat = [np.concatenate([a[i] for a in arrs]) for i in range(1, 6)]
        tissue = [r for r in results if r.image.get("code") != "no_tissue"]
        blocked = [r for r in tissue if r.image.get("reason")]
        if tissue and len(blocked) == len(tissue):
            image = dict(blocked[0].image)
        elif not tissue:
            image = dict(results[0].image)
        else:
            image = {"warnings": list(dict.fromkeys(w for r in tissue for w in r.image.get("warnings", [])))}
        return summarize(cen, *cat[:4], compartments=cat[4], mpp=results[0].mpp, params=results[0].params,
                         image=image, stain=results[0].stain)


def display_text(result) -> str:
    """The one text a table or a label shows for a result (a :class:`HER2Result` or its
    ``to_dict()``): the level (``"2+"``) or ``"not assessable (<reason>)"``; never "0" for a
    result without a level."""
    get = (lambda k: result.get(k)) if isinstance(result, dict) else (lambda k: getattr(result, k))
    her2 = get("her2")
    if her2 is not None:
        return str(her2)
    reason = get("reason")
    return f"not assessable ({reason})" if reason else "not assessable"


def export_row(result) -> dict:
    """Flat scalar fields of a result (or its dict) for a CSV row or GeoJSON measurements:
    ``her2`` (level or ""), ``her2_display``, ``assessable``, ``reason``, ``tumour_cells``,
    percentages per membrane class and criterion, ``h_score``, ``pattern``, ``rule``,
    ``warnings`` (joined by "; ")."""
    d = result if isinstance(result, dict) else result.to_dict()
    fr = d.get("fractions", {})
    row = {
        "her2": d.get("her2") or "",
        "her2_display": display_text(d),
        "assessable": bool(d.get("assessable")),
        "reason": d.get("reason") or "",
        "tumour_cells": int(d.get("cells", 0)),
        "detected_cells": int(d.get("detected", 0)),
    }
    for k in CLASSES + ("complete", "incomplete", "complete_weak_or_more", "intense_complete"):
        row[f"pct_{k}"] = round(100 * float(fr.get(k, 0.0)), 1)
    row["h_score"] = float(d.get("h_score", 0.0))
    row["pattern"] = (d.get("pattern") or {}).get("pattern", "")
    row["rule"] = d.get("rule", "")
    row["warnings"] = "; ".join(d.get("warnings", []))
    return row


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


def cell_patterns(compartments: np.ndarray, params: ScoreParams = ScoreParams()) -> np.ndarray:
    """Per cell: -1 (no compartment reaches ``pattern_min_od``) or the index in
    :data:`PATTERNS` of where its DAB lies (nuclear, cytoplasmic, else membranous)."""
    c = np.asarray(compartments, np.float32).reshape(-1, 3)
    nuc, cyto, mem = c[:, 0], c[:, 1], c[:, 2]
    out = np.full(len(c), -1, np.int8)
    on = c.max(1) >= params.pattern_min_od
    out[on] = 0
    out[on & (cyto >= params.cyto_ratio * mem)] = 1
    out[on & (nuc >= params.pattern_ratio * np.maximum(cyto, mem))] = 2
    return out


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
        return "3+", "3+: complete, intense membrane staining in > 10% of tumour cells"
    if fr["complete_weak_or_more"] > CUTOFF:
        return "2+", "2+: weak-moderate complete membrane staining in > 10% of tumour cells"
    if fr["any"] > CUTOFF:
        return "1+", "1+: faint/barely perceptible, incomplete membrane staining in > 10% of tumour cells"
    return "0", "0: no staining, or faint incomplete staining in <= 10% of tumour cells"


def _fractions(cc: np.ndarray, complete: np.ndarray) -> dict:
    n = len(cc)
    frac = (lambda m: float(m.sum()) / n) if n else (lambda m: 0.0)
    fr = {name: frac(cc == i) for i, name in enumerate(CLASSES)}
    fr["complete"] = frac(complete & (cc > 0))
    fr["incomplete"] = frac(~complete & (cc > 0))
    fr["complete_weak_or_more"] = frac(complete & (cc >= 2))
    fr["intense_complete"] = frac(complete & (cc == 3))
    fr["any"] = frac(cc > 0)
    return fr


def _image_finding(code: str | None = None, reason: str | None = None, warnings=()) -> dict:
    return {"code": code, "reason": reason, "warnings": list(warnings)}


def _pattern(pat: np.ndarray, params: ScoreParams) -> dict:
    """The image's pattern from its tumour cells' patterns: "none" when fewer than
    :data:`CUTOFF` of them carry a pattern-strength stain, else the dominant one."""
    stained = int((pat >= 0).sum())
    out = {"pattern": "none", "stained": stained}
    for i, name in enumerate(PATTERNS):
        out[name] = float((pat == i).sum()) / stained if stained else 0.0
    if stained > CUTOFF * len(pat):
        best = max(PATTERNS, key=lambda k: out[k])
        out["pattern"] = best if (best == "membranous" or out[best] >= params.pattern_share) else "membranous"
    return out


def summarize(centroid, cell_class, completeness, intensity, tumour, *, compartments=None, mpp: float = 0.5,
              params: ScoreParams = ScoreParams(), image: dict | None = None,
              stain: dict | None = None) -> HER2Result:
    """Score per-cell measurements (only tumour cells count) into a :class:`HER2Result`.

    Order of the verdict: an image-level reason (``image["reason"]``: not an IHC, no tissue,
    resolution) -> no tumour cells -> fewer than ``min_tumour_cells`` -> the ASCO/CAP level.
    When the stain pattern of the stained tumour cells is mostly nuclear or cytoplasmic, only
    membranous-pattern cells count as membrane-stained; if no level above 0 remains the result
    is not assessable (pattern), otherwise the level stands with a warning."""
    image = dict(image or _image_finding())
    cell_class = np.asarray(cell_class, np.int8)
    completeness = np.asarray(completeness, np.float32)
    tumour = np.asarray(tumour, bool)
    n_all = len(cell_class)
    comp = (np.zeros((n_all, 3), np.float32) if compartments is None
            else np.asarray(compartments, np.float32).reshape(n_all, 3))
    pat_all = cell_patterns(comp, params)
    t = tumour
    n = int(t.sum())
    cc, full = cell_class[t], completeness[t] >= params.complete
    pat = _pattern(pat_all[t], params)
    warnings = list(image.get("warnings", []))
    non_mem = pat["pattern"] in ("nuclear", "cytoplasmic")
    for name in ("nuclear", "cytoplasmic"):
        if pat["pattern"] != "none" and pat[name] >= params.pattern_share / 2:
            warnings.append(f"{name} DAB in {pat[name]:.0%} of the stained tumour cells: HER2 is scored on "
                            "membranes only" + (" (Ki67/ER/PR-like pattern)" if name == "nuclear" else ""))
    if non_mem:  # DAB that is not on membranes does not make a membrane class
        cc = np.where(pat_all[t] == 0, cc, 0).astype(np.int8)
    fr = _fractions(cc, full)
    h_score = 100.0 * (fr["faint"] + 2 * fr["weak_moderate"] + 3 * fr["intense"])
    level, rule = level_from_fractions(fr)
    code = reason = None
    if image.get("reason"):
        code, reason = image.get("code"), image["reason"]
    elif n == 0:
        code, reason = "too_few_cells", "no invasive tumour cells detected"
    elif n < params.min_tumour_cells:
        code, reason = "too_few_cells", f"too few tumour cells: {n} < {params.min_tumour_cells}"
    elif non_mem and level == "0":
        code = "pattern"
        reason = (f"stain pattern not membranous: {pat['pattern']} in {pat[pat['pattern']]:.0%} of stained "
                  "tumour cells")
    if reason is not None:
        level_out, rule = None, ""
        expl = f"not assessable: {reason}"
    else:
        level_out = level
        if level == "3+":
            expl = f"3+: {fr['intense_complete']:.0%} of {n} tumour cells show intense complete staining"
        elif level == "2+":
            expl = (f"2+: {fr['complete_weak_or_more']:.0%} of {n} tumour cells show "
                    "weak-moderate complete staining")
        elif level == "1+":
            expl = (f"1+: {fr['any']:.0%} of {n} tumour cells show faint/incomplete staining "
                    f"({fr['complete_weak_or_more']:.0%} complete weak-moderate or stronger)")
        else:
            expl = f"0: {fr['any']:.0%} of {n} tumour cells show membrane staining (<= 10%)"
    return HER2Result(level_out, n, fr, expl, np.asarray(centroid, float).reshape(-1, 2), cell_class,
                      completeness, np.asarray(intensity, np.float32), tumour, float(mpp), params,
                      compartments=comp, cell_pattern=pat_all, reason=reason, reason_code=code,
                      warnings=list(dict.fromkeys(warnings)), pattern=pat, h_score=h_score, rule=rule,
                      image=image, stain=stain)


def empty_result(mpp: float = 0.5, params: ScoreParams = ScoreParams(),
                 image: dict | None = None) -> HER2Result:
    """A result without cells (its ``image`` finding gives the reason)."""
    z = np.zeros(0)
    return summarize(np.zeros((0, 2)), z.astype(np.int8), z, z, z.astype(bool), mpp=mpp, params=params,
                     image=image)


def analyse(rgb: np.ndarray, mpp: float = 0.5, *, estimate_stains: bool = False,
            stain_model: StainModel | None = None, cell_params: CellParams = CellParams(),
            params: ScoreParams = ScoreParams()):
    """Detect and measure all cells of an RGB IHC image: returns (Cells, class, completeness,
    intensity, tumour, stain model). DAB is measured above the image's background
    (:class:`~napari_bci.her2.stains.StainModel`, estimated from ``rgb`` unless given)."""
    model = stain_model or estimate_stain_model(rgb, estimate_vectors=estimate_stains)
    h, d = model.separate(rgb)
    d = np.maximum(d - np.float32(model.dab_background), 0.0)
    pattern_dab = None
    if model.estimated_vectors:
        # nuclei and the pattern are read with the reference vectors (cross-talk corrected): a
        # per-image estimate mixes the stains where both share pixels, as in a nuclear stain;
        # the estimated vectors measure the membrane DAB only
        ref = estimate_stain_model(rgb)
        h, pattern_dab = ref.separate(rgb)
        pattern_dab = np.maximum(pattern_dab - np.float32(ref.dab_background), 0.0)
    nuclei = add_dab_nuclei(detect_nuclei(h, mpp, cell_params), d if pattern_dab is None else pattern_dab,
                            mpp, cell_params)
    cells = measure_cells(nuclei, h, d, mpp, cell_params, pattern_dab=pattern_dab)
    cls, comp, inten = classify_cells(cells.sector_dab, params)
    tum = select_tumour(cells, mpp, params)
    return cells, cls, comp, inten, tum, model


#: Mean eosin OD over tissue above which an image is taken for an H&E, not a DAB IHC (real
#: MIST IHC: <= 0.001; real H&E: 0.13-0.22, docs/her2.md).
EOSIN_WARNING_OD = 0.06
#: Fraction of the image that must be tissue (OD sum > 0.25) for a score.
MIN_TISSUE = 0.02


def _tissue(rgb: np.ndarray) -> np.ndarray:
    from ..stain import rgb_to_od

    return rgb_to_od(rgb).sum(-1) > 0.25


def image_check(rgb: np.ndarray, mpp: float, params: ScoreParams = ScoreParams(),
                mask: np.ndarray | None = None) -> dict:
    """Image-level assessability of an RGB image (optionally only inside ``mask``):
    ``{"code", "reason", "warnings"}``; ``reason`` is None when the image can be scored.
    Checked: pixel size (``params.max_mpp``), tissue (:data:`MIN_TISSUE`), colour (grayscale),
    and H&E-like colours (eosin over tissue above :data:`EOSIN_WARNING_OD`)."""
    from ..stain import HED_MATRIX, separate

    if mpp > params.max_mpp:
        return _image_finding("resolution", f"resolution too coarse for membranes: {mpp:.2g} um/px > "
                              f"{params.max_mpp:g} um/px")
    step = max(1, int(np.sqrt(rgb.shape[0] * rgb.shape[1] / 250_000)))
    sub = rgb[::step, ::step]
    within = np.ones(sub.shape[:2], bool) if mask is None else np.asarray(mask, bool)[::step, ::step]
    tissue = _tissue(sub) & within
    frac = tissue.sum() / max(within.sum(), 1)
    if frac < MIN_TISSUE:
        return _image_finding("no_tissue", f"no tissue ({frac:.1%} of the area is stained tissue)")
    if tissue.sum() < 100:
        return _image_finding("no_tissue", f"too little tissue to score ({int(tissue.sum()) * step * step} px "
                              f"of {rgb.shape[1]}x{rgb.shape[0]}; at least 100 px needed)")
    px = sub[tissue].astype(np.int16)
    if float(np.abs(np.diff(px, axis=1)).mean()) < 2.0:
        return _image_finding("grayscale", "the image has no colour (grayscale): hematoxylin and DAB "
                              "cannot be separated")
    e = float(np.maximum(separate(sub, HED_MATRIX)[..., 1], 0)[tissue].mean())
    if e > EOSIN_WARNING_OD:
        return _image_finding("not_ihc", f"not a DAB IHC: H&E-like colours (mean eosin OD {e:.2f} over "
                              f"tissue > {EOSIN_WARNING_OD})")
    return _image_finding()


def stain_warning(rgb: np.ndarray) -> str | None:
    """The reason an image is refused for its colours (H&E-like or grayscale), else None."""
    f = image_check(np.asarray(rgb)[..., :3], 0.0)
    return f["reason"] if f["code"] in ("not_ihc", "grayscale") else None


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
          stain_model: StainModel | None = None, image: dict | None = None, keep_labels: bool = False,
          cell_params: CellParams = CellParams(), params: ScoreParams = ScoreParams()) -> HER2Result:
    """Score an RGB HER2 IHC image (or the cells whose centroid lies in ``mask``) under ASCO/CAP
    2018. ``mpp``: microns per pixel of ``rgb``. Centroids are (x, y) pixels of ``rgb``.
    ``stain_model`` / ``image`` (an :func:`image_check` finding) may come from the whole slide
    so that tiles share one background and one verdict on the colours. ``keep_labels`` keeps
    the cell label image for outlines (``label_image``, ``label_ids``, ``label_origin``)."""
    from ..errors import InputError

    a = _check_rgb(rgb)
    if mpp is None or not np.isfinite(mpp) or mpp <= 0:
        raise InputError("mpp", f"microns per pixel must be positive, got {mpp}")
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != a.shape[:2]:
            raise InputError("mask", f"shape {mask.shape} differs from the image's {a.shape[:2]}")
    if image is None:
        image = image_check(a, mpp, params, mask)
    elif image.get("code") != "resolution" and mpp > params.max_mpp:
        image = image_check(a, mpp, params, mask)
    if image.get("reason") and image.get("code") in ("resolution", "not_ihc", "grayscale", "no_tissue"):
        return empty_result(mpp, params, image)
    off = (0, 0)
    if mask is not None:
        ys, xs = np.nonzero(mask)
        if len(ys) == 0:
            return empty_result(mpp, params, _image_finding("outside", "the region is empty"))
        m = int(np.ceil(2 * cell_params.background_um / mpp))
        y0, y1 = max(ys.min() - m, 0), min(ys.max() + m + 1, a.shape[0])
        x0, x1 = max(xs.min() - m, 0), min(xs.max() + m + 1, a.shape[1])
        if stain_model is None:  # the background of the whole image, not only of the region
            stain_model = estimate_stain_model(a, estimate_vectors=estimate_stains)
        a, off = a[y0:y1, x0:x1], (x0, y0)
    cells, cls, comp, inten, tum, model = analyse(a, mpp, estimate_stains=estimate_stains,
                                                  stain_model=stain_model, cell_params=cell_params,
                                                  params=params)
    cen = cells.centroid + np.asarray(off, float)
    res = summarize(cen, cls, comp, inten, tum, compartments=cells.compartments, mpp=mpp, params=params,
                    image=image, stain=model.to_dict())
    if keep_labels:
        res.label_image, res.label_ids = cells.cells, np.arange(1, len(cen) + 1, dtype=np.int32)
        res.label_origin = (float(off[0]), float(off[1]))
    if mask is not None and len(cen):
        xi = np.clip(np.rint(cen[:, 0]).astype(int), 0, mask.shape[1] - 1)
        yi = np.clip(np.rint(cen[:, 1]).astype(int), 0, mask.shape[0] - 1)
        res = res.subset(mask[yi, xi])
    return res
