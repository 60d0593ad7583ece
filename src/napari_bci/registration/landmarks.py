"""Landmark registration: a projective (or affine / similarity / rigid) map from point pairs."""

from __future__ import annotations

import csv
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..transform import Transform

#: Model name -> (skimage transform class name, minimal number of pairs the issue requires).
MODELS = {
    "projective": "ProjectiveTransform",
    "affine": "AffineTransform",
    "similarity": "SimilarityTransform",
    "rigid": "EuclideanTransform",
}
MIN_PAIRS = 4


@dataclass
class LandmarkFit:
    transform: Transform
    residuals: np.ndarray  # (N,) distance |T(moving_i) - fixed_i| in fixed level-0 px
    inliers: np.ndarray  # (N,) bool (all True without RANSAC)
    model: str

    @property
    def rmse(self) -> float:
        r = self.residuals[self.inliers]
        return float(np.sqrt(np.mean(r**2))) if r.size else float("nan")


def _model_class(model: str):
    import skimage.transform as sk

    if model not in MODELS:
        raise InputError("model", f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    return getattr(sk, MODELS[model])


def check_points(moving: np.ndarray, fixed: np.ndarray,
                 source: str = "landmarks") -> tuple[np.ndarray, np.ndarray]:
    """Validate point pairs; raises :class:`InputError` naming ``source`` and the problem."""
    try:
        m = np.asarray(moving, dtype=np.float64)
        f = np.asarray(fixed, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(source, "landmarks must be numbers") from None
    if m.ndim != 2 or f.ndim != 2 or m.shape[1:] != (2,) or f.shape[1:] != (2,):
        raise InputError(source, f"landmarks must be (N, 2) arrays of (x, y), got {m.shape} and {f.shape}")
    if len(m) != len(f):
        raise InputError(source, f"{len(m)} H&E landmarks but {len(f)} IHC landmarks; they pair by order")
    if not (np.isfinite(m).all() and np.isfinite(f).all()):
        raise InputError(source, "landmarks contain NaN or infinite coordinates")
    if len(m) < MIN_PAIRS:
        raise InputError(source, f"{len(m)} landmark pairs given; at least {MIN_PAIRS} are needed")
    for name, p in (("H&E (moving)", m), ("IHC (fixed)", f)):
        d = np.linalg.norm(p[:, None] - p[None], axis=-1) + np.eye(len(p)) * 1e9
        i, j = np.unravel_index(np.argmin(d), d.shape)
        if d[i, j] < 1e-6:
            raise InputError(source,
                             f"{name} landmarks {min(i, j) + 1} and {max(i, j) + 1} are the same point")
        c = p - p.mean(0)
        s = np.linalg.svd(c, compute_uv=False)
        if s[-1] <= 1e-3 * s[0]:
            raise InputError(source, f"{name} landmarks are collinear; place them around the tissue")
    return m, f


def fit_landmarks(
    moving,
    fixed,
    model: str = "projective",
    ransac: bool = False,
    threshold: float = 5.0,
    seed: int = 0,
    source: str = "landmarks",
) -> LandmarkFit:
    """Least-squares map moving (H&E) -> fixed (IHC) from paired ``(x, y)`` level-0 points.

    With ``ransac`` outlier pairs (residual > ``threshold`` px) are dropped before the final
    least-squares fit. Raises :class:`InputError` for fewer than 4 pairs, duplicate or collinear
    points, or a degenerate fit.
    """
    m, f = check_points(moving, fixed, source)
    cls = _model_class(model)
    inliers = np.ones(len(m), bool)
    if ransac and len(m) > MIN_PAIRS:
        from skimage.measure import ransac as sk_ransac

        min_samples = {"projective": 4, "affine": 3}.get(model, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est, inl = sk_ransac((m, f), cls, min_samples=min_samples, residual_threshold=threshold,
                                 max_trials=2000, rng=seed)
        if est and inl is not None and inl.sum() >= MIN_PAIRS:
            inliers = np.asarray(inl, bool)
    est = cls.from_estimate(m[inliers], f[inliers])
    if not est or not np.isfinite(est.params).all() or abs(np.linalg.det(est.params)) < 1e-12:
        raise InputError(source, f"the landmarks do not determine a {model} transform ({est})")
    matrix = np.asarray(est.params, dtype=np.float64)
    matrix = matrix / matrix[2, 2]
    t = Transform(matrix, meta={"method": "landmarks", "model": model, "pairs": int(len(m)),
                                "inliers": int(inliers.sum())})
    residuals = np.linalg.norm(t.forward(m) - f, axis=1)
    return LandmarkFit(t, residuals, inliers, model)


def read_landmarks_csv(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read ``moving_x,moving_y,fixed_x,fixed_y`` (level-0 px) -> ``(moving (N,2), fixed (N,2))``."""
    cols = ("moving_x", "moving_y", "fixed_x", "fixed_y")
    return _read_csv(path, cols, 4)


def read_points_csv(path: str | os.PathLike) -> np.ndarray:
    """Read the ``moving_x,moving_y`` columns of a CSV -> ``(N, 2)``."""
    return _read_csv(path, ("moving_x", "moving_y"), 2)[0]


def _read_csv(path, cols, need):
    path = Path(path)
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in cols if c not in header]
            if missing:
                raise InputError(path, f"missing column(s) {', '.join(missing)} (header: {','.join(header)})")
            rows = []
            for n, row in enumerate(reader, start=2):
                row = {k.strip(): v for k, v in row.items() if k is not None}
                try:
                    rows.append([float(row[c]) for c in cols])
                except (TypeError, ValueError):
                    raise InputError(path, f"line {n}: not a number in {', '.join(cols)}") from None
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except UnicodeDecodeError:
        raise InputError(path, "not a text CSV file") from None
    a = np.asarray(rows, dtype=np.float64).reshape(-1, len(cols))
    if need == 4:
        return a[:, :2], a[:, 2:]
    return (a,)


def write_landmarks_csv(path: str | os.PathLike, moving: np.ndarray, fixed: np.ndarray) -> Path:
    """Write pairs as ``moving_x,moving_y,fixed_x,fixed_y``, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["moving_x", "moving_y", "fixed_x", "fixed_y"])
        for (mx, my), (fx, fy) in zip(np.asarray(moving), np.asarray(fixed)):
            w.writerow([f"{mx:.3f}", f"{my:.3f}", f"{fx:.3f}", f"{fy:.3f}"])
    os.replace(tmp, path)
    return path
