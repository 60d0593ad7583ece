"""Deformable refinement: a dense, smooth displacement field on top of a projective transform.

Two engines estimate the residual flow between the fixed hematoxylin channel and the moving one
already warped by the current transform:

* ``"flow"`` (default, core dependencies only): scikit-image's iterative Lucas-Kanade
  (``optical_flow_ilk``), then a confidence-weighted Gaussian smoothing that keeps the field
  smooth (no folding) and fills stain-free areas from their surroundings;
* ``"elastix"`` (optional extra ``napari-bci[elastix]``): itk-elastix affine + B-spline, composed
  with the projective step (elastix has no projective transform).

The residual field is composed with the current one and stored at low resolution in the
:class:`~napari_bci.transform.Transform` (``field`` with ``spacing``).
"""

from __future__ import annotations

import tempfile
from typing import Any, Callable

import numpy as np
from scipy import ndimage as ndi

from ..errors import InputError
from ..transform import Transform, apply_matrix
from .images import TISSUE_OD, as_pyramid, od_channel, od_range
from .intensity import ranked_density, ranked_hematoxylin
from .warp import warp_region

ENGINES = ("flow", "elastix")
#: where two sections share no cells, the flow follows tissue structure: the ranked hematoxylin
#: smoothed by this many px of the half-resolution level, with this Lucas-Kanade window radius
#: and field smoothing (px), chosen on the real pairs of docs/registration.md
STRUCTURE_SIGMA = 2.5
STRUCTURE_FLOW = {"radius": 7, "sigma": 16.0}
#: without landmarks, a structure-following field whose median displacement exceeds this
#: fraction of the fixed image's diagonal is dropped (docs/registration.md)
MAX_STRUCTURE_SHIFT = 0.03


#: Default part side and overlap of :func:`register_deformable` (px of its working level).
PART, OVERLAP = 1024, 128


