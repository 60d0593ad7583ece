"""Hematoxylin / DAB separation for HER2 IHC: Ruifrok vectors or per-image Macenko estimates."""

from __future__ import annotations

import numpy as np

from ..stain import DAB, HEMATOXYLIN, rgb_to_od, stain_matrix


def macenko_vectors(
    rgb: np.ndarray,
    *,
    od_min: float = 0.15,
    alpha: float = 1.0,
    max_pixels: int = 200_000,
    seed: int = 0,
    min_dab_od: float = 0.15,
    min_dab_fraction: float = 0.02,
) -> np.ndarray:
    """Estimate the hematoxylin and DAB unit OD vectors of one image (Macenko et al. 2009).

    Pixels with an OD norm below ``od_min`` (background) are ignored; the remaining OD
    vectors are projected on the plane of their two main principal directions and the
    ``alpha`` / ``100 - alpha`` percentiles of the in-plane angle are the two stains. The
    one closer to Ruifrok's hematoxylin becomes row 0. Falls back to Ruifrok's vectors when
    too little stained tissue is present, when fewer than ``min_dab_fraction`` of the stained
    pixels carry at least ``min_dab_od`` of DAB, or when an estimate is far from its reference.
    Returns a ``(2, 3)`` array (H, DAB).
    """
    od = rgb_to_od(rgb).reshape(-1, 3)
    od = od[np.linalg.norm(od, axis=1) > od_min]
    ref = np.stack([HEMATOXYLIN, DAB]) / np.linalg.norm([HEMATOXYLIN, DAB], axis=1, keepdims=True)
    if len(od) < 500:
        return ref
    if len(od) > max_pixels:
        od = od[np.random.default_rng(seed).choice(len(od), max_pixels, replace=False)]
    # Macenko needs both stains present: with (almost) no DAB its second direction is noise
    # in the hematoxylin, so keep Ruifrok's vectors then
    inv = np.linalg.inv(stain_matrix(ref[0], ref[1]))
    if np.mean((od @ inv)[:, 1] > min_dab_od) < min_dab_fraction:
        return ref
    _, vecs = np.linalg.eigh(np.cov(od, rowvar=False))
    plane = vecs[:, 1:3]  # two largest eigenvalues
    plane = plane * np.sign(plane.sum(axis=0, keepdims=True) + 1e-12)  # point into positive OD
    proj = od @ plane
    ang = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(ang, [alpha, 100 - alpha])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    est = np.stack([v1, v2])
    est = np.abs(est) / np.linalg.norm(est, axis=1, keepdims=True)
    # assign by cosine similarity with the reference vectors
    if est[0] @ ref[0] + est[1] @ ref[1] < est[1] @ ref[0] + est[0] @ ref[1]:
        est = est[::-1]
    # an estimate far from the stain it replaces signals a failed fit (e.g. one stain only)
    if min(est[0] @ ref[0], est[1] @ ref[1]) < 0.85:
        return ref
    return est


def separate_hdab(rgb: np.ndarray, *, estimate: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """RGB -> (hematoxylin, DAB) concentrations in base-10 OD units (float32, clipped >= 0)."""
    vectors = macenko_vectors(rgb) if estimate else np.stack([HEMATOXYLIN, DAB])
    matrix = stain_matrix(vectors[0], vectors[1])
    inv = np.linalg.inv(matrix).astype(np.float32)
    od = rgb_to_od(rgb)
    h = np.maximum(od @ inv[:, 0], 0.0)
    d = np.maximum(od @ inv[:, 1], 0.0)
    return h, d
