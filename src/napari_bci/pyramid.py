"""Pyramid geometry, the ground floor every other module builds on (imports numpy only).

* :func:`view_box`: the world box a 2D camera sees;
* :func:`level_mpps` / :func:`pick_level`: which level of a pyramid to use (one rule, below);
* :func:`reduce2`: the one 2x reduction (rounded 2x2 mean), used for the on-screen output
  pyramid and for the levels written to disk, so both agree to the grey level.

Level picking rule (:func:`pick_level`): with a target mpp, the level whose mpp is closest to it
in log scale (``prefer="nearest"``) or the coarsest level not coarser than it
(``prefer="finer"``: enough resolution for the target, up to ``tolerance`` coarser); with no
target or unknown mpp, level 0.
``max_pixels`` then moves to coarser levels until the level has at most that many pixels.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np


def view_box(center: Sequence[float], zoom: float, canvas_size: Sequence[int]) -> tuple[float, float, float, float]:
    """World box ``(y0, y1, x0, x1)`` seen by a 2D camera (``center`` in world (y, x), ``zoom`` in
    screen px per world unit, ``canvas_size`` (height, width) in screen px)."""
    cy, cx = float(center[-2]), float(center[-1])
    hh, hw = canvas_size[0] / zoom / 2, canvas_size[1] / zoom / 2
    return cy - hh, cy + hh, cx - hw, cx + hw


def level_downsamples(levels: Sequence[Any]) -> list[float]:
    """Downsample of each level relative to level 0 (from the level heights)."""
    h0 = float(levels[0].shape[0])
    return [h0 / float(lv.shape[0]) for lv in levels]


def level_mpps(levels: Sequence[Any], mpp: float | None) -> list[float | None]:
    """mpp of each level from level 0's mpp and the level shapes."""
    return [None if mpp is None else float(mpp) * d for d in level_downsamples(levels)]


def pick_level(levels: Sequence[Any], mpp: float | None, target_mpp: float | None, *,
               prefer: str = "nearest", max_pixels: int | None = None, start: int = 0,
               tolerance: float = 1.0001) -> int:
    """Index of the level to use for ``target_mpp`` (see the module docstring for the rule)."""
    if prefer not in ("nearest", "finer"):
        raise ValueError(f"prefer must be 'nearest' or 'finer', not {prefer!r}")
    k = int(start)
    if mpp is not None and target_mpp is not None and len(levels) > 1:
        mpps = level_mpps(levels, mpp)
        if prefer == "nearest":
            k = int(np.argmin([abs(math.log(m / target_mpp)) for m in mpps]))
        else:
            ok = [i for i, m in enumerate(mpps) if m <= target_mpp * tolerance]
            k = max(ok) if ok else 0
        k = max(k, int(start))
    if max_pixels is not None:
        while k + 1 < len(levels) and int(levels[k].shape[0]) * int(levels[k].shape[1]) > max_pixels:
            k += 1
    return k


def reduce2(block: np.ndarray, *, odd: str = "edge") -> np.ndarray:
    """2x2 rounded mean (half up) of an ``(h, w, c)`` uint8 block. An odd last row/column is
    repeated (``odd="edge"``: output ``ceil(h/2)``) or dropped (``odd="drop"``: ``floor(h/2)``)."""
    b = np.asarray(block)
    if odd == "edge":
        ph, pw = b.shape[0] % 2, b.shape[1] % 2
        if ph or pw:
            b = np.pad(b, ((0, ph), (0, pw)) + ((0, 0),) * (b.ndim - 2), mode="edge")
    elif odd == "drop":
        b = b[: b.shape[0] // 2 * 2, : b.shape[1] // 2 * 2]
    else:
        raise ValueError(f"odd must be 'edge' or 'drop', not {odd!r}")
    b = b.astype(np.uint16)
    s = b[0::2, 0::2] + b[1::2, 0::2] + b[0::2, 1::2] + b[1::2, 1::2]
    return ((s + 2) >> 2).astype(np.uint8)