def structure_kw(fixed_shape: tuple[int, int], engine: str = "flow", deform_side: int = 4096,
                 part: int | None = None, overlap: int | None = None) -> dict:
    """:func:`register_deformable` arguments of the structure-following field for a fixed image
    of level-0 ``fixed_shape``: half the resolution, cells blurred (and ``part``/``overlap``
    where given)."""
    kw = {"max_side": max(min(deform_side, max(fixed_shape)) // 2, 256), "structure": STRUCTURE_SIGMA,
          **(STRUCTURE_FLOW if engine == "flow" else {})}
    return kw | {k: v for k, v in (("part", part), ("overlap", overlap)) if v is not None}


def smooth_flow(v: np.ndarray, weight: np.ndarray, sigma: float) -> np.ndarray:
    """Normalised (confidence-weighted) Gaussian smoothing of a ``(2, H, W)`` flow; where there
    is little confidence nearby, a 4x wider kernel fills in."""
    w = weight.astype(np.float32)
    out = np.empty_like(v, dtype=np.float32)
    ws = ndi.gaussian_filter(w, sigma)
    wl = ndi.gaussian_filter(w, 4 * sigma)
    floor = 0.05 * float(w.mean() + 1e-12)
    for k in range(v.shape[0]):
        a = ndi.gaussian_filter(w * v[k], sigma) / np.maximum(ws, 1e-12)
        b = ndi.gaussian_filter(w * v[k], 4 * sigma) / np.maximum(wl, 1e-12)
        t = np.clip(ws / floor, 0, 1)
        out[k] = t * a + (1 - t) * b
    return out


def flow_ilk(fixed_od: np.ndarray, moving_od: np.ndarray, radius: int = 15, sigma: float = 4.0,
             num_warp: int = 5, weight: np.ndarray | None = None) -> np.ndarray:
    """Residual flow ``(2, H, W)`` (rows, cols) such that ``fixed(p) ~ moving(p + v(p))``;
    ``weight`` (``(H, W)`` in [0, 1]) scales the confidence of the smoothing (0: not trusted).

    ``(C, H, W)`` inputs: one flow per channel, fused by a normalised convolution over all
    channels' flows, each weighted by its texture and by how well that channel agrees between the
    images once its flow is applied (``r^2 / (1 - r^2)`` of the local NCC ``r``, a correlation's
    signal-to-noise ratio): a channel without structure somewhere, or whose contrast differs
    between the two stains there, does not pull the others' flow."""
    from skimage.registration import optical_flow_ilk

    several = fixed_od.ndim == 3
    if not several:
        fixed_od, moving_od = fixed_od[None], moving_od[None]
    num, conf = 0.0, 0.0
    for f, m in zip(fixed_od, moving_od):
        v = optical_flow_ilk(f, m, radius=radius, num_warp=num_warp, prefilter=False)
        # confidence: local gradient energy of both images (flow is undetermined in flat areas)
        gy, gx = np.gradient(ndi.gaussian_filter(f, 1.0))
        gy2, gx2 = np.gradient(ndi.gaussian_filter(m, 1.0))
        c = ndi.uniform_filter(np.minimum(gy * gy + gx * gx, gy2 * gy2 + gx2 * gx2), 2 * radius + 1)
        if several:  # and how well this contrast agrees between the images once its flow is applied
            r2 = np.clip(local_ncc(f, _warp_by(m, v), radius), 0, 0.99) ** 2
            c = c * r2 / (1 - r2)
        num, conf = num + c * v, conf + c
    v = num / np.maximum(conf, 1e-12)
    return smooth_flow(v, conf if weight is None else conf * weight, sigma)


def _warp_by(img: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``img(p + v(p))`` (bilinear, edges repeated)."""
    rr, cc = np.meshgrid(np.arange(img.shape[0], dtype=np.float32), np.arange(img.shape[1], dtype=np.float32),
                         indexing="ij")
    return ndi.map_coordinates(img, [rr + v[0], cc + v[1]], order=1, mode="nearest")


def local_ncc(a: np.ndarray, b: np.ndarray, radius: int) -> np.ndarray:
    """Normalised cross-correlation of ``a`` and ``b`` in ``(2 radius + 1)``-px windows."""
    def mean(x):
        return ndi.uniform_filter(x, 2 * radius + 1)

    ma, mb = mean(a), mean(b)
    cov = mean(a * b) - ma * mb
    va, vb = np.maximum(mean(a * a) - ma * ma, 0), np.maximum(mean(b * b) - mb * mb, 0)
    return cov / np.sqrt(va * vb + 1e-12)


def shared_tissue_weight(fixed_rgb: np.ndarray, warped_rgb: np.ndarray, valid: np.ndarray, sigma: float,
                         radius: int) -> np.ndarray | None:
    """Where consecutive sections can guide a structure flow: 0 within ``radius`` px of an area
    over ``2 radius`` px wide where one has tissue and the other none (a tear, a fold, tissue cut
    off by a patch's edge: there is nothing to follow there, only an edge to be pulled to) or of
    the moving image's frame (``valid`` False: mirrored data); 1 elsewhere (None: 1 everywhere)."""
    from ..stain import rgb_to_od

    t = [ndi.gaussian_filter(rgb_to_od(np.asarray(x)[..., :3]).sum(-1), sigma) > TISSUE_OD
         for x in (fixed_rgb, warped_rgb)]
    # thin bands of disagreement along tissue edges are the misalignment the flow is there to fix
    bad = ndi.binary_opening(t[0] != t[1], iterations=int(radius)) | ~valid
    return (~ndi.binary_dilation(bad, iterations=int(radius))).astype(np.float32) if bad.any() else None


def elastix_available() -> bool:
    try:
        import itk  # noqa: F401

        return hasattr(itk, "elastix_registration_method")
    except ImportError:
        return False


def flow_elastix(fixed_od: np.ndarray, moving_od: np.ndarray, grid_spacing: float = 48.0,
                 seed: int = 0, resolutions: int = 4, iterations: int = 500) -> np.ndarray:
    """Residual flow ``(2, H, W)`` from itk-elastix affine + B-spline (advanced Mattes MI).

    The elastix log goes to a file in a temporary directory, which also receives transformix's
    deformation field (it would otherwise write into the current directory)."""
    try:
        import itk
    except ImportError:
        raise InputError("elastix",
                         "itk-elastix is not installed; pip install 'napari-bci[elastix]'") from None
    fixed = itk.GetImageFromArray(np.ascontiguousarray(fixed_od, dtype=np.float32))
    moving = itk.GetImageFromArray(np.ascontiguousarray(moving_od, dtype=np.float32))
    po = itk.ParameterObject.New()
    for kind in ("affine", "bspline"):
        p = po.GetDefaultParameterMap(kind, resolutions)
        p["MaximumNumberOfIterations"] = [str(iterations)]
        p["RandomSeed"] = [str(int(seed))]  # repeatable random sampler
        p["NumberOfSpatialSamples"] = ["4096"]
        if kind == "bspline":
            p["FinalGridSpacingInPhysicalUnits"] = [str(float(grid_spacing))]
        p["WriteResultImage"] = ["false"]
        po.AddParameterMap(p)
    with tempfile.TemporaryDirectory(prefix="napari-bci-elastix-") as tmp:
        _, params = itk.elastix_registration_method(
            fixed, moving, parameter_object=po, log_to_console=False, log_to_file=True,
            log_file_name="elastix.log", output_directory=tmp,
        )
        field = itk.transformix_deformation_field(moving, params, output_directory=tmp, log_to_console=False)
        d = np.asarray(itk.GetArrayFromImage(field), dtype=np.float32)  # (H, W, 2) as (dx, dy)
    # elastix maps fixed p to moving p + d(p): exactly the flow convention here
    return np.stack([d[..., 1], d[..., 0]], 0)


def residual_flow(fixed_od, moving_od, engine: str = "flow", **kw) -> np.ndarray:
    if engine == "flow":
        return flow_ilk(fixed_od, moving_od, **kw)
    if engine == "elastix":
        return flow_elastix(fixed_od, moving_od, **kw)
    raise InputError("engine", f"unknown deformable engine {engine!r}; choose one of {', '.join(ENGINES)}")


def field_grid(fixed_shape0: tuple[int, int], spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 ``(x, y)`` positions of a field covering the fixed level 0: ``(gh, gw)`` arrays."""
    gh = int(np.ceil((fixed_shape0[0] - 1) / spacing)) + 1
    gw = int(np.ceil((fixed_shape0[1] - 1) / spacing)) + 1
    ys, xs = np.mgrid[0:gh, 0:gw].astype(np.float64) * spacing
    return xs, ys


def sample_flow(v: np.ndarray, xs0: np.ndarray, ys0: np.ndarray, ds: float, origin=(0, 0)) -> np.ndarray:
    """Level-0 displacement ``(..., 2)`` (dx, dy) at level-0 points from a level-``ds`` flow
    ``(2, h, w)`` whose pixel (0, 0) is level-``ds`` pixel ``origin`` (row, col)."""
    r = (ys0 + 0.5) / ds - 0.5 - origin[0]
    c = (xs0 + 0.5) / ds - 0.5 - origin[1]
    out = [ndi.map_coordinates(v[k], [r, c], order=1, mode="nearest") * ds for k in (1, 0)]
    return np.stack(out, -1)


def compose_field(transform: Transform, residual0: np.ndarray, spacing: float,
                  meta: dict | None = None) -> Transform:
    """New transform whose backward map is ``old.backward(p + V(p))`` for the residual level-0
    field ``V`` sampled on the grid with ``spacing`` (shape ``(gh, gw, 2)``)."""
    gh, gw = residual0.shape[:2]
    ys, xs = np.mgrid[0:gh, 0:gw].astype(np.float64) * spacing
    p = np.stack([xs.ravel(), ys.ravel()], 1)
    v = residual0.reshape(-1, 2).astype(np.float64)
    u = v + transform.displacement(p + v)
    m = dict(transform.meta)
    m.update(meta or {})
    return Transform(transform.matrix.copy(), u.reshape(gh, gw, 2).astype(np.float32), float(spacing), m)


def rebase_field(transform: Transform, matrix: np.ndarray) -> Transform:
    """The same map as ``transform`` (matrix + field), its field re-expressed as the residual on
    top of another moving -> fixed ``matrix`` (sampled on the same grid)."""
    gh, gw = transform.field.shape[:2]
    ys, xs = np.mgrid[0:gh, 0:gw].astype(np.float64) * transform.spacing
    p = np.stack([xs.ravel(), ys.ravel()], 1)
    u = apply_matrix(matrix, transform.backward(p)) - p
    return Transform(np.asarray(matrix, np.float64), u.reshape(gh, gw, 2).astype(np.float32), transform.spacing,
                     dict(transform.meta))


def mean_field(a: Transform, b: Transform) -> Transform:
    """The mean of two fields on top of the same matrix and grid (unfolded), ``a``'s metadata."""
    if a.field is None or b.field is None or a.field.shape != b.field.shape or a.spacing != b.spacing \
            or not np.allclose(a.matrix, b.matrix):
        raise ValueError("mean_field needs two fields on the same matrix and grid")
    return unfold(Transform(a.matrix, (a.field + b.field) / 2, a.spacing, dict(a.meta)))


def unfold(transform: Transform, max_iter: int = 200) -> Transform:
    """Remove folds (Jacobian determinant <= 0) by smoothing the field locally around them."""
    from .quality import jacobian_determinant

    if transform.field is None:
        return transform
    u = transform.field.astype(np.float64)
    for _ in range(max_iter):
        j = jacobian_determinant(Transform(transform.matrix, u, transform.spacing))
        bad = j <= 0.05
        if not bad.any():
            break
        near = ndi.binary_dilation(bad, iterations=2)
        sm = np.stack([ndi.gaussian_filter(u[..., k], 1.0, mode="nearest") for k in (0, 1)], -1)
        u[near] = sm[near]
    transform.field = u.astype(np.float32)
    return transform


def _parts(n: int, part: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(window start, window end, core start, core end) along one axis."""
    out = []
    for c0 in range(0, n, part):
        c1 = min(c0 + part, n)
        if out and c1 - c0 < part // 4:  # merge a thin remainder into the previous part
            w0, _, k0, _ = out.pop()
            out.append((w0, n, k0, n))
            break
        out.append((max(c0 - overlap, 0), min(c1 + overlap, n), c0, c1))
    return out


def _ramp(x: np.ndarray, w0: int, w1: int, n: int, overlap: int) -> np.ndarray:
    """Feathering weight in a part window along one axis (flat at the image borders)."""
    if overlap <= 0:
        return np.ones_like(x)
    lo = np.ones_like(x) if w0 == 0 else np.clip((x - w0 + 0.5) / (2 * overlap), 0, 1)
    hi = np.ones_like(x) if w1 == n else np.clip((w1 - 0.5 - x) / (2 * overlap), 0, 1)
    return np.minimum(lo, hi) + 1e-6


def register_deformable(
    fixed: Any,
    moving: Any,
    initial: Transform,
    engine: str = "flow",
    max_side: int = 4096,
    part: int = PART,
    overlap: int = OVERLAP,
    spacing: float | None = None,
    structure: float = 0.0,
    progress: Callable[[str, float], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    **engine_kw,
) -> Transform:
    """Refine ``initial`` (moving -> fixed) with a dense smooth field.

    Works at the finest fixed pyramid level whose longer side is <= ``max_side`` (smaller images:
    level 0), in parts of ``part`` px with ``overlap`` (as BCI did for whole slides, in 16 parts);
    each part reads only its fixed window and the moving region that maps into it. The per-part
    residual flows are feather-blended into one low-resolution field (every ``spacing`` level-0
    px, default 4 px of the working level) and composed with ``initial``. ``structure`` > 0: the
    flow follows tissue structure rather than individual cells (consecutive sections): both
    images' ranked hematoxylin (:func:`ranked_hematoxylin`; ranked rather than
    percentile-normalised, since an IHC's counterstain takes a different contrast curve than an
    H&E's) and, for the flow engine, their ranked total density (:func:`ranked_density`), each
    smoothed by that many working-level px; the flow engine fuses the two contrasts' flows and
    ignores what only one section has (:func:`shared_tissue_weight`)."""
    from ..errors import Cancelled

    pf, pm = as_pyramid(fixed), as_pyramid(moving)
    say = progress or (lambda msg, frac: None)
    li = pf.level_for(max_side)
    flevel, dsf = pf.level(li), pf.downsamples[li]
    mi = pm.nearest_level(dsf)
    mlevel, dsm = pm.level(mi), pm.downsamples[mi]
    # one OD normalisation for all parts, from low-resolution copies
    fr = od_range(pf.image_at(1024)[0])
    mr = od_range(pm.image_at(1024)[0])
    spacing = float(spacing or 4 * dsf)
    xs, ys = field_grid(pf.shape, spacing)
    rr = (ys + 0.5) / dsf - 0.5  # grid positions in working-level pixels
    cc = (xs + 0.5) / dsf - 0.5
    num = np.zeros(xs.shape + (2,), np.float64)
    den = np.zeros(xs.shape, np.float64)
    H, W = int(flevel.shape[0]), int(flevel.shape[1])
    rows, cols = _parts(H, part, overlap), _parts(W, part, overlap)
    n_parts, k = len(rows) * len(cols), 0
    for r0, r1, _, _ in rows:
        for c0, c1, _, _ in cols:
            if cancelled is not None and cancelled():
                raise Cancelled("registration cancelled")
            say(f"{engine}: part {k + 1}/{n_parts}", k / n_parts)
            fimg = np.asarray(flevel[r0:r1, c0:c1])
            warped, valid = warp_region(mlevel, initial, (r0, c0), (r1 - r0, c1 - c0), dsf, dsm,
                                        fill="mirror", return_valid=True)
            kw = dict(engine_kw)
            if structure > 0:
                # the flow engine follows two contrasts (docs/registration.md); elastix, hematoxylin
                contrasts = (ranked_hematoxylin, ranked_density) if engine == "flow" else (ranked_hematoxylin,)
                a, b = (np.stack([ndi.gaussian_filter(c(x), structure) for c in contrasts]) for x in (fimg, warped))
                if engine == "flow":
                    kw["weight"] = shared_tissue_weight(fimg, warped, valid, structure, kw.get("radius", 15))
                else:
                    a, b = a[0], b[0]
            else:
                a, b = od_channel(fimg, value_range=fr), od_channel(warped, value_range=mr)
            v = residual_flow(a, b, engine, **kw)
            sel = (rr >= r0 - 0.5) & (rr <= r1 - 0.5) & (cc >= c0 - 0.5) & (cc <= c1 - 0.5)
            if sel.any():
                w = _ramp(rr[sel], r0, r1, H, overlap) * _ramp(cc[sel], c0, c1, W, overlap)
                num[sel] += w[:, None] * sample_flow(v, xs[sel], ys[sel], dsf, origin=(r0, c0))
                den[sel] += w
            k += 1
    v0 = np.where(den[..., None] > 0, num / np.maximum(den, 1e-12)[..., None], 0.0)
    say("compose", 0.99)
    out = unfold(compose_field(initial, v0, spacing, {"deformable": engine, "deformable_downsample": dsf,
                                                      "parts": n_parts}))
    say("done", 1.0)
    return out
