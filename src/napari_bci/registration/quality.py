"""Registration quality: landmark TRE, NCC and mutual information of the stain-invariant
(ranked hematoxylin) channel before/after, the tissue overlap, and the fraction of folded pixels
of the displacement field."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..transform import Transform
from .images import as_pyramid, od_channel
from .warp import warp_region


def tre(transform: Transform | None, moving_pts, fixed_pts) -> dict:
    """Target registration error (level-0 px) of ``transform`` on point pairs (identity if None)."""
    m = np.asarray(moving_pts, dtype=np.float64).reshape(-1, 2)
    f = np.asarray(fixed_pts, dtype=np.float64).reshape(-1, 2)
    p = m if transform is None else transform.forward(m)
    e = np.linalg.norm(p - f, axis=1)
    if not len(e):
        return {"n": 0, "median": None, "mean": None, "max": None}
    return {"n": int(len(e)), "median": float(np.median(e)), "mean": float(e.mean()), "max": float(e.max()),
            "per_pair": [float(x) for x in e]}


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Normalised cross-correlation of two images over ``mask``."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if mask is not None:
        a, b = a[mask], b[mask]
    a = a - a.mean()
    b = b - b.mean()
    d = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / d) if d > 0 else 0.0


def mutual_information(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, bins: int = 32) -> float:
    """Mutual information (nats) of two images' joint histogram over ``mask``."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if mask is not None:
        a, b = a[mask], b[mask]
    if a.size == 0:
        return 0.0
    h, _, _ = np.histogram2d(a.ravel(), b.ravel(), bins=bins)
    p = h / h.sum()
    px, py = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / (px @ py)[nz])).sum())


def jacobian_determinant(transform: Transform) -> np.ndarray | None:
    """Determinant of the Jacobian of ``p -> p + u(p)`` on the field grid (None without a field)."""
    if transform.field is None:
        return None
    u = transform.field.astype(np.float64)
    if min(u.shape[:2]) < 2:
        return np.ones(u.shape[:2])
    duy, dux = np.gradient(u[..., 0], transform.spacing)  # d(dx)/dy, d(dx)/dx
    dvy, dvx = np.gradient(u[..., 1], transform.spacing)
    return (1 + dux) * (1 + dvy) - duy * dvx


def folded_fraction(transform: Transform) -> float:
    """Fraction of field samples with Jacobian determinant <= 0 (0 without a field)."""
    j = jacobian_determinant(transform)
    return 0.0 if j is None else float(np.mean(j <= 0))


def image_similarity(fixed: Any, moving: Any, transform: Transform | None, max_side: int = 1024) -> dict:
    """In the fixed frame (at a level with longer side <= ``max_side``), where the warped moving
    image has data: NCC and mutual information of the ranked hematoxylin channels (comparable
    across H&E and IHC, see :func:`~napari_bci.registration.intensity.invariant_channels`), and
    the tissue overlap (Dice coefficient of the two tissue masks); and, at a longer side of
    256 px, the :func:`~napari_bci.registration.intensity.orientation_agreement` of the tissue."""
    from ..stain import rgb_to_od
    from .images import downscale
    from .intensity import invariant_channels, orientation_agreement, orientation_field

    pf, pm = as_pyramid(fixed), as_pyramid(moving)

    def fixed_side():
        fimg, dsf = pf.image_at(max_side)
        sigma = max(fimg.shape[:2]) / 512  # cell scale at 20x: consecutive sections share no cells
        k = max(int(np.ceil(max(fimg.shape[:2]) / 256)), 1)
        od = downscale(rgb_to_od(fimg).sum(-1).astype(np.float32), k)
        return fimg.shape[:2], dsf, sigma, k, invariant_channels(fimg, sigma), od, orientation_field(od)

    shape, dsf, sigma, k, a, od_f, field_f = pf.memo(("similarity", max_side), fixed_side)
    mv, dsm = pm.image_near(dsf, max_side)
    t = transform if transform is not None else Transform()
    warped, valid = warp_region(mv, t, (0, 0), shape, dsf, dsm, fill="constant", return_valid=True)
    if valid.sum() < 100:
        return {"ncc": 0.0, "mi": 0.0, "tissue_overlap": 0.0, "orientation": 0.0, "overlap": float(valid.mean())}
    b = invariant_channels(warped, sigma)
    ta, tb = (a[0] > 0.5) & valid, (b[0] > 0.5) & valid
    dice = 2 * float((ta & tb).sum()) / max(float(ta.sum() + tb.sum()), 1.0)
    od_m = downscale(rgb_to_od(warped).sum(-1).astype(np.float32), k)
    orient = orientation_agreement(od_f, od_m, None, field_f, valid=downscale(valid.astype(np.float32), k) > 0.999)
    return {"ncc": ncc(a[1], b[1], valid), "mi": mutual_information(a[1], b[1], valid),
            "tissue_overlap": dice, "orientation": orient, "overlap": float(valid.mean())}


def quality_report(fixed: Any, moving: Any, transform: Transform, landmarks=None,
                   before: Transform | None = None,
                   max_side: int = 1024) -> dict:
    """All figures, before (``before``, default identity) and after ``transform``."""
    b = image_similarity(fixed, moving, before, max_side)
    a = image_similarity(fixed, moving, transform, max_side)
    out = {
        "ncc_before": b["ncc"], "ncc_after": a["ncc"],
        "mi_before": b["mi"], "mi_after": a["mi"],
        "tissue_overlap_before": b["tissue_overlap"], "tissue_overlap_after": a["tissue_overlap"],
        "orientation_before": b["orientation"], "orientation_after": a["orientation"],
        "folded_fraction": folded_fraction(transform),
    }
    if landmarks is not None:
        m, f = landmarks
        tb, ta = tre(before, m, f), tre(transform, m, f)
        out["tre_before"] = {k: v for k, v in tb.items() if k != "per_pair"}
        out["tre_after"] = {k: v for k, v in ta.items() if k != "per_pair"}
        out["tre_per_pair"] = ta.get("per_pair", [])
    return out
