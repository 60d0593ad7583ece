"""The learned HER2 level from H&E: the built-in level-aware generator's classification head.

Everything here degrades gracefully: when no generator with a HER2 head is installed,
:func:`level_model` returns ``None`` and the rule-based scorer works on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .scoring import LEVELS, HER2Result
from .tiles import _tissue_fraction, as_levels, read_rgb, run_steps


_MODELS: dict = {}


def level_model(name: str = "builtin", device: str | None = None):
    """The generator ``name`` if it predicts a HER2 level, else ``None`` (absent, broken or no
    head). Loaded models are kept for the next call."""
    key = (str(name), device)
    if key in _MODELS:
        return _MODELS[key]
    try:
        from ..models.registry import load_generator

        gen = load_generator(name, device=device)
    except Exception:  # weights not installed, torch missing, bad checkpoint: no learned level
        return None
    gen = gen if getattr(gen, "predicts_her2", False) else None
    if gen is not None:
        _MODELS[key] = gen
    return gen


def predict_tiles(tiles: np.ndarray, model) -> np.ndarray:
    """``(N, H, W, 3)`` uint8 H&E tiles -> ``(N, 4)`` probabilities of "0", "1+", "2+", "3+"."""
    p = np.asarray(model.predict_her2(np.asarray(tiles, np.uint8)), np.float64)
    p = np.clip(p, 0, None)
    return p / np.maximum(p.sum(1, keepdims=True), 1e-12)


def _level_for(levels, mpp: float | None, target: float | None) -> tuple[int, float]:
    from ..pyramid import level_downsamples, pick_level

    if not mpp or not target:
        return 0, 1.0
    i = pick_level(levels, mpp, target, prefer="finer", tolerance=1.05)
    return i, level_downsamples(levels)[i]


def _probs_of_window(rgb: np.ndarray, model, scale: float) -> np.ndarray:
    """Mean head probabilities over the model-sized sub-tiles of one window."""
    if abs(scale - 1.0) > 0.05:
        from skimage.transform import resize

        shape = (max(int(round(rgb.shape[0] * scale)), 8), max(int(round(rgb.shape[1] * scale)), 8))
        rgb = (resize(rgb, shape, anti_aliasing=scale < 1, preserve_range=True)).astype(np.uint8)
    t = int(getattr(model, "tile", 256) or 256)
    h, w = rgb.shape[:2]
    if h < t or w < t:  # pad small windows with background white
        pad = np.full((max(h, t), max(w, t), 3), 240, np.uint8)
        pad[:h, :w] = rgb
        rgb, h, w = pad, pad.shape[0], pad.shape[1]
    tiles = [rgb[y:y + t, x:x + t] for y in range(0, h - t + 1, t) for x in range(0, w - t + 1, t)]
    return predict_tiles(np.stack(tiles), model).mean(0)


def _setup(he, mpp: float | None, model):
    """``(model, levels, mpp0, level, downsample, scale to the model's mpp)`` for reading ``he``
    at the model's pixel size, or None without a model."""
    model = model if model is not None else level_model()
    if model is None:
        return None
    levels = as_levels(he)
    mpp0 = mpp or 0.5
    li, ds = _level_for(levels, mpp0, getattr(model, "mpp", None))
    scale = (mpp0 * ds / model.mpp) if getattr(model, "mpp", None) else 1.0
    return model, levels, mpp0, li, ds, scale


def predict_polygon(he, polygon_xy, mpp: float | None = 0.5, model=None, *,
                    max_tiles: int = 64) -> np.ndarray | None:
    """Mean learned probabilities over the bounding box of a polygon ((x, y) level-0 pixels) of
    an H&E image or pyramid; large boxes are sampled with at most ``max_tiles`` model tiles."""
    setup = _setup(he, mpp, model)
    if setup is None:
        return None
    model, levels, _, li, ds, scale = setup
    p = np.asarray(polygon_xy, float) / ds
    x0, y0 = np.maximum(np.floor(p.min(0)).astype(int), 0)
    x1, y1 = np.ceil(p.max(0)).astype(int)
    t = int(round(int(getattr(model, "tile", 256) or 256) / scale))  # model tile at this level
    nx, ny = max((x1 - x0) // t, 1), max((y1 - y0) // t, 1)
    step = max(int(np.ceil(np.sqrt(nx * ny / max_tiles))), 1)
    probs = []
    for j in range(0, ny, step):
        for i in range(0, nx, step):
            wx, wy = x0 + i * t, y0 + j * t
            win = read_rgb(levels[li], wx, wy, min(wx + t, x1), min(wy + t, y1))
            if win.size and min(win.shape[:2]) >= 16 and _tissue_fraction(win) >= 0.05:
                probs.append(_probs_of_window(win, model, scale))
    return np.mean(probs, 0) if probs else None


@dataclass
class LevelMap:
    """Per-tile learned probabilities ``probs[r, c, 4]`` (nan: background) and
    ``labels[r, c]`` = 0 (not predicted) or 1 + argmax level, on the same grid as the rule map."""

    probs: np.ndarray
    labels: np.ndarray
    tile: int  # level-0 pixels

    def region(self, mask_lowres: np.ndarray | None = None) -> np.ndarray | None:
        """Mean probabilities over the tiles in ``mask_lowres`` (all tiles when None)."""
        ok = np.isfinite(self.probs[..., 0])
        if mask_lowres is not None:
            ok &= np.asarray(mask_lowres, bool)
        return self.probs[ok].mean(0) if ok.any() else None


def iter_predict_map(he, mpp: float | None = 0.5, model=None, *, tile_um: float = 256.0,
                     min_tissue: float = 0.05):
    """Generator form of :func:`predict_map`: yields ``(done, total)`` per tile and returns the
    :class:`LevelMap` (or ``None`` without a model) as ``StopIteration.value``."""
    setup = _setup(he, mpp, model)
    if setup is None:
        return None
    model, levels, mpp0, li, ds, scale = setup
    lv = levels[li]
    H0, W0 = levels[0].shape[:2]
    tile0 = max(int(round(tile_um / mpp0)), 16)
    ny, nx = -(-H0 // tile0), -(-W0 // tile0)
    probs = np.full((ny, nx, 4), np.nan)
    for r in range(ny):
        for c in range(nx):
            x, y = c * tile0, r * tile0
            win = read_rgb(lv, int(x / ds), int(y / ds),
                           int(np.ceil((x + tile0) / ds)), int(np.ceil((y + tile0) / ds)))
            if win.size and _tissue_fraction(win) >= min_tissue:
                probs[r, c] = _probs_of_window(win, model, scale)
            yield r * nx + c + 1, ny * nx
    labels = np.where(np.isfinite(probs[..., 0]), 1 + np.nan_to_num(probs).argmax(-1), 0).astype(np.uint8)
    return LevelMap(probs, labels, tile0)


def predict_map(
    he,
    mpp: float | None = 0.5,
    model=None,
    *,
    tile_um: float = 256.0,
    min_tissue: float = 0.05,
    progress: Callable[[int, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> LevelMap | None:
    """Learned HER2 probabilities per tile of an H&E image or pyramid (``None`` without a model).
    The grid matches :func:`napari_bci.her2.tiles.score_map` with the same ``tile_um``."""
    return run_steps(iter_predict_map(he, mpp, model, tile_um=tile_um, min_tissue=min_tissue),
                     progress, cancelled, "HER2 prediction cancelled")


def compare(rule: HER2Result | str | None, probs: np.ndarray | None) -> dict:
    """Rule-based score (of the IHC) next to the learned probabilities (from the H&E).
    ``rule``: a result (a not-assessable one is shown with its reason), a level or None."""
    from .scoring import display_text

    if isinstance(rule, HER2Result):
        r, shown = rule.her2, display_text(rule)
    else:
        r, shown = rule, (rule if rule is not None else "not assessable")
    out = {"rule": r, "rule_display": shown, "learned": None, "probabilities": None, "agree": None}
    if probs is not None and np.all(np.isfinite(probs)):
        k = int(np.argmax(probs))
        out.update(learned=LEVELS[k], probabilities={lv: round(float(p), 4) for lv, p in zip(LEVELS, probs)})
        if r is not None:
            out["agree"] = LEVELS[k] == r
    if out["learned"] is None:
        out["text"] = f"rule-based {shown}; no learned prediction (no model with a HER2 head)"
    elif r is None:
        out["text"] = f"rule-based {shown}; learned {out['learned']} (p={max(probs):.2f}) from the H&E"
    else:
        verdict = "agree" if out["agree"] else "DISAGREE"
        out["text"] = f"rule-based {r} vs learned {out['learned']} (p={max(probs):.2f}): {verdict}"
    return out


def disagreement(rule_labels: np.ndarray, learned_labels: np.ndarray) -> np.ndarray:
    """Tiles where both maps have a level (labels 1-4; 0 none, 5 not assessable) and the levels
    differ (bool, same grid)."""
    a, b = np.asarray(rule_labels), np.asarray(learned_labels)
    return (a > 0) & (a <= 4) & (b > 0) & (b <= 4) & (a != b)
