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


#: :func:`local_agreement` blocks: side and step (px of its 256-px view) and the search radius
LOCAL_BLOCK, LOCAL_STEP, LOCAL_SEARCH = 64, 32, 16


def local_agreement(fixed: Any, moving: Any, transform: Transform, side: int = 256) -> dict:
    """Does the alignment hold locally? In the fixed frame's ``side``-px view, each block of
    :data:`LOCAL_BLOCK` px with tissue in both images is matched (NCC of the ranked hematoxylin)
    against the warped moving image within :data:`LOCAL_SEARCH` px; on the same tissue the best
    local matches lie near the alignment (consecutive sections deform by a few of these px), on
    tissue that only looks alike as a whole they scatter over the search window.

    Returns ``local_blocks`` (how many blocks were judged), ``local_shift`` (the median distance of
    their best matches, as a fraction of the search radius: about 0.6 when scattered at random,
    near 1 when pushed to the window's edge; None with fewer than 4 blocks) and ``local_shift_px``
    (the same in level-0 px)."""
    from scipy import ndimage as ndi
    from skimage.feature import match_template

    from .images import downscale, tissue_mask
    from .intensity import ranked_hematoxylin

    pf, pm = as_pyramid(fixed), as_pyramid(moving)
    fimg, dsf = pf.image_at(4 * side)  # ranked at 4x the view's resolution, then averaged down
    k = max(int(np.ceil(max(fimg.shape[:2]) / side)), 1)
    mv, dsm = pm.image_near(dsf, 4 * side)
    warped, valid = warp_region(mv, transform, (0, 0), fimg.shape[:2], dsf, dsm, return_valid=True)

    def view(rgb):
        return ndi.gaussian_filter(downscale(ranked_hematoxylin(rgb).astype(np.float32), k), 1.0)

    a, b = view(fimg), view(warped)
    ta = downscale(tissue_mask(fimg).astype(np.float32), k) > 0.5
    tb = downscale((tissue_mask(warped) & valid).astype(np.float32), k) > 0.5
    s, r = LOCAL_BLOCK, LOCAL_SEARCH
    shifts = []
    for y in range(r, a.shape[0] - s - r + 1, LOCAL_STEP):
        for x in range(r, a.shape[1] - s - r + 1, LOCAL_STEP):
            if ta[y:y + s, x:x + s].mean() < 0.5 or tb[y - r:y + s + r, x - r:x + s + r].mean() < 0.5:
                continue
            c = match_template(b[y - r:y + s + r, x - r:x + s + r], a[y:y + s, x:x + s])
            iy, ix = np.unravel_index(int(np.argmax(c)), c.shape)
            shifts.append(float(np.hypot(iy - r, ix - r)))
    if len(shifts) < 4:
        return {"local_blocks": len(shifts), "local_shift": None, "local_shift_px": None}
    med = float(np.median(shifts))
    return {"local_blocks": len(shifts), "local_shift": med / r, "local_shift_px": med * k * dsf}
