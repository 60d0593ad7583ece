"""Spatial transforms between an H&E (moving) and an IHC (fixed) image.

Convention (used everywhere: registration, synthetic-sample truth, CLI, widgets):

* points are ``(x, y)`` = (column, row) in level-0 pixels, arrays of shape ``(N, 2)``;
* a :class:`Transform` maps **moving (H&E) -> fixed (IHC)** coordinates;
* it is a projective matrix ``H`` (3x3, moving -> fixed) optionally refined by a dense
  displacement field ``u`` defined on the fixed frame, so that the *backward* map used to warp
  images is ``backward(p_fixed) = H^-1(p_fixed + u(p_fixed))``;
* the field is kept at low resolution: ``field[i, j] = (dx, dy)`` at fixed point
  ``(x, y) = (j * spacing, i * spacing)`` and interpolated bilinearly in between.

Saved as JSON (matrix and metadata) with the field in a sibling ``.npz``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from .errors import InputError

FORMAT = "napari-bci.transform"


def _as_points(points: Any) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"points must have shape (N, 2), got {pts.shape}")
    return pts


def apply_matrix(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 3x3 projective matrix to ``(N, 2)`` points."""
    pts = _as_points(points)
    hom = np.c_[pts, np.ones(len(pts))] @ np.asarray(matrix, dtype=np.float64).T
    w = hom[:, 2:3]
    w = np.where(np.abs(w) < 1e-12, 1e-12, w)
    return hom[:, :2] / w


