"""Cross-stain automatic registration on stain-invariant channels (see docs/registration.md).

Consecutive H&E and HER2-IHC sections do not share cells or colours, so keypoints rarely match.
What both keep is the tissue layout: where tissue is and is not (lumens, fat, tears), and where
nuclei are dense (tumour nests against stroma). This module works on those channels
(:class:`SearchChannels`):

1. :func:`global_search`: at low resolution (longer side 64 px), every rotation (12 degree
   steps), both orientations (flip) and scales 0.5-2, each with its two best translations found
   at once by FFT masked normalised cross-correlation (Padfield, IEEE TIP 2012), the best ranked
   by correlation + the tissue's :func:`orientation_agreement`;
2. :func:`local_search` and :func:`ecc_refine` of several candidates: the pose is refined by
   maximising the correlation coefficient (ECC, Evangelidis & Psarakis, PAMI 2008) over an
   affine map, and the best refined candidates over a projective map, coarse to fine, each climb
   judged by correlation + orientation agreement (the decision score).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy import ndimage as ndi

from ..stain import hematoxylin, rgb_to_od


def _rank(a: np.ndarray) -> np.ndarray:
    """Values replaced by their quantile in ``[0, 1]`` (removes each stain's contrast curve);
    equal values share one rank, so a blank image stays blank."""
    flat = a.ravel()
    r = np.searchsorted(np.sort(flat), flat, side="left").astype(np.float32)
    return (r / max(flat.size - 1, 1)).reshape(a.shape)


def ranked_hematoxylin(rgb: np.ndarray) -> np.ndarray:
    """The hematoxylin optical density of ``rgb`` replaced by its rank in ``[0, 1]``: comparable
    between an H&E and an IHC whatever each one's counterstain strength and contrast curve."""
    return _rank(hematoxylin(np.asarray(rgb)[..., :3]))


def ranked_density(rgb: np.ndarray) -> np.ndarray:
    """The total optical density of ``rgb`` replaced by its rank in ``[0, 1]``: the tissue's
    structure in both stains (stroma bands, nests, lumens), whatever the stains' colours."""
    return _rank(rgb_to_od(np.asarray(rgb)[..., :3]).sum(-1))


def tissue_threshold(od_sum: np.ndarray) -> float:
    """Total-OD threshold between glass and tissue: Otsu's, at most 0.25 (an image that is all
    tissue has no glass mode, and Otsu would split stroma from nuclei)."""
    from skimage.filters import threshold_otsu

    return float(min(threshold_otsu(od_sum), 0.25)) if np.ptp(od_sum) > 1e-6 else 0.25


def invariant_channels(rgb: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """``(2, H, W)`` float32: the tissue mask and the rank-normalised hematoxylin optical density,
    both smoothed by ``sigma`` px. Unlike colour, grey level or DAB, these are comparable between
    an H&E and an IHC section: glass, lumens and fat have no tissue in either, and nuclei take
    hematoxylin in both (ranking removes the difference in counterstain strength)."""
    rgb = np.asarray(rgb)[..., :3]
    od = rgb_to_od(rgb).sum(-1)
    tissue = (od > tissue_threshold(od)).astype(np.float32)
    hema = ranked_hematoxylin(rgb)
    out = np.stack([tissue, hema])
    if sigma > 0:
        out = np.stack([ndi.gaussian_filter(c, sigma) for c in out])
    return out.astype(np.float32)


class SearchChannels:
    """The channels the automatic step aligns, for one pyramid: the tissue mask and the **nucleus
    density**, computed once from the image of longer side ``base_side`` and block-averaged to
    any coarser size by :meth:`at`.

    The nucleus density is the positive part of a band-pass (difference of Gaussians at the
    nucleus scale) of the hematoxylin optical density, smoothed and ranked. Unlike the
    hematoxylin level itself, it does not depend on how much counterstain the stroma takes up:
    an IHC's bluish stroma is as dark in hematoxylin as an H&E's tumour nests, but only the nests
    are dense with nuclei in both. ``nucleus_scale``: the size of a nucleus in base pixels
    relative to a 512-px base (the sigmas below are multiplied by it)."""

    #: difference-of-Gaussians sigmas and density smoothing, px of a 512-px base image
    DOG = (1.0, 3.0)
    DENSITY_SIGMA = 8.0

    def __init__(self, pyramid, base_side: int = 512, nucleus_scale: float = 1.0):
        img, self.downsample = pyramid.image_at(base_side)
        img = np.asarray(img)[..., :3]
        od = rgb_to_od(img).sum(-1)
        self.tissue = (od > tissue_threshold(od)).astype(np.float32)
        self.od = od.astype(np.float32)
        h = hematoxylin(img).astype(np.float32)
        s1, s2 = (s * nucleus_scale for s in self.DOG)
        self.nuclei = np.maximum(ndi.gaussian_filter(h, s1) - ndi.gaussian_filter(h, s2), 0)
        self.nucleus_scale = nucleus_scale

    def at(self, factor: int, sigma: float) -> tuple[np.ndarray, float]:
        """``(2, h, w)`` channels block-averaged by ``factor``, smoothed by ``sigma`` px, and
        their downsample factor relative to level 0."""
        from .images import downscale

        sigma_d = max(self.DENSITY_SIGMA * self.nucleus_scale / factor, 1.0)
        d = ndi.gaussian_filter(downscale(self.nuclei, factor), sigma_d)
        out = np.stack([ndi.gaussian_filter(c, sigma) for c in (downscale(self.tissue, factor), _rank(d))])
        return out.astype(np.float32), self.downsample * factor

    def od_at(self, factor: int) -> np.ndarray:
        """The total optical density block-averaged by ``factor``."""
        from .images import downscale

        return downscale(self.od, factor)


# --------------------------------------------------------------------------- orientation
#: gradient and structure-tensor sigmas (px of the 256-px level) of :func:`orientation_field`
ORIENT_SIGMAS = (2.0, 8.0)


def orientation_field(od: np.ndarray, sigmas=ORIENT_SIGMAS) -> np.ndarray:
    """``(2, H, W)``: the local orientation of the total optical density as the double-angle
    vector of its structure tensor, ``(Jxx - Jyy, 2 Jxy)``, long where the texture is strongly
    oriented. A direction, not a contrast: collagen fibres, tissue edges, lumens and fat run the
    same way in an H&E and an IHC of the next section whatever their colours, and it is the same
    for dark-on-light and light-on-dark."""
    sg, rho = sigmas
    gy = ndi.gaussian_filter(od, sg, order=(1, 0))
    gx = ndi.gaussian_filter(od, sg, order=(0, 1))
    jxx, jyy, jxy = (ndi.gaussian_filter(a, rho) for a in (gx * gx, gy * gy, gx * gy))
    return np.stack([jxx - jyy, 2 * jxy]).astype(np.float32)


def orientation_agreement(fixed_od: np.ndarray, moving_od: np.ndarray, matrix: np.ndarray | None,
                          fixed_field: np.ndarray | None = None, valid: np.ndarray | None = None,
                          sigmas=ORIENT_SIGMAS) -> float:
    """How well the tissue's local orientation agrees after a moving -> fixed ``matrix`` (pixels
    of these images; None: ``moving_od`` is already in the fixed frame, with data where
    ``valid``): the correlation of the two :func:`orientation_field` s over the overlap (the
    moving one computed after warping, so in the fixed frame), times the root of the overlap's
    fraction as in :func:`ecc_refine`. About 0 for unrelated poses; it tells apart poses whose
    tissue and nucleus maps fit about equally well, such as a mirrored one. ``sigmas``: those of
    :func:`orientation_field` (:data:`ORIENT_SIGMAS` at 256 px; scale them with the image)."""
    vf = orientation_field(fixed_od, sigmas) if fixed_field is None else fixed_field
    if matrix is None:
        warped = np.where(valid, moving_od, 0.0) if valid is not None else moving_od
        valid = np.ones(fixed_od.shape, bool) if valid is None else valid
    else:
        warped, valid = _warp_channels(moving_od[None], matrix, fixed_od.shape)
        warped = warped[0]
    vm = orientation_field(warped, sigmas)
    # the moving field is undefined near the edge of its data (the tensor sees the cut)
    keep = ndi.binary_erosion(valid, iterations=int(np.ceil(3 * sum(sigmas) / 2)))
    if keep.sum() < 64:
        return 0.0
    a, b = vf[:, keep], vm[:, keep]
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den * np.sqrt(keep.mean())) if den > 0 else 0.0


# --------------------------------------------------------------------------- global search
def _fft_shape(n: int) -> int:
    from scipy.fft import next_fast_len

    return next_fast_len(int(n), real=True)


@dataclass
class Candidate:
    matrix: np.ndarray  # moving -> fixed, pixels of the search images
    score: float
    angle: float
    scale: float
    flipped: bool


def similarity_matrix(angle_deg: float, scale: float, flipped: bool, centre_m, centre_f) -> np.ndarray:
    """Moving -> fixed: flip (about x = centre), rotate and scale about the moving centre, and
    place that centre at ``centre_f``."""
    t = np.radians(angle_deg)
    c, s = np.cos(t) * scale, np.sin(t) * scale
    f = -1.0 if flipped else 1.0
    a = np.array([[c * f, -s, 0.0], [s * f, c, 0.0], [0.0, 0.0, 1.0]])
    to = np.array([[1, 0, -centre_m[0]], [0, 1, -centre_m[1]], [0, 0, 1.0]])
    back = np.array([[1, 0, centre_f[0]], [0, 1, centre_f[1]], [0, 0, 1.0]])
    return back @ a @ to


def _warp_channels(ch: np.ndarray, matrix: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """Channels ``(C, h, w)`` warped by ``matrix`` (moving -> output px) into ``shape``, and the
    mask of output pixels with data."""
    hi = np.linalg.inv(matrix)
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    den = hi[2, 0] * xs + hi[2, 1] * ys + hi[2, 2]
    den = np.where(np.abs(den) < 1e-12, 1e-12, den)
    mx = (hi[0, 0] * xs + hi[0, 1] * ys + hi[0, 2]) / den
    my = (hi[1, 0] * xs + hi[1, 1] * ys + hi[1, 2]) / den
    h, w = ch.shape[1:]
    valid = (mx >= -0.5) & (mx <= w - 0.5) & (my >= -0.5) & (my <= h - 0.5)
    out = np.stack([ndi.map_coordinates(c, [my, mx], order=1, mode="nearest") for c in ch])
    return out * valid, valid


class _MaskedNCC:
    """Masked NCC of fixed channels against moving images for all translations at once."""

    def __init__(self, fixed: np.ndarray, canvas: tuple[int, int]):
        from scipy.fft import rfft2

        self.fh, self.fw = fixed.shape[1:]
        self.ch, self.cw = canvas
        self.shape = (_fft_shape(self.fh + self.ch - 1), _fft_shape(self.fw + self.cw - 1))
        s = self.shape
        self.Mf = rfft2(np.ones((self.fh, self.fw)), s)
        self.F = [rfft2(c, s) for c in fixed]
        self.F2 = [rfft2(c * c, s) for c in fixed]

    def __call__(self, moving: np.ndarray, mask: np.ndarray, min_overlap: float):
        """NCC map (mean over channels) indexed by the shift (row, col) of the moving canvas in
        the fixed frame (negative shifts wrap), and the overlap map in pixels."""
        from scipy.fft import irfft2, rfft2

        s = self.shape
        mg = rfft2(mask.astype(np.float64), s)
        cmg = np.conj(mg)
        n = irfft2(self.Mf * cmg, s)
        n = np.maximum(np.rint(n), 0)
        ok = n >= min_overlap
        nn = np.maximum(n, 1)
        total = np.zeros(s)
        for k, g in enumerate(moving):
            G = np.conj(rfft2(g, s))
            G2 = np.conj(rfft2(g * g, s))
            fg = irfft2(self.F[k] * G, s)
            f1 = irfft2(self.F[k] * cmg, s)
            g1 = irfft2(self.Mf * G, s)
            f2 = irfft2(self.F2[k] * cmg, s)
            g2 = irfft2(self.Mf * G2, s)
            num = fg - f1 * g1 / nn
            vf, vg = f2 - f1 * f1 / nn, g2 - g1 * g1 / nn
            good = ok & (vf > 1e-3 * nn) & (vg > 1e-3 * nn)  # both sides must have contrast there
            total += np.where(good, np.clip(num / np.sqrt(np.maximum(vf * vg, 1e-18)), -1, 1), 0.0)
        return total / len(moving), n


#: scales (moving -> fixed, level 0) of the global search: 0.5-2 in steps of 26 %
SCALES = tuple(np.geomspace(0.5, 2.0, 7))


def search(fixed_ch: np.ndarray, moving_ch: np.ndarray, poses, min_overlap: float = 0.3, peaks: int = 1
           ) -> list[Candidate]:
    """For each ``(angle, scale, flipped)`` pose, the translation with the highest masked NCC of
    the channels' sum, weighted by the square root of the overlap (small overlaps correlate
    highly by chance); overlaps below ``min_overlap`` of the smaller image are not considered.
    Returns ``peaks`` :class:`Candidate` s per pose (the best translations at least a tenth of
    the fixed image apart; matrices in pixels of these images)."""
    fixed_ch, moving_ch = fixed_ch.sum(0, keepdims=True), moving_ch.sum(0, keepdims=True)
    fh, fw = fixed_ch.shape[1:]
    mh, mw = moving_ch.shape[1:]
    cm = np.array([(mw - 1) / 2, (mh - 1) / 2])
    by_scale: dict[float, list] = {}
    for p in poses:
        by_scale.setdefault(float(p[1]), []).append(p)
    found = []
    for scale, group in by_scale.items():  # one canvas (and FFT size) per scale
        side = int(np.ceil(np.hypot(mh, mw) * scale)) + 2
        ncc = _MaskedNCC(fixed_ch, (side, side))
        cc = np.array([(side - 1) / 2, (side - 1) / 2])
        # the shift of each entry of the score map (negative shifts wrap around)
        r, c = np.ogrid[0 : ncc.shape[0], 0 : ncc.shape[1]]
        sy, sx = np.where(r < fh, r, r - ncc.shape[0]), np.where(c < fw, c, c - ncc.shape[1])
        # overlap relative to the geometric mean of the areas, so no scale is favoured
        full = np.sqrt(fh * fw * mh * mw * scale * scale)
        for angle, _, flipped in group:
            m = similarity_matrix(angle, scale, flipped, cm, cc)
            g, valid = _warp_channels(moving_ch, m, (side, side))
            score, n = ncc(g, valid, min_overlap * min(fh * fw, mh * mw * scale * scale))
            score = score * np.sqrt(np.minimum(n / full, 1.0))
            for _ in range(peaks):
                i, j = np.unravel_index(int(np.argmax(score)), score.shape)
                dy, dx = int(sy[i, 0]), int(sx[0, j])
                shift = np.array([[1, 0, dx], [0, 1, dy], [0, 0, 1.0]])
                found.append(Candidate(shift @ m, float(score[i, j]), float(angle) % 360, scale,
                                       bool(flipped)))
                score = np.where(np.hypot(sy - dy, sx - dx) < 0.1 * np.hypot(fh, fw), -np.inf, score)
    return found


def global_search(fixed_ch: np.ndarray, moving_ch: np.ndarray, angle_step: float = 12.0,
                  scales=SCALES, flips: bool = True, keep: int = 6,
                  judge: Callable[[np.ndarray], float] | None = None, judged: int = 64) -> list[Candidate]:
    """:func:`search` over every rotation, ``scales`` and both orientations (two translations
    each, so that a structure found twice shows as two candidates): the ``keep`` best distinct
    candidates, best first (peaks closer than a tenth of the image and 25 degrees count
    as one). With ``judge`` (a candidate's matrix -> a further score), the ``judged`` best by
    correlation are ranked by correlation + judge instead."""
    poses = [(a, s, f) for f in ((False, True) if flips else (False,)) for s in scales
             for a in np.arange(0.0, 360.0, angle_step)]
    found = search(fixed_ch, moving_ch, poses, peaks=2)
    diag = float(np.hypot(*fixed_ch.shape[1:]))
    if judge is None:
        return distinct(found, diag, keep)
    return distinct(sorted(found, key=lambda c: -c.score)[:judged], diag, keep, judge)


def distinct(cands: list[Candidate], diag: float, keep: int,
             judge: Callable[[np.ndarray], float] | None = None) -> list[Candidate]:
    """The ``keep`` best of ``cands`` (by score, or score + ``judge(matrix)``) that are distinct
    poses (translations closer than a tenth of ``diag``, the same orientation and angles within
    25 degrees count as one), best first."""
    value = {id(c): c.score + (judge(c.matrix) if judge is not None else 0.0) for c in cands}
    out: list[Candidate] = []
    for cand in sorted(cands, key=lambda c: -value[id(c)]):
        p = cand.matrix[:2, 2]
        if any(np.linalg.norm(p - o.matrix[:2, 2]) < 0.1 * diag and o.flipped == cand.flipped
               and abs((cand.angle - o.angle + 180) % 360 - 180) < 25 for o in out):
            continue
        out.append(cand)
        if len(out) >= keep:
            break
    return out


def local_search(fixed_ch: np.ndarray, moving_ch: np.ndarray, cand: Candidate, near: np.ndarray | None = None,
                 angle_step: float = 6.0, scale_step: float = 1.12) -> Candidate:
    """The best pose near ``cand`` (angles within ``angle_step`` degrees, scales within a factor
    ``scale_step``: half the steps of :func:`global_search`) that places the moving image's
    centre within a tenth of the fixed image of ``near`` (x, y px of these images), if given."""
    from ..transform import apply_matrix

    poses = [(cand.angle + da, cand.scale * r, cand.flipped)
             for da in (-angle_step, 0.0, angle_step) for r in (1 / scale_step, 1.0, scale_step)]
    found = search(fixed_ch, moving_ch, poses, peaks=1 if near is None else 3)
    if near is not None:
        centre = np.array([[(moving_ch.shape[2] - 1) / 2, (moving_ch.shape[1] - 1) / 2]])
        radius = 0.1 * np.hypot(*fixed_ch.shape[1:])
        close = [c for c in found if np.linalg.norm(apply_matrix(c.matrix, centre)[0] - near) < radius]
        found = close or found
    return max(found, key=lambda c: c.score)


# --------------------------------------------------------------------------- ECC refinement
def _normaliser(shape) -> np.ndarray:
    """Pixels -> coordinates in about [-1, 1] (for a well-conditioned Jacobian)."""
    h, w = shape
    s = 2.0 / max(h, w)
    return np.array([[s, 0, -s * (w - 1) / 2], [0, s, -s * (h - 1) / 2], [0, 0, 1.0]])


def ecc_refine(fixed_ch: np.ndarray, moving_ch: np.ndarray, matrix: np.ndarray, model: str = "affine",
               iterations: int = 25, eps: float = 1e-4, samples: int = 12000, seed: int = 0,
               judge: Callable[[np.ndarray], float] | None = None, judge_every: int = 3
               ) -> tuple[np.ndarray, float]:
    """Refine a moving -> fixed ``matrix`` (pixels of these images) by maximising the correlation
    coefficient of the channels (stacked) over an ``"affine"`` or ``"projective"`` map, on up to
    ``samples`` random fixed pixels (as elastix samples its metric).

    Returns the best ``(matrix, score)`` seen: the correlation over the sampled fixed pixels
    where the warped moving image has data, times the root of their fraction. With ``judge``
    (a moving -> fixed matrix -> a further score), the start, every ``judge_every``-th improving
    step and the end are judged (stopping once two judgements in a row fall below the best), and
    the one with the highest score + judge is returned instead:
    on smooth density maps the correlation alone keeps rising as the moving image is magnified
    (its map, blown up, fits the fixed map's large-scale trend), past the right pose."""
    fh, fw = fixed_ch.shape[1:]
    mh, mw = moving_ch.shape[1:]
    nf, nm = _normaliser((fh, fw)), _normaliser((mh, mw))
    inv_nm = np.linalg.inv(nm)
    s_m = inv_nm[0, 0]  # moving px per normalised unit
    # backward warp in normalised coordinates: fixed (x, y) -> moving (x', y')
    W = nm @ np.linalg.inv(matrix) @ np.linalg.inv(nf)
    W = W / W[2, 2]
    n_all = fh * fw
    idx = np.arange(n_all) if n_all <= samples else np.random.default_rng(seed).choice(n_all, samples, False)
    ys, xs = np.divmod(idx, fw)
    xn = (xs - (fw - 1) / 2) * nf[0, 0]
    yn = (ys - (fh - 1) / 2) * nf[1, 1]
    tpl = fixed_ch.reshape(len(fixed_ch), -1)[:, idx].astype(np.float64)
    grads = [np.gradient(c) for c in moving_ch]  # (d/drow, d/dcol) in moving px
    n_par = 6 if model == "affine" else 8
    best = (W.copy(), -1.0)
    step = 1.0

    def to_px(w):
        m = np.linalg.inv(nf) @ np.linalg.inv(w) @ nm  # moving px -> fixed px
        return m / m[2, 2]

    judged: list[tuple[float, np.ndarray, float]] = []
    improved = 0
    for _ in range(iterations):
        den = W[2, 0] * xn + W[2, 1] * yn + 1.0
        den = np.where(np.abs(den) < 1e-9, 1e-9, den)
        xw = (W[0, 0] * xn + W[0, 1] * yn + W[0, 2]) / den
        yw = (W[1, 0] * xn + W[1, 1] * yn + W[1, 2]) / den
        cols = xw * s_m + inv_nm[0, 2]
        rows = yw * s_m + inv_nm[1, 2]
        valid = (cols >= 0) & (cols <= mw - 1) & (rows >= 0) & (rows <= mh - 1)
        if valid.sum() < 64:
            break
        rc = [rows[valid], cols[valid]]
        xv, yv, dv, xwv, ywv = xn[valid], yn[valid], den[valid], xw[valid], yw[valid]
        tvec, ivec, jac = [], [], []
        for k in range(len(moving_ch)):
            img = ndi.map_coordinates(moving_ch[k], rc, order=1)
            gyd = ndi.map_coordinates(grads[k][0], rc, order=1) * s_m / dv
            gxd = ndi.map_coordinates(grads[k][1], rc, order=1) * s_m / dv
            t = tpl[k][valid]
            tvec.append(t - t.mean())
            ivec.append(img - img.mean())
            cols_j = [gxd * xv, gxd * yv, gxd, gyd * xv, gyd * yv, gyd]
            if n_par == 8:
                q = -(gxd * xwv + gyd * ywv)
                cols_j += [q * xv, q * yv]
            J = np.stack(cols_j, 1)
            jac.append(J - J.mean(0))
        t, i, G = np.concatenate(tvec), np.concatenate(ivec), np.concatenate(jac)
        corr = float(t @ i)
        # weighted by the root of the overlap, as in :func:`search`: shrinking it is no gain
        rho = corr / max(np.linalg.norm(t) * np.linalg.norm(i), 1e-12) * np.sqrt(valid.mean())
        if rho > best[1]:
            if judge is not None and improved % judge_every == 0:
                judged.append((rho + judge(to_px(W)), W.copy(), rho))
                top = max(range(len(judged)), key=lambda j: judged[j][0])
                if len(judged) - 1 - top >= 2:  # the judge has fallen twice in a row: past the pose
                    break
            improved += 1
            best = (W.copy(), rho)
            step = min(step * 1.5, 1.0)
        else:  # overshoot: go back to the best warp and take a shorter step
            W = best[0].copy()
            step *= 0.5
            if step < 1e-3:
                break
            continue
        Q = G.T @ G + 1e-9 * np.eye(n_par)
        ip, tp = G.T @ i, G.T @ t
        qi = np.linalg.solve(Q, ip)
        lam_n = float(i @ i - ip @ qi)
        lam_d = float(corr - tp @ qi)
        if lam_d <= 0:  # ECC, eq. 21: no correlation to climb yet
            lam = np.sqrt(lam_n / max(float(t @ t - tp @ np.linalg.solve(Q, tp)), 1e-12))
        else:
            lam = lam_n / lam_d
        dp = np.linalg.solve(Q, G.T @ (lam * t - i)) * step
        d = np.zeros(9)
        d[:n_par] = dp
        W = best[0] + d.reshape(3, 3)
        if np.linalg.norm(dp) < eps:
            break
    if judge is not None and best[1] > -1.0:
        judged.append((best[1] + judge(to_px(best[0])), best[0], best[1]))
        _, w, rho = max(judged, key=lambda j: j[0])
        return to_px(w), float(rho)
    return to_px(best[0]), float(best[1])


# --------------------------------------------------------------------------- pipeline
#: (longer side px, smoothing sigma px) of the search, local search and refinement levels
LEVELS = {"search": (64, 1.0), "local": (128, 1.25), "affine": (256, 2.0), "projective": (512, 3.0),
          "slide": (1024, 3.0)}  # "slide": a further projective level for images over 2048 px
#: candidates of the global search refined by ECC (the best by decision score wins)
KEEP = 6
#: best grid poses of the global search climbed to their local best before the :data:`KEEP` cut
CLIMB = 16


@dataclass
class IntensityResult:
    matrix: np.ndarray  # moving -> fixed, level-0 px
    score: float  # overlap-weighted correlation of the search channels at the finest level
    candidate: Candidate  # the pose of the global search that won
    info: dict = field(default_factory=dict)


class _Channels:
    """:class:`SearchChannels` of one pyramid per base size (512 px; 1024 px for the slide
    level); ``like``: another pyramid's, whose downsample factors these follow (so the scales
    searched are level-0 scales whatever the two images' sizes)."""

    def __init__(self, pyramid, like: "_Channels | None" = None):
        self.pyramid, self.like, self.bases = pyramid, like, {}

    def base(self, base: int) -> SearchChannels:
        if base not in self.bases:
            side = base if self.like is None else round(
                max(self.pyramid.shape) / self.like.base(base).downsample)
            self.bases[base] = SearchChannels(self.pyramid, max(int(side), 1), base / 512)
        return self.bases[base]

    def _factor(self, key: str) -> tuple[int, int]:
        side = LEVELS[key][0]
        base = 512 if side <= 512 else 1024
        ref = (self.like or self).base(base)
        return base, max(int(round(max(ref.tissue.shape) / side)), 1)

    def __call__(self, key: str) -> tuple[np.ndarray, float]:
        base, factor = self._factor(key)
        return self.base(base).at(factor, LEVELS[key][1])

    def od(self, key: str) -> tuple[np.ndarray, float]:
        """The total optical density at the level of ``key`` (the pixels of ``self(key)``) and
        its downsample factor relative to level 0."""
        base, factor = self._factor(key)
        b = self.base(base)
        return b.od_at(factor), b.downsample * factor


def pose_distance(pf, a: np.ndarray, b: np.ndarray) -> float:
    """Median distance (level-0 moving px) between where two moving -> fixed matrices take the
    fixed image's grid points back into the moving image."""
    from ..transform import apply_matrix

    h, w = pf.shape
    ys, xs = np.mgrid[0.1 : 0.9 : 7j, 0.1 : 0.9 : 7j]
    p = np.stack([xs.ravel() * w, ys.ravel() * h], 1)
    d = apply_matrix(np.linalg.inv(a), p) - apply_matrix(np.linalg.inv(b), p)
    return float(np.median(np.linalg.norm(d, axis=1)))


def register_intensity(pf, pm, flips: bool = True, seed: int = 0,
                       progress: Callable[[str, float], None] | None = None) -> IntensityResult:
    """Moving -> fixed projective of two :class:`~napari_bci.registration.images.Pyramid` s on
    :class:`SearchChannels`: :func:`global_search` (64 px) of :data:`CLIMB` candidates, each
    climbed to its best nearby pose there (:func:`local_search`); the :data:`KEEP` best go on to a
    :func:`local_search` at 128 px and an affine :func:`ecc_refine` (256 px). Each is judged by its
    **decision** score: the refined correlation plus the :func:`orientation_agreement` of the
    tissue (256 px). The best by decision and the two best whose poses lie elsewhere (over 5 % of
    the diagonal away) are refined projectively (512 px), and the best of these by decision wins;
    ``score`` stays the refined correlation. ``info`` has the decision scores and the runner-up's
    (``decision``, ``runner_up_decision``, ``runner_up_score``, ``runner_up_px``; None without one),
    by which :func:`~napari_bci.registration.features.register_auto` refuses an ambiguous result."""
    from ..transform import apply_matrix
    from .images import level_matrix, matrix_to_level, matrix_to_level0

    say = progress or (lambda msg, frac: None)
    chf = _Channels(pf)
    chm = _Channels(pm, like=chf)
    say("global search", 0.0)
    (cf, dsf), (cm, dsm) = chf("search"), chm("search")
    centre = np.array([[(cm.shape[2] - 1) / 2, (cm.shape[1] - 1) / 2]])
    # the orientation agreement already at the search level (its sigmas scaled to 64 px)
    sig = tuple(x * LEVELS["search"][0] / LEVELS["affine"][0] for x in ORIENT_SIGMAS)
    (os_f, _), (os_m, _) = chf.od("search"), chm.od("search")
    field_s = orientation_field(os_f, sig)

    def orient_search(m):
        return orientation_agreement(os_f, os_m, m, field_s, sigmas=sig)

    # a narrow structure (a band of stroma across a tumour sheet) peaks sharply in angle: a grid
    # pose 5 degrees off the truth can rank 20th by correlation, so the best grid poses are
    # ranked by correlation + orientation and climb before the cut
    coarse = global_search(cf, cm, flips=flips, keep=CLIMB, judge=orient_search)
    climbed = [local_search(cf, cm, c, apply_matrix(c.matrix, centre)[0]) for c in coarse]
    cands = distinct(climbed, float(np.hypot(*cf.shape[1:])), KEEP, orient_search)
    # where each candidate puts the moving image's centre, level-0 px
    near0 = [apply_matrix(level_matrix(dsf) @ c.matrix, centre)[0] for c in cands]
    say("local search", 0.4)
    (cf, dsf), (cm, dsm) = chf("local"), chm("local")
    (af, daf), (am, dam) = chf("affine"), chm("affine")
    (od_f, _), (od_m, _) = chf.od("affine"), chm.od("affine")
    field_f = orientation_field(od_f)

    judged: dict[bytes, float] = {}  # the judged ECC step that is returned is scored again below

    def orient(m0):
        key = m0.tobytes()
        if key not in judged:
            judged[key] = orientation_agreement(od_f, od_m, matrix_to_level(m0, dam, daf), field_f)
        return judged[key]

    refined = []
    for k, c in enumerate(cands):
        say("local search and affine refinement", 0.4 + 0.4 * k / len(cands))
        loc = local_search(cf, cm, c, apply_matrix(np.linalg.inv(level_matrix(dsf)), near0[k][None])[0])
        m0 = matrix_to_level0(loc.matrix, dsm, dsf)
        mk, score = ecc_refine(af, am, matrix_to_level(m0, dam, daf), "affine", seed=seed,
                               judge=lambda mk: orient(matrix_to_level0(mk, dam, daf)))
        m0 = matrix_to_level0(mk, dam, daf)
        refined.append((score + orient(m0), m0, loc, score))
    refined.sort(key=lambda r: -r[0])
    # the finalists: the best, and the two best of those whose pose lies elsewhere
    far = 0.05 * float(np.hypot(*pf.shape))
    finalists = refined[:1] + [r for r in refined[1:] if pose_distance(pf, refined[0][1], r[1]) > far][:2]
    say("refine (projective)", 0.85)
    (cf, dsf), (cm, dsm) = chf("projective"), chm("projective")
    final = []
    for _, m, loc, aff in finalists:
        mk, score = ecc_refine(cf, cm, matrix_to_level(m, dsm, dsf), "projective", seed=seed,
                               judge=lambda mk: orient(matrix_to_level0(mk, dsm, dsf)))
        m0 = matrix_to_level0(mk, dsm, dsf)
        o = orient(m0)
        final.append((score + o, m0, loc, aff, score, o))
    final.sort(key=lambda r: -r[0])
    decision, m0, best, aff, score, o = final[0]
    info = {"search_score": best.score, "angle": best.angle, "scale": best.scale, "flipped": best.flipped,
            "affine_score": aff, "projective_score": score, "orientation": o, "decision": decision,
            "runner_up_decision": None, "runner_up_score": None, "runner_up_px": None}
    others = [(r[0], r[4], pose_distance(pf, m0, r[1])) for r in final[1:]]
    others = [r for r in others if r[2] > far]
    if others:
        info["runner_up_decision"], info["runner_up_score"], info["runner_up_px"] = others[0]
    if score_level(pf) == "slide":
        say("refine (slide)", 0.95)
        (cf, dsf), (cm, dsm) = chf("slide"), chm("slide")
        mk, score = ecc_refine(cf, cm, matrix_to_level(m0, dsm, dsf), "projective", seed=seed)
        m0 = matrix_to_level0(mk, dsm, dsf)
        info["slide_score"] = score
    return IntensityResult(m0 / m0[2, 2], float(score), best, info)


def score_level(pf) -> str:
    """The :data:`LEVELS` key the final score of a fixed pyramid is measured at."""
    return "slide" if max(pf.shape) > 2048 else "projective"


def invariant_scores(pf, pm, matrix0: np.ndarray) -> tuple[float, float]:
    """The two parts of the decision score for a level-0 moving -> fixed matrix, from one set of
    channels: the overlap-weighted correlation :func:`ecc_refine` maximises, at the level of the
    final score (:func:`score_level`), and the :func:`orientation_agreement` at the level
    :func:`register_intensity` measures it (256 px)."""
    from .images import matrix_to_level

    key = score_level(pf)
    chf = _Channels(pf)
    chm = _Channels(pm, like=chf)
    (cf, dsf), (cm, dsm) = chf(key), chm(key)
    _, score = ecc_refine(cf, cm, matrix_to_level(matrix0, dsm, dsf), "affine", iterations=1)
    (od_f, daf), (od_m, dam) = chf.od("affine"), chm.od("affine")
    return score, orientation_agreement(od_f, od_m, matrix_to_level(matrix0, dam, daf))
