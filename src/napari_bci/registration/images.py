"""Image helpers for registration: the stain-independent channel, pyramid levels, reading files.

All functions take RGB ``(H, W, 3)`` uint8 arrays (numpy or dask) and never hold more than the
level they are asked for in memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import InputError


def od_range(rgb: Any, lo: float = 1.0, hi: float = 99.5) -> tuple[float, float]:
    """Percentiles of the hematoxylin OD of ``rgb``: a normalisation shared by all parts of a slide."""
    from ..stain import hematoxylin

    a, b = np.percentile(hematoxylin(np.asarray(rgb)[..., :3]), [lo, hi])
    return float(a), float(b)


def od_channel(rgb: Any, lo: float = 1.0, hi: float = 99.5,
               value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Hematoxylin optical density of ``rgb``, percentile-normalised to about ``[0, 1]`` (float32)
    (or by ``value_range`` = (low, high) OD, e.g. from :func:`od_range` on a whole slide).

    Hematoxylin stains nuclei in both H&E and HER2 IHC, so it is the channel that stays comparable
    across the two stains (grey level or total OD do not: eosin and DAB dominate them).
    """
    from ..stain import hematoxylin

    h = hematoxylin(np.asarray(rgb)[..., :3])
    a, b = value_range if value_range is not None else np.percentile(h, [lo, hi])
    if b - a < 1e-6:
        return np.zeros(h.shape, np.float32)
    return np.clip((h - a) / (b - a), 0.0, 1.5).astype(np.float32)


#: total optical density above which a pixel shows stain (tissue, not glass)
TISSUE_OD = 0.08


def tissue_mask(rgb: Any, threshold: float = TISSUE_OD) -> np.ndarray:
    """Pixels with visible stain (total OD above ``threshold``)."""
    from ..stain import rgb_to_od

    return rgb_to_od(np.asarray(rgb)[..., :3]).sum(-1) > threshold


def level_matrix(downsample: float) -> np.ndarray:
    """3x3 matrix taking level-k pixel ``(x, y)`` to level-0 pixels (pixel-centre convention of
    :meth:`napari_bci.transform.Transform.backward_grid`)."""
    d = float(downsample)
    o = (d - 1.0) / 2.0
    return np.array([[d, 0.0, o], [0.0, d, o], [0.0, 0.0, 1.0]])


def matrix_to_level0(matrix_k: np.ndarray, ds_moving: float, ds_fixed: float) -> np.ndarray:
    """A moving->fixed matrix estimated between level-k pixels -> the same map in level-0 pixels."""
    return level_matrix(ds_fixed) @ np.asarray(matrix_k) @ np.linalg.inv(level_matrix(ds_moving))


def matrix_to_level(matrix0: np.ndarray, ds_moving: float, ds_fixed: float) -> np.ndarray:
    """Inverse of :func:`matrix_to_level0`."""
    return np.linalg.inv(level_matrix(ds_fixed)) @ np.asarray(matrix0) @ level_matrix(ds_moving)


def downscale(rgb: Any, factor: int) -> np.ndarray:
    """Block-mean downscale of an RGB (or 2-D) array by an integer ``factor`` (dask-aware)."""
    if factor <= 1:
        return np.asarray(rgb)
    h, w = rgb.shape[:2]
    h2, w2 = h // factor, w // factor
    a = rgb[: h2 * factor, : w2 * factor]
    shape = (h2, factor, w2, factor) + tuple(a.shape[2:])
    if hasattr(a, "map_blocks"):  # dask: reduce per chunk, then gather the small result
        import dask.array as da

        out = da.coarsen(np.mean, a.astype(np.float32), {0: factor, 1: factor}, trim_excess=True)
        out = np.asarray(out.compute())
    else:
        out = np.asarray(a, dtype=np.float32).reshape(shape).mean(axis=(1, 3))
    if np.asarray(rgb[:1, :1]).dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out


