"""Automatic registration: the stain-invariant intensity search of :mod:`.intensity` (works on
real consecutive sections), SIFT/ORB features on hematoxylin with RANSAC where that is not
confident (both orientations), and, where both images share their cells, a dense-flow polish kept
only where it does not lower the score; where they do not (consecutive sections), a projective fit
to the tissue-structure field."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import BCIError
from ..transform import Transform, apply_matrix
from .deformable import MAX_STRUCTURE_SHIFT, OVERLAP, PART, register_deformable, structure_kw
from .images import as_pyramid, matrix_to_level, matrix_to_level0, od_channel, tissue_mask
from .warp import warp


class RegistrationFailed(BCIError):
    """The images could not be aligned automatically; the message says what to try, ``rule``
    which check refused them (:data:`RULES`)."""

    exit_code = 2

    def __init__(self, message: str, rule: str, image: str | None = None, figures: dict | None = None):
        if rule not in RULES:
            raise ValueError(f"unknown refusal rule {rule!r}")
        #: ``"fixed"`` or ``"moving"`` where one image alone is the problem
        self.rule, self.image = rule, image
        #: the figures the rule judged (e.g. ``decision``, ``local_shift``)
        self.figures = dict(figures or {})
        super().__init__(message)

    def __reduce__(self):  # a worker process's refusal reaches its caller intact
        return type(self), (str(self), self.rule, self.image, self.figures)


#: the checks that refuse an automatic result (:attr:`RegistrationFailed.rule`), described
RULES = {"tissue": "an image shows no tissue", "decision": "the decision score is too low",
         "ambiguity": "another pose scores about as well", "local": "the alignment does not hold locally"}
#: an image with stain on less than this fraction of its pixels (at 512 px) shows no tissue to align
MIN_TISSUE = 0.01


#: below this decision score (the overlap-weighted correlation of tissue and nucleus density
#: at 512 px plus the tissue's orientation agreement at 256 px) the automatic result is refused;
#: calibrated on real H&E / HER2-IHC sections (docs/registration.md): right poses 0.76-1.25,
#: wrong ones 0.52-0.59 (unrelated patches can pass it: see :data:`MAX_LOCAL_SHIFT`)
MIN_DECISION = 0.65
#: above this median distance of the tissue blocks' best local matches from the alignment (a
#: fraction of the search radius, :func:`~napari_bci.registration.quality.local_agreement`) the
#: automatic result is refused: on real consecutive sections 0.09-0.58 where the tissue is the
#: same; where unrelated tissue passed the decision score, 0.91-1.15 (MIST patches) and, held out,
#: 0.76-1.41 (crops of a real slide); the limit sits midway between 0.58 and 0.76, a false
#: refusal (the user places landmarks) costing less than a silent wrong warp (docs/registration.md)
MAX_LOCAL_SHIFT = 0.67
#: below this score the feature path is tried too (it rescues pairs that share their cells)
CONFIDENT_SCORE = 0.4
#: ranked-hematoxylin NCC at 512 px (the cell scale) from which two images share their cells
#: and the dense-flow polish is tried: 0.8-0.97 on re-stained and synthetic pairs, 0.26-0.40 on
#: real consecutive sections (docs/registration.md)
SHARED_CELLS_NCC = 0.6
#: a projective fit to the structure field that moves tissue by more than this fraction of the
#: diagonal is not kept (the field's own cap, docs/registration.md)
MAX_POLISH_SHIFT = MAX_STRUCTURE_SHIFT
#: the projective fit to the structure field leaves out the points within this many px of the
#: 512-px level's frame edges, in either image (64 level-0 px on a 1024 px pair), where the field
#: has least to go on (docs/registration.md), unless fewer than :data:`POLISH_EDGE_KEEP` of them remain
POLISH_EDGE = 32
POLISH_EDGE_KEEP = 0.3
#: a different pose whose decision score (refined correlation + orientation agreement) is within
#: this margin of the best makes the result ambiguous, and it is refused (calibrated on real sections, docs/registration.md)
AMBIGUITY_MARGIN = 0.02


@dataclass
class AutoResult:
    transform: Transform
    inliers: int
    matches: int
    flipped: bool
    info: dict = field(default_factory=dict)
    #: for sections that share no cells: the tissue-structure field on top of the accepted pose,
    #: whose projective fit is ``transform``, and the :func:`~.deformable.register_deformable`
    #: arguments it was computed with (the deformable step reuses it)
    structure_field: Transform | None = None
    structure_kw: dict | None = None


def detect(img: np.ndarray, detector: str = "sift", n_keypoints: int = 3000):
    """Keypoints ``(N, 2)`` as (x, y) and descriptors of a 2-D float image."""
    from skimage.feature import ORB, SIFT

    if detector == "sift":
        d = SIFT(upsampling=1, n_octaves=5)
    elif detector == "orb":
        d = ORB(n_keypoints=n_keypoints, fast_threshold=0.05, downscale=1.3, n_scales=10)
    else:
        raise ValueError(f"unknown detector {detector!r} (sift, orb)")
    try:
        d.detect_and_extract(img)
    except RuntimeError:  # ORB raises on images without corners
        return np.zeros((0, 2)), np.zeros((0, 1))
    kp = np.asarray(d.keypoints, dtype=np.float64)[:, ::-1]
    return kp, d.descriptors


def match(kp_m, de_m, kp_f, de_f, detector: str, threshold: float, seed: int = 0):
    """Match descriptors and fit a moving->fixed projective by RANSAC (similarity first, which
    needs fewer samples and is robust, then projective on its inliers). Returns
    ``(matrix, n_inliers, n_matches)``; ``matrix`` is None without a consistent model."""
    from skimage.feature import match_descriptors
    from skimage.measure import ransac
    from skimage.transform import ProjectiveTransform, SimilarityTransform

    if len(kp_m) < 4 or len(kp_f) < 4:
        return None, 0, 0
    metric = "hamming" if detector == "orb" else "euclidean"
    pairs = match_descriptors(de_m, de_f, metric=metric, cross_check=True, max_ratio=0.85)
    if len(pairs) < 4:
        return None, 0, len(pairs)
    src, dst = kp_m[pairs[:, 0]], kp_f[pairs[:, 1]]
    with warnings.catch_warnings():  # "No inliers found" is an outcome here, not a warning
        warnings.simplefilter("ignore")
        sim, inl = ransac((src, dst), SimilarityTransform, min_samples=3, residual_threshold=threshold,
                          max_trials=3000, rng=seed)
    if not sim or inl is None or inl.sum() < 6:
        return None, 0 if inl is None else int(inl.sum()), len(pairs)
    matrix = np.asarray(sim.params)
    if inl.sum() >= 12:
        proj = ProjectiveTransform.from_estimate(src[inl], dst[inl])
        if proj:
            res = np.linalg.norm(apply_matrix(proj.params, src[inl]) - dst[inl], axis=1)
            if np.median(res) <= threshold:
                matrix = np.asarray(proj.params)
    matrix = matrix / matrix[2, 2]
    res = np.linalg.norm(apply_matrix(matrix, src) - dst, axis=1)
    return matrix, int((res < threshold).sum()), len(pairs)


def flip_matrix(width: int) -> np.ndarray:
    """Moving pixels -> pixels of the horizontally flipped moving image (its own inverse)."""
    return np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def coarse_features(fixed_img: np.ndarray, moving_img: np.ndarray, detector: str = "sift",
                    flips: bool = True, threshold: float = 2.5, seed: int = 0):
    """Best moving->fixed matrix between two in-memory RGB images (their own pixel units), trying
    the moving image as is and flipped. Returns ``(matrix, inliers, matches, flipped)``."""
    a = od_channel(fixed_img)
    b = od_channel(moving_img)
    kp_f, de_f = detect(a, detector)
    best = (None, 0, 0, False)
    for flipped in ((False, True) if flips else (False,)):
        img = b[:, ::-1] if flipped else b
        kp_m, de_m = detect(np.ascontiguousarray(img), detector)
        m, ninl, nmatch = match(kp_m, de_m, kp_f, de_f, detector, threshold, seed)
        if m is None:
            continue
        if flipped:
            m = m @ flip_matrix(b.shape[1])
        if ninl > best[1]:
            best = (m, ninl, nmatch, flipped)
    return best


def refine_projective(fixed_img: np.ndarray, moving_img: np.ndarray, matrix: np.ndarray,
                      radius: int = 15, step: int = 4, threshold: float = 1.5,
                      seed: int = 0) -> tuple[np.ndarray, float]:
    """Refine a moving->fixed matrix (pixels of these images) with dense optical flow on the
    hematoxylin channel: the flow gives one correspondence per tissue pixel, and a projective is
    re-fitted to them by RANSAC. Returns ``(matrix, median residual px)``."""
    from skimage.registration import optical_flow_ilk

    t = Transform(matrix)
    warped = warp(moving_img, t, fixed_img.shape[:2], fill="constant")
    a, b = od_channel(fixed_img), od_channel(warped)
    v = optical_flow_ilk(a, b, radius=radius, num_warp=3)
    ys, xs = np.mgrid[0 : a.shape[0] : step, 0 : a.shape[1] : step]
    tissue = tissue_mask(fixed_img)[ys, xs] & tissue_mask(warped)[ys, xs]
    inside = t.backward(np.stack([xs.ravel(), ys.ravel()], 1).astype(float))
    h, w = moving_img.shape[:2]
    ok = tissue.ravel() & (inside[:, 0] > radius) & (inside[:, 1] > radius) & (inside[:, 0] < w - radius) & (
        inside[:, 1] < h - radius)
    if ok.sum() < 50:
        return matrix, float("nan")
    pf = np.stack([xs.ravel(), ys.ravel()], 1)[ok].astype(float)
    vv = np.stack([v[1][ys, xs].ravel(), v[0][ys, xs].ravel()], 1)[ok]
    pm = t.backward(pf + vv)
    m = robust_projective(pm, pf, threshold, seed)
    if m is None:
        return matrix, float("nan")
    res = np.linalg.norm(apply_matrix(m, pm) - pf, axis=1)
    return m, float(np.median(res))


def _normaliser(p: np.ndarray) -> np.ndarray:
    c = p.mean(0)
    s = np.sqrt(2) / max(np.mean(np.linalg.norm(p - c, axis=1)), 1e-12)
    return np.array([[s, 0, -s * c[0]], [0, s, -s * c[1]], [0, 0, 1.0]])


def dlt_projective(src: np.ndarray, dst: np.ndarray) -> np.ndarray | None:
    """Least-squares projective matrix (normalised DLT) for many point pairs; None if degenerate.
    (skimage's estimator takes a full SVD of a 2N x 9 matrix, which is slow for thousands of pairs.)"""
    ns, nd = _normaliser(src), _normaliser(dst)
    a = apply_matrix(ns, src)
    b = apply_matrix(nd, dst)
    x, y, u, v = a[:, 0], a[:, 1], b[:, 0], b[:, 1]
    o, z = np.ones_like(x), np.zeros_like(x)
    rows = np.concatenate([
        np.stack([x, y, o, z, z, z, -u * x, -u * y, -u], 1),
        np.stack([z, z, z, x, y, o, -v * x, -v * y, -v], 1),
    ])
    _, sv, vt = np.linalg.svd(rows.T @ rows)
    h = vt[-1].reshape(3, 3)
    m = np.linalg.inv(nd) @ h @ ns
    if not np.isfinite(m).all() or abs(m[2, 2]) < 1e-12:
        return None
    m = m / m[2, 2]
    if abs(np.linalg.det(m)) < 1e-12:
        return None
    return m


def robust_projective(src: np.ndarray, dst: np.ndarray, threshold: float = 1.5, seed: int = 0,
                      max_points: int = 3000) -> np.ndarray | None:
    """Projective fit to many, mostly correct correspondences: least squares, then refits without
    the pairs whose residual exceeds ``max(threshold, 3 x median)``."""
    if len(src) > max_points:
        sel = np.random.default_rng(seed).choice(len(src), max_points, replace=False)
        src, dst = src[sel], dst[sel]
    keep = np.ones(len(src), bool)
    m = None
    for _ in range(4):
        if keep.sum() < 20:
            return m
        est = dlt_projective(src[keep], dst[keep])
        if est is None:
            return m
        m = est
        res = np.linalg.norm(apply_matrix(m, src) - dst, axis=1)
        keep = res <= max(threshold, 3 * float(np.median(res[keep])))
    return m


def _features(pf, pm, detector, coarse_side, refine_side, flips, seed):
    """Level-0 matrix from feature matching (None when no consistent match)."""
    for side in (coarse_side, 2 * coarse_side):
        fimg, dsf = pf.image_at(side)
        mimg, dsm = pm.image_at(side)
        m, ninl, nmatch, flipped = coarse_features(fimg, mimg, detector, flips, seed=seed)
        if m is None and detector == "sift":
            m, ninl, nmatch, flipped = coarse_features(fimg, mimg, "orb", flips, seed=seed)
        if (m is not None and ninl >= 20) or max(pf.shape) <= side or side >= refine_side:
            break
    if m is None:
        return None, ninl, nmatch, False
    return matrix_to_level0(m, dsm, dsf), ninl, nmatch, bool(flipped)


def _flow_polish(pf, pm, m0, refine_side, seed, info):
    """Dense-flow projective refinement (precise where both images share their structure; the
    deformable step refines further, so at most 512 px for images up to 2048 px)."""
    if max(pf.shape) <= 2048:
        refine_side = min(refine_side, 512)
    fimg2, dsf2 = pf.image_at(refine_side)
    mimg2, dsm2 = pm.image_at(refine_side)
    mk2, res = refine_projective(fimg2, mimg2, matrix_to_level(m0, dsm2, dsf2), seed=seed)
    if np.isfinite(res):
        m0 = matrix_to_level0(mk2, dsm2, dsf2)
        info["refine_residual_px"] = res * dsf2
    return m0


def edge_distance(xy: np.ndarray, shape) -> np.ndarray:
    """Distance (px) of each ``(x, y)`` point to the nearest edge of a frame of ``shape``."""
    h, w = shape[:2]
    return np.minimum.reduce([xy[:, 0], xy[:, 1], w - 1 - xy[:, 0], h - 1 - xy[:, 1]])


def away_from_edges(ok: np.ndarray, fixed_xy: np.ndarray, fixed_shape, moving_xy: np.ndarray,
                    moving_shape, edge: float = POLISH_EDGE) -> np.ndarray:
    """``ok`` less the point pairs within ``edge`` px of either frame's edge, unless fewer than
    :data:`POLISH_EDGE_KEEP` of the ``ok`` ones (or 20) would remain."""
    inner = ok & (np.minimum(edge_distance(fixed_xy, fixed_shape), edge_distance(moving_xy, moving_shape)) >= edge)
    return inner if inner.sum() >= max(20, POLISH_EDGE_KEEP * ok.sum()) else ok


def _structure_polish(pf, pm, m0, info, progress=None) -> tuple[np.ndarray, np.ndarray, Transform, dict]:
    """Projective fit to the structure-following field (:func:`~.deformable.structure_kw`) on
    top of ``m0``, for sections that share no cells: the ECC climb on smooth density maps is
    flat over 5-20 px there, while the field, fitted over the tissue away from the frames'
    edges (:data:`POLISH_EDGE`), is not (docs/registration.md). ``m0`` is kept where the fit fails or moves tissue by over
    :data:`MAX_POLISH_SHIFT` of the diagonal. Returns the pose, the pose that the local check
    judges (the fit to all the points, on which that check was calibrated, docs/registration.md),
    the field and its arguments."""
    from .intensity import pose_distance

    kw = structure_kw(pf.shape, part=PART, overlap=OVERLAP)
    td = register_deformable(pf, pm, Transform(m0), progress=progress, **kw)
    fimg, dsf = pf.image_at(512)
    ys, xs = np.mgrid[4 : fimg.shape[0] : 8, 4 : fimg.shape[1] : 8]
    keep = tissue_mask(fimg)[ys, xs]
    grid = np.stack([xs[keep], ys[keep]], 1).astype(float)  # fixed px of the 512-px level
    pts = (grid + 0.5) * dsf - 0.5  # level-0 fixed px
    back = td.backward(pts)
    mimg, dsm = pm.image_at(512)
    mxy = (back + 0.5) / dsm - 0.5  # moving px of its 512-px level
    q = np.rint(mxy).astype(int)
    ok = (q >= 0).all(1) & (q[:, 0] < mimg.shape[1]) & (q[:, 1] < mimg.shape[0])
    ok[ok] = tissue_mask(mimg)[q[ok, 1], q[ok, 0]]  # tissue on both sides
    inner = away_from_edges(ok, grid, fimg.shape, mxy, mimg.shape)
    mp = robust_projective(back[inner], pts[inner], threshold=3.0) if inner.sum() >= 20 else None
    if mp is None:
        return m0, m0, td, kw
    moved = pose_distance(pf, m0, mp)
    limit = MAX_POLISH_SHIFT * float(np.hypot(*pf.shape))
    if moved > limit:
        info["structure_polish_rejected"] = (
            f"the fit moves tissue by {moved:.0f} px (over {limit:.0f} px, {100 * MAX_POLISH_SHIFT:g} % of the diagonal)")
        return m0, m0, td, kw
    info["structure_polish_px"] = round(moved, 2)
    judged = mp if inner is ok else robust_projective(back[ok], pts[ok], threshold=3.0)
    if judged is None:
        judged = mp
    elif pose_distance(pf, m0, judged) > limit:  # that fit alone would not have been kept
        judged = m0
    return mp, judged, td, kw


def register_auto(
    fixed: Any,
    moving: Any,
    detector: str = "sift",
    coarse_side: int = 384,
    refine_side: int = 1024,
    flips: bool = True,
    seed: int = 0,
    progress: Callable[[str, float], None] | None = None,
    min_decision: float = MIN_DECISION,
) -> AutoResult:
    """Align ``moving`` (H&E) onto ``fixed`` (IHC) with no user input; any rotation and flips.

    ``fixed``/``moving``: an RGB array, a list of pyramid levels (level 0 first), or an object with
    ``.levels``. First the intensity search on stain-invariant channels
    (:func:`~napari_bci.registration.intensity.register_intensity`); where its score is below
    :data:`CONFIDENT_SCORE`, also features (matched at longer side <= ``coarse_side``), and the
    better of the two by the decision score (that correlation plus the tissue's orientation
    agreement); then, where the images share their cells (:data:`SHARED_CELLS_NCC`), a dense-flow
    projective polish at longer side <= ``refine_side``, kept only if the score does not drop;
    where they do not, once accepted, the projective fit to the
    tissue-structure field (:func:`_structure_polish`), returned as ``structure_field`` too.
    Raises :class:`RegistrationFailed` when an image shows no tissue (:data:`MIN_TISSUE`), when
    the final decision score is below ``min_decision``,
    when the result does not hold locally (:data:`MAX_LOCAL_SHIFT`),
    or when the intensity result is ambiguous (a pose elsewhere has a decision score within
    :data:`AMBIGUITY_MARGIN` of it).
    """
    from .intensity import invariant_scores, register_intensity
    from .quality import image_similarity, local_agreement

    pf, pm = as_pyramid(fixed), as_pyramid(moving)
    for which, stain, p in (("fixed", "IHC", pf), ("moving", "H&E", pm)):
        frac = float(tissue_mask(p.image_at(512)[0]).mean())
        if frac < MIN_TISSUE:
            raise RegistrationFailed(
                f"registration failed: the {which} image ({stain}) shows no tissue (stain on "
                f"{100 * frac:.2f} % of it, under {100 * MIN_TISSUE:g} %): is it the right file or region?",
                rule="tissue", image=which)
    say = progress or (lambda msg, frac: None)
    r = register_intensity(pf, pm, flips=flips, seed=seed, progress=lambda m, f: say(m, 0.6 * f))
    m0, score, flipped, how = r.matrix, r.score, r.candidate.flipped, "intensity"
    info = dict(r.info)
    orient = info["orientation"]
    ninl = nmatch = 0
    if score < CONFIDENT_SCORE:
        say("features", 0.6)
        mf, ninl, nmatch, ff = _features(pf, pm, detector, coarse_side, refine_side, flips, seed)
        if mf is not None:
            sf, of = invariant_scores(pf, pm, mf)
            info["feature_score"], info["feature_orientation"] = sf, of
            if sf + of > score + orient:
                m0, score, orient, flipped, how = mf, sf, of, ff, "features"
    # the flow polish tracks cells: only where both images share them (re-stained, synthetic)
    info["cell_ncc"] = image_similarity(pf, pm, Transform(m0), 512)["ncc"]
    if info["cell_ncc"] >= SHARED_CELLS_NCC:
        say("refine", 0.8)
        mp = _flow_polish(pf, pm, m0, refine_side, seed, info)
        sp, op = invariant_scores(pf, pm, mp)
        info["polish_score"] = sp
        if sp >= score - 0.005:  # the polish optimises another criterion; keep it unless it is worse
            m0, score, orient = mp, max(sp, score), op
    info["score"], info["orientation"] = score, orient
    decision = score + orient
    if not decision >= min_decision:
        raise RegistrationFailed(
            f"registration failed: the best alignment found matches tissue, nuclei and tissue orientation "
            f"poorly (decision score {decision:.2f} = {score:.2f} + {orient:.2f} < {min_decision:.2f}; are "
            "these sections of the same tissue?) (try landmarks: place >= 4 point pairs on both images)",
            rule="decision", figures={"decision": float(decision)})
    ru = info.get("runner_up_decision")
    if how == "intensity" and ru is not None and ru >= info["decision"] - AMBIGUITY_MARGIN:
        raise RegistrationFailed(
            f"registration failed: two alignments {info['runner_up_px']:.0f} px apart match tissue, "
            f"nuclei and tissue orientation about equally well (decision scores {info['decision']:.2f} and "
            f"{ru:.2f}); the sections share too little structure to choose (try landmarks: place >= 4 "
            "point pairs on both images)", rule="ambiguity",
            figures={"decision": float(info["decision"]), "runner_up_decision": float(ru)})
    if info["cell_ncc"] < SHARED_CELLS_NCC:
        # accepted by the figures above; the fit to the tissue's structure sets the final pose
        say("refine (tissue structure)", 0.9)
        m0, judged, field0, field_kw = _structure_polish(
            pf, pm, m0, info, progress=lambda m, f: say(f"refine (tissue structure): {m}", 0.9 + 0.09 * f))
    else:
        judged, field0, field_kw = m0, None, None
    # tissue that only looks alike as a whole can pass the decision score; the same tissue also
    # agrees block by block
    say("local check", 0.99)
    local = local_agreement(pf, pm, Transform(judged))
    info.update(local)
    if local["local_shift"] is not None and local["local_shift"] > MAX_LOCAL_SHIFT:
        raise RegistrationFailed(
            f"registration failed: the alignment does not hold locally: in {local['local_blocks']} tissue blocks the "
            f"best local match lies a median {local['local_shift_px']:.0f} px from it ({local['local_shift']:.2f} of "
            f"the radius searched, over {MAX_LOCAL_SHIFT:.2f}), as between tissues that only look alike as a whole; "
            "are these sections of the same tissue? (try landmarks: place >= 4 point pairs on both images)",
            rule="local", figures={"decision": float(decision), "local_shift": float(local["local_shift"])})
    say("done", 1.0)
    meta = {"method": "auto", "start": how, "score": round(float(score), 4),
            "orientation": round(float(orient), 4), "decision": round(float(decision), 4), "inliers": ninl,
            "matches": nmatch, "flipped": bool(flipped)}
    return AutoResult(Transform(m0 / m0[2, 2], meta=meta), ninl, nmatch, bool(flipped), info, field0, field_kw)
