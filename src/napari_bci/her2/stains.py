"""Hematoxylin / DAB separation for HER2 IHC: Ruifrok vectors or per-image Macenko estimates, and
the per-image stain model (white point, hematoxylin cross-talk, DAB background) of the scorer."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class StainModel:
    """One image's stain optics for the scorer: white point, stain vectors, and the DAB signal
    that is not membrane staining (hematoxylin cross-talk and the diffuse tissue background).

    ``separate`` returns hematoxylin and *background-corrected* DAB, ``DAB - crosstalk * H``,
    so that the scorer's OD thresholds mean the same on a real slide (off-white glass, a bluer
    hematoxylin than Ruifrok's, diffuse DAB) as on the synthetic tiles they were set on.
    """

    white: tuple[float, float, float] = (255.0, 255.0, 255.0)
    vectors: tuple = (tuple(HEMATOXYLIN), tuple(DAB))
    #: DAB OD read per unit hematoxylin OD in hematoxylin-only pixels (a vector mismatch).
    crosstalk: float = 0.0
    #: Diffuse DAB background OD of the tissue (a pathologist ignores it), a low percentile.
    dab_background: float = 0.0
    #: Median hematoxylin OD over tissue (stroma / cytoplasm tint).
    h_background: float = 0.0
    estimated_vectors: bool = False

    def od(self, rgb: np.ndarray) -> np.ndarray:
        i = np.maximum(np.asarray(rgb, np.float32)[..., :3], 1.0)
        return np.maximum(-np.log10(i / np.asarray(self.white, np.float32)), 0.0)

    def concentrations(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(hematoxylin, raw DAB) OD along this model's vectors (float32, H clipped >= 0)."""
        inv = np.linalg.inv(stain_matrix(*self.vectors)).astype(np.float32)
        od = self.od(rgb)
        return np.maximum(od @ inv[:, 0], 0.0), od @ inv[:, 1]

    def separate(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(hematoxylin, DAB without hematoxylin cross-talk), float32, clipped >= 0."""
        h, d = self.concentrations(rgb)
        return h, np.maximum(d - np.float32(self.crosstalk) * h, 0.0)

    def to_dict(self) -> dict:
        return {
            "white": [round(float(v), 1) for v in self.white],
            "hematoxylin": [round(float(v), 3) for v in self.vectors[0]],
            "dab": [round(float(v), 3) for v in self.vectors[1]],
            "crosstalk": round(float(self.crosstalk), 3),
            "dab_background": round(float(self.dab_background), 3),
            "h_background": round(float(self.h_background), 3),
            "estimated_vectors": bool(self.estimated_vectors),
        }


#: Percentile of the corrected tissue DAB taken as the diffuse background (a low one: in a 3+
#: nest most tissue pixels are stained).
BACKGROUND_PERCENTILE = 20
#: Sampling cap for the per-image estimates (pixels).
_SAMPLE = 250_000


def _sample(rgb: np.ndarray) -> np.ndarray:
    step = max(1, int(np.sqrt(rgb.shape[0] * rgb.shape[1] / _SAMPLE)))
    return np.asarray(rgb[::step, ::step, :3])


def white_point(rgb: np.ndarray, *, min_brightness: float = 200.0) -> tuple[float, float, float]:
    """Per-channel intensity of the glass: the median of the brightest 0.5 % of pixels when
    those are bright (>= ``min_brightness``), else 255 (a tile without glass)."""
    px = _sample(rgb).reshape(-1, 3).astype(np.float32)
    if len(px) == 0:
        return (255.0, 255.0, 255.0)
    br = px.mean(1)
    top = px[br >= np.percentile(br, 99.5)]
    if np.median(top.mean(1)) < min_brightness:
        return (255.0, 255.0, 255.0)
    return tuple(float(v) for v in np.clip(np.median(top, 0), min_brightness, 255.0))


def estimate_stain_model(rgb: np.ndarray, *, estimate_vectors: bool = False) -> StainModel:
    """The :class:`StainModel` of one image: white point from the glass; stain vectors
    (Ruifrok's, or Macenko's when ``estimate_vectors``); the hematoxylin cross-talk into DAB as
    the 10th percentile of DAB/H over hematoxylin-rich pixels (H >= 0.2 OD: nuclei, whose
    lowest DAB/H ratios are the unstained ones); the tissue's median H and low-percentile
    corrected DAB (:data:`BACKGROUND_PERCENTILE`)."""
    sub = _sample(rgb)
    white = white_point(sub)
    vectors = (tuple(HEMATOXYLIN), tuple(DAB))
    if estimate_vectors:
        v = macenko_vectors(sub)
        vectors = (tuple(v[0]), tuple(v[1]))
    m = StainModel(white=white, vectors=vectors, estimated_vectors=estimate_vectors)
    h, d = m.concentrations(sub)
    tissue = m.od(sub).sum(-1) > 0.15
    if tissue.sum() < 100:
        return m
    rich = tissue & (h >= 0.2)
    k = float(np.clip(np.percentile(d[rich] / h[rich], 10), 0.0, 0.6)) if rich.sum() >= 200 else 0.0
    dc = np.maximum(d - k * h, 0)
    return StainModel(white=white, vectors=vectors, crosstalk=k,
                      dab_background=float(np.percentile(dc[tissue], BACKGROUND_PERCENTILE)),
                      h_background=float(np.median(h[tissue])),
                      estimated_vectors=estimate_vectors)
