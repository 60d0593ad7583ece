"""Synthetic paired H&E / HER2-IHC tissue with exact ground truth (the embedded default data).

``make_pair(her2, size, seed, mpp)`` renders a BCI-style field of view twice from one procedural
scene (see :mod:`._scene`): as an H&E section, and as the consecutive section stained for HER2
(hematoxylin counterstain + DAB on tumour-cell membranes) in its own frame, offset from the H&E
by a known projective transform plus a smooth elastic field. Deterministic for a given seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..transform import Transform
from ._scene import HER2_LEVELS, Frame, Scene, check_level, fbm, render_window

__all__ = ["HER2_LEVELS", "make_pair", "make_transform", "Pair", "Truth"]


@dataclass
class Truth:
    """Ground truth of a synthetic pair."""

    her2: str
    mpp: float
    transform: Transform  # H&E (moving) -> IHC (fixed), level-0 (x, y) px
    tumour_mask: np.ndarray  # (H, W) bool, H&E frame
    cells: dict = field(default_factory=dict)
    seed: int = 0

    def to_json(self) -> dict:
        c = self.cells
        tum = c["tumour"]
        n_t = int(tum.sum())
        mc = c["membrane_class"][tum]
        comp = c["completeness"][tum]
        frac = {
            "none": float(np.mean(mc == 0)) if n_t else 0.0,
            "faint_incomplete": float(np.mean((mc == 1) & (comp < 0.9))) if n_t else 0.0,
            "faint": float(np.mean(mc == 1)) if n_t else 0.0,
            "weak_moderate_complete": float(np.mean((mc == 2) & (comp >= 0.9))) if n_t else 0.0,
            "intense_complete": float(np.mean((mc == 3) & (comp >= 0.9))) if n_t else 0.0,
        }
        return {
            "her2": self.her2,
            "level": self.her2,
            "mpp": self.mpp,
            "seed": self.seed,
            "transform": self.transform.to_dict(),
            "cells": {"total": int(len(tum)), "tumour": n_t, "tumour_fraction_area": float(self.tumour_mask.mean())},
            "membrane_fractions": frac,
        }


@dataclass
class Pair:
    he: np.ndarray
    ihc: np.ndarray
    truth: Truth


def _shape(size) -> tuple[int, int]:
    if np.isscalar(size):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def make_transform(seed: int, shape: tuple[int, int], mpp: float = 0.5, *, max_rot_deg: float = 2.5,
                   max_shift_px: float = 12.0, max_scale: float = 0.02, max_shear: float = 0.012,
                   elastic_um: float = 2.0, elastic_scale_um: float = 220.0,
                   spacing: int | None = None) -> Transform:
    """A consecutive-section transform (H&E -> IHC level-0 px) for an image of ``shape`` (h, w):
    rotation, shift, scale and shear about the centre, a slight perspective term, and a smooth
    elastic displacement field (amplitude ~``elastic_um``) sampled every ``spacing`` px."""
    h, w = shape
    rng = np.random.default_rng([int(seed), 4242])
    rot = np.deg2rad(rng.uniform(-max_rot_deg, max_rot_deg))
    sx, sy = 1 + rng.uniform(-max_scale, max_scale, 2)
    sh = rng.uniform(-max_shear, max_shear)
    tx, ty = rng.uniform(-max_shift_px, max_shift_px, 2)
    c, s = np.cos(rot), np.sin(rot)
    R = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    S = np.array([[sx, sh, 0], [0, sy, 0], [0, 0, 1]])
    cx, cy = (w - 1) / 2, (h - 1) / 2
    T0 = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]])
    T1 = np.array([[1, 0, cx + tx], [0, 1, cy + ty], [0, 0, 1]])
    # perspective: at most ~0.3% scale change across the image
    L = float(max(h, w))
    P = np.array([[1, 0, 0], [0, 1, 0], [rng.uniform(-3e-3, 3e-3) / L, rng.uniform(-3e-3, 3e-3) / L, 1]])
    M = T1 @ P @ R @ S @ T0
    M = M / M[2, 2]
    if spacing is None:
        spacing = int(max(16, 2 ** round(np.log2(max(h, w) / 32))))
    gh = int(np.ceil((h - 1) / spacing)) + 2
    gw = int(np.ceil((w - 1) / spacing)) + 2
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float64) * spacing * mpp
    amp = elastic_um / mpp
    salt = (int(seed) * 7919 + 13) & 0xFFFFFFFF
    fld = np.stack(
        [amp * 3.0 * fbm(xx, yy, elastic_scale_um, salt, 2), amp * 3.0 * fbm(xx, yy, elastic_scale_um, salt + 1, 2)],
        -1,
    ).astype(np.float32)
    return Transform(M, fld, float(spacing), meta={"kind": "synthetic consecutive section", "seed": int(seed)})


def make_pair(her2: str = "2+", size: Any = 1024, seed: int = 0, mpp: float = 0.5) -> Pair:
    """A synthetic H&E / HER2-IHC pair of ``size`` (int or (h, w)) pixels at ``mpp`` um/px."""
    her2 = check_level(her2)
    h, w = _shape(size)
    if h < 16 or w < 16:
        raise ValueError(f"size must be at least 16 px, got {(h, w)}")
    scene = Scene(seed, her2, mpp, kind="patch")
    tf = make_transform(seed, (h, w), mpp)
    he, th = render_window(scene, "he", Frame(None), 0, 0, h, w, with_truth=True)
    ihc = render_window(scene, "ihc", Frame(tf), 0, 0, h, w)
    C = th["cells"]
    cen_he = th["centres"]
    inside = (cen_he[:, 0] >= 0) & (cen_he[:, 0] < w) & (cen_he[:, 1] >= 0) & (cen_he[:, 1] < h)
    cen_ihc = tf.forward(cen_he[inside]) if inside.any() else np.zeros((0, 2))
    k = inside
    cells = {
        "centroid_he": cen_he[k],
        "centroid_ihc": cen_ihc,
        "tumour": C["kind"][k] == 0,
        "kind": C["kind"][k].astype(np.int8),
        "membrane_class": C["mclass"][k].astype(np.int8),
        "completeness": C["comp"][k].astype(np.float64),
        "membrane_od": C["mod"][k].astype(np.float64),
        "nucleus_radius": np.sqrt(C["a"][k] * C["b"][k]) / mpp,
        "in_he": C["in_he"][k].astype(bool),
        "in_ihc": C["in_ihc"][k].astype(bool),
    }
    truth = Truth(her2=her2, mpp=float(mpp), transform=tf, tumour_mask=th["tumour_mask"], cells=cells, seed=int(seed))
    return Pair(he=he, ihc=ihc, truth=truth)