@dataclass
class Pyramid:
    """Levels of one image, level 0 first, with their downsample factors."""

    levels: list
    downsamples: list[float]
    mpp: float | None = None
    path: str | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.levels[0].shape[:2])

    def level_for(self, max_side: int) -> int:
        """Finest level whose longer side is at most ``max_side`` (the coarsest if none is)."""
        for i, lv in enumerate(self.levels):
            if max(lv.shape[:2]) <= max_side:
                return i
        return len(self.levels) - 1

    def level(self, i: int, max_pixels: int = 4096 * 4096):
        """Level ``i``: an in-memory copy (kept for reuse) when it has at most ``max_pixels``
        pixels, else the lazy level itself (read it by regions)."""
        lv = self.levels[i]
        if isinstance(lv, np.ndarray) or lv.shape[0] * lv.shape[1] > max_pixels:
            return lv
        cache = self.__dict__.setdefault("_cache", {})
        if i not in cache:
            cache[i] = np.asarray(lv)
        return cache[i]

    def memo(self, key, make: Callable[[], Any]) -> Any:
        """``make()``, computed once per pyramid and ``key`` (work on the fixed image that several
        steps of one registration repeat)."""
        memo = self.__dict__.setdefault("_memo", {})
        if key not in memo:
            memo[key] = make()
        return memo[key]

    def nearest_level(self, downsample: float) -> int:
        """Index of the level whose downsample factor is closest (in log scale) to ``downsample``."""
        return min(range(len(self.levels)), key=lambda k: abs(np.log(self.downsamples[k] / downsample)))

    def image_near(self, downsample: float, max_side: int) -> tuple[Any, float]:
        """The level nearest ``downsample`` and its factor; where even that level is over twice
        ``max_side`` on its longer side, the block-averaged copy of :meth:`image_at` instead."""
        i = self.nearest_level(downsample)
        lv = self.level(i)
        if max(lv.shape[:2]) > 2 * max_side:
            return self.image_at(max_side)
        return lv, self.downsamples[i]

    def image_at(self, max_side: int) -> tuple[np.ndarray, float]:
        """An in-memory image with longer side <= ``max_side`` (a level, further block-averaged if
        needed) and its downsample factor relative to level 0."""
        i = self.level_for(max_side)
        lv, d = self.levels[i], self.downsamples[i]
        f = int(np.ceil(max(lv.shape[:2]) / max_side))
        if f > 1:
            return downscale(self.level(i, 0) if f > 4 else self.level(i), f), d * f
        return np.asarray(self.level(i, max(lv.shape[0] * lv.shape[1], 1))), d


#: a single-level image up to this many pixels is read into memory and given 2x levels
SMALL_IMAGE_PIXELS = 4096 * 4096


def as_pyramid(image: Any, mpp: float | None = None) -> Pyramid:
    """A :class:`Pyramid` from one array, a list of levels, or an object with ``.levels``."""
    if isinstance(image, Pyramid):
        return image
    path = None
    if hasattr(image, "levels"):
        mpp = getattr(image, "mpp", mpp)
        path = getattr(image, "path", None)
        levels = list(image.levels)
    elif isinstance(image, (list, tuple)):
        levels = list(image)
    else:
        levels = [image]
    levels = [lv if lv.ndim == 3 else lv[..., None].repeat(3, -1) for lv in levels]
    if len(levels) == 1 and (isinstance(levels[0], np.ndarray)
                             or levels[0].shape[0] * levels[0].shape[1] <= SMALL_IMAGE_PIXELS):
        # an in-memory image, or one small enough to be (a patch file read lazily): add 2x
        # block-mean levels down to ~256 px, so that work meant for a coarse level does not run
        # at full resolution, whether the image came as an array or from a file
        levels[0] = np.asarray(levels[0])
        while max(levels[-1].shape[:2]) > 512 and min(levels[-1].shape[:2]) >= 2:
            levels.append(downscale(levels[-1], 2))
    h0, w0 = levels[0].shape[:2]
    ds = [float(np.mean([h0 / lv.shape[0], w0 / lv.shape[1]])) for lv in levels]
    return Pyramid(levels, ds, mpp, None if path is None else str(path))


def read_pyramid(path: str | os.PathLike) -> Pyramid:
    """Open an image or slide with :func:`napari_bci.io.slide.open_slide` (lazy levels, mpp).
    Raises :class:`InputError` naming the file."""
    from ..io.slide import open_slide

    p = as_pyramid(open_slide(path))
    p.path = str(path)
    return p


def ensure_rgb(img: Any, name: str = "image") -> Any:
    """Check an ``(H, W, 3)`` RGB array (or a list of them) and raise :class:`InputError` if not."""
    levels = img if isinstance(img, (list, tuple)) else [img]
    for lv in levels:
        if lv.ndim != 3 or lv.shape[2] < 3:
            raise InputError(name, f"expected an RGB image (H, W, 3), got shape {tuple(lv.shape)}")
    return img


def levels_of(image: Any) -> Sequence:
    return as_pyramid(image).levels