@dataclass
class Transform:
    """Moving (H&E) -> fixed (IHC) transform; see the module docstring."""

    matrix: np.ndarray = dc_field(default_factory=lambda: np.eye(3))
    field: np.ndarray | None = None  # (gh, gw, 2) float32, (dx, dy) in fixed level-0 px
    spacing: float = 1.0  # level-0 px between field samples
    meta: dict = dc_field(default_factory=dict)

    def __post_init__(self):
        self.matrix = np.asarray(self.matrix, dtype=np.float64).reshape(3, 3)
        if self.field is not None:
            self.field = np.asarray(self.field, dtype=np.float32)
            if self.field.ndim != 3 or self.field.shape[2] != 2:
                raise ValueError(f"field must have shape (gh, gw, 2), got {self.field.shape}")

    # -- points -------------------------------------------------------------------------
    def displacement(self, points_fixed: np.ndarray) -> np.ndarray:
        """The field ``u`` at fixed points ``(N, 2)``; zeros without a field."""
        pts = _as_points(points_fixed)
        if self.field is None:
            return np.zeros_like(pts)
        rc = [pts[:, 1] / self.spacing, pts[:, 0] / self.spacing]
        return np.stack(
            [ndi.map_coordinates(self.field[..., k], rc, order=1, mode="nearest") for k in (0, 1)],
            axis=1,
        )

    def backward(self, points_fixed: np.ndarray) -> np.ndarray:
        """Fixed (IHC) -> moving (H&E) points."""
        pts = _as_points(points_fixed)
        return apply_matrix(np.linalg.inv(self.matrix), pts + self.displacement(pts))

    def forward(self, points_moving: np.ndarray, iterations: int = 30) -> np.ndarray:
        """Moving (H&E) -> fixed (IHC) points (the field is inverted by fixed-point iteration)."""
        q = apply_matrix(self.matrix, _as_points(points_moving))
        if self.field is None:
            return q
        p = q.copy()
        for _ in range(iterations):
            p = q - self.displacement(p)
        return p

    __call__ = forward

    def map_path(self, points: np.ndarray, *, inverse: bool = False, closed: bool = True,
                 max_segment: float = 16.0) -> np.ndarray:
        """An outline's vertices ``(N, 2)`` ``(x, y)`` moved H&E -> IHC (``inverse``: IHC -> H&E).

        Edges are first cut into pieces of at most ``max_segment`` px, so a projective or
        deformable map bends them as it bends the tissue (a straight edge between two mapped
        corners would not follow a deformation); ``closed`` also cuts the closing edge.
        """
        pts = _as_points(points)
        if len(pts) > 1:
            ends = np.vstack([pts[1:], pts[:1]]) if closed else pts[1:]
            starts = pts[: len(ends)]
            pieces = []
            for a, b in zip(starts, ends):
                n = max(1, int(np.ceil(np.hypot(*(b - a)) / max_segment)))
                pieces.append(a + (b - a) * (np.arange(n)[:, None] / n))
            if not closed:
                pieces.append(pts[-1:])
            pts = np.vstack(pieces)
        return self.backward(pts) if inverse else self.forward(pts)

    # -- images -------------------------------------------------------------------------
    def backward_grid(self, y0: int, x0: int, height: int, width: int, downsample: float = 1.0) -> np.ndarray:
        """Moving level-0 ``(x, y)`` positions for each pixel of a fixed-frame window given in
        pixels of a level ``downsample`` times coarser than level 0; shape ``(height, width, 2)``."""
        ys, xs = np.mgrid[y0 : y0 + height, x0 : x0 + width].astype(np.float64)
        # pixel centres: level-k pixel i covers level-0 [i*d, (i+1)*d)
        pts = np.stack([(xs + 0.5) * downsample - 0.5, (ys + 0.5) * downsample - 0.5], -1).reshape(-1, 2)
        return self.backward(pts).reshape(height, width, 2)

    def warp_image(
        self,
        moving: np.ndarray,
        output_shape: tuple[int, int],
        downsample: float = 1.0,
        order: int = 1,
        cval: float = 255.0,
        origin: tuple[int, int] = (0, 0),
    ) -> np.ndarray:
        """Resample ``moving`` (an in-memory image at the same ``downsample`` level) into the
        fixed frame; ``origin`` is the (row, col) of the output window in that level's pixels.
        Pixels that map outside ``moving`` get ``cval``."""
        moving = np.asarray(moving)
        grid = self.backward_grid(origin[0], origin[1], output_shape[0], output_shape[1], downsample)
        # back to moving level-k pixel indices
        cols = (grid[..., 0] + 0.5) / downsample - 0.5
        rows = (grid[..., 1] + 0.5) / downsample - 0.5
        coords = [rows, cols]
        if moving.ndim == 2:
            out = ndi.map_coordinates(moving.astype(np.float32), coords, order=order, cval=cval)
        else:
            out = np.stack(
                [
                    ndi.map_coordinates(moving[..., c].astype(np.float32), coords, order=order, cval=cval)
                    for c in range(moving.shape[-1])
                ],
                axis=-1,
            )
        if np.issubdtype(moving.dtype, np.integer):
            info = np.iinfo(moving.dtype)
            out = np.clip(np.rint(out), info.min, info.max)
        return out.astype(moving.dtype)

    # -- files --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": 1,
            "direction": "moving->fixed",
            "matrix": self.matrix.tolist(),
            "spacing": float(self.spacing),
            "field_shape": None if self.field is None else list(self.field.shape),
            "meta": self.meta,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (JSON) and, with a field, ``path`` with suffix ``.npz``; atomically."""
        path = Path(path)
        d = self.to_dict()
        if self.field is not None:
            npz = path.with_suffix(".npz")
            d["field_file"] = npz.name
            tmp = npz.with_name(npz.name + ".tmp.npz")
            np.savez_compressed(tmp, field=self.field)
            os.replace(tmp, npz)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(d, indent=2))
        os.replace(tmp, path)
        return path

    @classmethod
    def from_dict(cls, d: dict, field: np.ndarray | None = None) -> "Transform":
        return cls(np.asarray(d["matrix"]), field, float(d.get("spacing", 1.0)), dict(d.get("meta", {})))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Transform":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(path, "no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(path, f"not a readable transform JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT or "matrix" not in d:
            raise InputError(path, f"not a {FORMAT} file")
        field = None
        if d.get("field_file"):
            npz = path.with_name(d["field_file"])
            try:
                with np.load(npz, allow_pickle=False) as z:
                    field = z["field"]
            except (OSError, KeyError, ValueError) as e:
                raise InputError(npz, f"cannot read the displacement field ({e})") from None
        return cls.from_dict(d, field)
