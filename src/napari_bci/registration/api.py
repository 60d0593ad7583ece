"""One entry point for all methods, used by the CLI and the widget: :func:`register`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import InputError
from ..transform import Transform
from .deformable import (MAX_STRUCTURE_SHIFT, OVERLAP, PART, mean_field, rebase_field, register_deformable,
                         structure_kw)
from .features import SHARED_CELLS_NCC, register_auto
from .images import as_pyramid
from .landmarks import fit_landmarks
from .quality import quality_report

METHODS = ("landmarks", "auto", "deformable")
#: without landmarks, a dense field whose median displacement beyond the automatic projective
#: start exceeds this fraction of the fixed image's diagonal is dropped (docs/registration.md)
MAX_FIELD_SHIFT = 0.01
#: a structure-following field that lowers the tissue's orientation agreement by more than this
#: is dropped; one that moves tissue by over RAISE_SHIFT of the diagonal must raise it
ORIENTATION_TOLERANCE = 0.03
RAISE_SHIFT = 0.02


@dataclass
class RegistrationResult:
    transform: Transform
    report: dict = field(default_factory=dict)


def register(
    fixed: Any,
    moving: Any,
    method: str = "deformable",
    landmarks: tuple[np.ndarray, np.ndarray] | None = None,
    model: str = "projective",
    ransac: bool = False,
    engine: str = "flow",
    coarse_side: int = 384,
    refine_side: int = 1024,
    deform_side: int = 4096,
    part: int = PART,
    overlap: int = OVERLAP,
    quality: bool = True,
    seed: int = 0,
    progress: Callable[[str, float], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> RegistrationResult:
    """Register ``moving`` (H&E) onto ``fixed`` (IHC); both an RGB array, a list of pyramid levels
    or a slide with ``.levels``.

    ``method``: ``"landmarks"`` (needs ``landmarks`` = (moving (N,2), fixed (N,2)) level-0 px),
    ``"auto"`` (stain-invariant search, any rotation and flips; raises
    :class:`~napari_bci.registration.features.RegistrationFailed` when it finds no trustworthy
    alignment), ``"deformable"`` (landmarks when given, else
    auto, then the dense field with ``engine`` ``"flow"`` or ``"elastix"``). Landmarks given with
    ``"auto"`` are used for the quality report only.
    """
    from ..errors import Cancelled

    if method not in METHODS:
        raise InputError("method", f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    pf, pm = as_pyramid(fixed), as_pyramid(moving)
    say = progress or (lambda msg, frac: None)
    report: dict = {"method": method}
    if method == "landmarks" and landmarks is None:
        raise InputError("landmarks", "the landmarks method needs at least 4 landmark pairs")
    shared_cells = True
    if landmarks is not None and method in ("landmarks", "deformable"):
        fit = fit_landmarks(*landmarks, model=model, ransac=ransac, seed=seed)
        t = fit.transform
        report["landmark_residuals"] = [float(r) for r in fit.residuals]
        report["landmark_inliers"] = [bool(b) for b in fit.inliers]
    else:
        def sub(msg, frac):
            say(f"auto: {msg}", 0.4 * frac if method == "deformable" else frac)

        res = register_auto(pf, pm, coarse_side=coarse_side, refine_side=refine_side, seed=seed, progress=sub)
        t = res.transform
        shared_cells = res.info["cell_ncc"] >= SHARED_CELLS_NCC
        report.update({"auto_start": t.meta.get("start"), "auto_score": t.meta.get("score"),
                       "auto_orientation": t.meta.get("orientation"), "auto_decision": t.meta.get("decision"),
                       "feature_inliers": res.inliers, "feature_matches": res.matches,
                       "flipped": res.flipped})
        for k in ("structure_polish_px", "structure_polish_rejected", "local_blocks", "local_shift",
                  "local_shift_px"):
            if k in res.info:
                report[k] = res.info[k]
    if cancelled is not None and cancelled():
        raise Cancelled("registration cancelled")
    if method == "deformable":
        def sub2(msg, frac):
            say(msg, 0.4 + 0.55 * frac)

        kw = {"max_side": deform_side}
        if not shared_cells:
            # consecutive sections share no cells: the flow follows the tissue's structure instead,
            # at half the resolution with the cells blurred (closer to the automatic start's
            # own result on real pairs, and a quarter of the time; docs/registration.md)
            kw = structure_kw(pf.shape, engine, deform_side)
        report["deformable_follows"] = "cells" if shared_cells else "tissue structure"
        if (landmarks is None and res.structure_field is not None
                and res.structure_kw == structure_kw(pf.shape, engine, deform_side, part, overlap)):
            # the automatic step's polish computed this very field: the same map, on top of the
            # polished projective
            td = rebase_field(res.structure_field, t.matrix)
            td.meta = dict(t.meta, **td.meta)
            if not np.allclose(res.structure_field.matrix, t.matrix):
                # the field also depends on the pose it started from: averaged with a fresh one from
                # the fitted pose, the result depends less on either (docs/registration.md)
                fresh = register_deformable(pf, pm, t, engine=engine, part=part, overlap=overlap, progress=sub2,
                                            cancelled=cancelled, **kw)
                td = mean_field(td, fresh)
                td.meta["deformable_fields"] = report["deformable_fields"] = 2
        else:
            td = register_deformable(pf, pm, t, engine=engine, part=part, overlap=overlap, progress=sub2,
                                     cancelled=cancelled, **kw)
        if landmarks is None:
            # without landmarks nothing vouches for the dense field: one that moves tissue far
            # beyond the trusted projective start, or that makes the stain-invariant figures
            # worse, follows noise and is dropped (docs/registration.md)
            from .quality import image_similarity

            u = np.zeros((1, 2)) if td.field is None else td.field.reshape(-1, 2)
            shift = float(np.median(np.linalg.norm(u, axis=1)))
            diag = float(np.hypot(*pf.shape))
            cap = MAX_FIELD_SHIFT if shared_cells else MAX_STRUCTURE_SHIFT
            limit = cap * diag
            if shift > limit:
                report["deformable_rejected"] = (
                    f"the field moves tissue by a median {shift:.0f} px beyond the projective start "
                    f"(over {limit:.0f} px, {100 * cap:g} % of the diagonal)")
            else:
                side = 1024 if shared_cells else 256  # the orientation is measured at 256 px anyway
                a, b = image_similarity(pf, pm, t, side), image_similarity(pf, pm, td, side)
                if shared_cells and b["ncc"] < a["ncc"] - 0.01:
                    report["deformable_rejected"] = (
                        f"the field lowered the ranked-hematoxylin NCC ({a['ncc']:.3f} -> {b['ncc']:.3f})")
                elif not shared_cells:
                    # the flow raises the hematoxylin NCC it follows whether right or not; the
                    # tissue's orientation is what a drifting field on consecutive sections
                    # loses: a field moving tissue by over 2 % of the diagonal must raise it, a
                    # smaller one must not clearly lower it (its noise is about 0.02)
                    gain = b["orientation"] - a["orientation"]
                    big = shift > RAISE_SHIFT * diag
                    if (big and not gain > 0) or gain < -ORIENTATION_TOLERANCE:
                        if big and gain >= -ORIENTATION_TOLERANCE:
                            what = (f"moves tissue by a median {shift:.0f} px (over {100 * RAISE_SHIFT:g} % "
                                    "of the diagonal) without raising")
                        else:
                            what = "lowered"
                        report["deformable_rejected"] = (
                            f"the field {what} the tissue's orientation agreement "
                            f"({a['orientation']:.3f} -> {b['orientation']:.3f})")
            report["deformable_kept"] = "deformable_rejected" not in report
            if not report["deformable_kept"]:
                td = Transform(t.matrix, meta=dict(t.meta, deformable="rejected"))
        t = td
    t.meta["method"] = method
    if quality:
        say("quality", 0.97)
        report.update(quality_report(pf, pm, t, landmarks))
    say("done", 1.0)
    return RegistrationResult(t, report)


def map_vertices(transform: Transform, vertices_rc, inverse: bool = False) -> np.ndarray:
    """Map napari-style ``(row, col)`` vertices (level-0 px) moving -> fixed (or back with
    ``inverse``); returns the same layout."""
    v = np.asarray(vertices_rc, dtype=np.float64).reshape(-1, 2)
    xy = v[:, ::-1]
    out = transform.backward(xy) if inverse else transform.forward(xy)
    return out[:, ::-1]


def map_shapes(transform: Transform, shapes: list, inverse: bool = False) -> list:
    """Map each ``(N, 2)`` (row, col) vertex array of a napari Shapes layer's data."""
    return [map_vertices(transform, s, inverse) for s in shapes]
