"""Pairs with a known warp, for tests and benchmarks: a real H&E image warped by a random
projective + smooth displacement field and re-stained to an IHC-like look."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from ..transform import Transform


def random_transform(
    shape: tuple[int, int],
    seed: int = 0,
    angle: float | None = None,
    flip: bool = False,
    scale: float | None = None,
    perspective: float = 2e-5,
    field_amplitude: float = 4.0,
    field_spacing: float = 16.0,
    out_shape: tuple[int, int] | None = None,
) -> Transform:
    """A moving -> fixed transform: rotation about the centre by ``angle`` degrees (random if
    None), optional horizontal flip, scale, a small perspective term, a small translation and a
    smooth random displacement field of peak amplitude ``field_amplitude`` px."""
    rng = np.random.default_rng(seed)
    h, w = shape
    oh, ow = out_shape or shape
    angle = rng.uniform(-180, 180) if angle is None else angle
    scale = rng.uniform(0.95, 1.05) if scale is None else scale
    t = np.radians(angle)
    c = np.array([(w - 1) / 2, (h - 1) / 2])
    co = np.array([(ow - 1) / 2, (oh - 1) / 2]) + rng.uniform(-0.03, 0.03, 2) * np.array([ow, oh])
    to_c = np.array([[1, 0, -c[0]], [0, 1, -c[1]], [0, 0, 1.0]])
    flip_m = np.diag([-1.0 if flip else 1.0, 1.0, 1.0])
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]]) * np.array(
        [[scale, scale, 1], [scale, scale, 1], [1, 1, 1]]
    )
    persp = np.array([[1, 0, 0], [0, 1, 0], [*(rng.uniform(-1, 1, 2) * perspective), 1]])
    back = np.array([[1, 0, co[0]], [0, 1, co[1]], [0, 0, 1.0]])
    m = back @ persp @ rot @ flip_m @ to_c
    m /= m[2, 2]
    field = None
    if field_amplitude > 0:
        gh, gw = int(np.ceil(oh / field_spacing)) + 1, int(np.ceil(ow / field_spacing)) + 1
        raw = rng.normal(size=(gh, gw, 2))
        sig = 128 / field_spacing
        sm = np.stack([ndi.gaussian_filter(raw[..., k], sig, mode="reflect") for k in (0, 1)], -1)
        field = (sm / np.abs(sm).max() * field_amplitude).astype(np.float32)
    return Transform(m, field, field_spacing, {"source": "known_warp", "seed": seed})


def ihc_like(he_rgb: np.ndarray, seed: int = 0) -> np.ndarray:
    """Re-stain H&E as HER2 IHC: lighter hematoxylin, no eosin, DAB where eosin was dense
    (membrane-like rims), plus sensor noise."""
    from ..stain import HDAB_MATRIX, render, separate, HED_MATRIX

    conc = separate(he_rgb, HED_MATRIX)
    hem = np.clip(conc[..., 0], 0, None) * 0.7
    eos = np.clip(conc[..., 1], 0, None)
    rim = np.clip(ndi.gaussian_gradient_magnitude(eos, 1.5) * 4 + eos * 0.4, 0, 1.2)
    dab = ndi.gaussian_filter(rim, 1.0) * 1.0
    rgb = render(np.stack([hem, dab, np.zeros_like(hem)], -1), HDAB_MATRIX[[0, 1, 2]])
    rng = np.random.default_rng(seed)
    noisy = rgb.astype(np.float32) + rng.normal(0, 3, rgb.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


@dataclass
class KnownPair:
    moving: np.ndarray  # H&E
    fixed: np.ndarray  # IHC-like, in the fixed frame
    transform: Transform  # truth, moving -> fixed


def make_known_pair(he_rgb: np.ndarray, seed: int = 0, **kw) -> KnownPair:
    """Warp ``he_rgb`` by :func:`random_transform` and re-stain it as IHC (the fixed image)."""
    he = np.asarray(he_rgb)[..., :3]
    t = random_transform(he.shape[:2], seed=seed, **kw)
    warped = t.warp_image(he, he.shape[:2], cval=255)
    return KnownPair(he, ihc_like(warped, seed), t)


def grid_points(shape: tuple[int, int], step: int = 32, margin: int = 16) -> np.ndarray:
    """``(x, y)`` points on a regular grid inside an image of ``shape``."""
    ys, xs = np.mgrid[margin : shape[0] - margin : step, margin : shape[1] - margin : step]
    return np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64)


def truth_points(truth: Transform, moving_shape, fixed_shape, step: int = 32, margin: int = 24):
    """Moving grid points whose true position lies inside the fixed frame: ``(moving, fixed)``."""
    pm = grid_points(moving_shape, step, margin)
    pf = truth.forward(pm)
    ok = (pf[:, 0] > margin) & (pf[:, 1] > margin) & (pf[:, 0] < fixed_shape[1] - margin) & (
        pf[:, 1] < fixed_shape[0] - margin
    )
    return pm[ok], pf[ok]
