"""A synthetic whole-slide H&E / HER2-IHC pair, generated lazily tile by tile.

Every pyramid level of both sections is a dask array whose chunks are rendered on demand from
the procedural scene (:mod:`._scene`): the H&E directly, the IHC by evaluating the same scene
through the known consecutive-section transform. Coarse levels are rendered at their own
resolution (never by reducing level 0), so a thumbnail costs a thumbnail. Tiles are rendered
with a margin and aligned 8x8 JPEG blocks, so neighbouring tiles join without seams.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..transform import Transform
from ._scene import Frame, Scene, check_level, render_window
from .synthetic import make_transform

__all__ = ["WSIPair", "make_wsi_pair", "level_shapes"]


def level_shapes(size: tuple[int, int], tile: int) -> list[tuple[int, int]]:
    """Level 0 first, each level half the previous (ceil), down to one tile."""
    h, w = size
    out = [(h, w)]
    while max(h, w) > tile:
        h, w = -(-h // 2), -(-w // 2)
        out.append((h, w))
    return out


@dataclass
class WSIPair:
    he_levels: list
    ihc_levels: list
    mpp: float
    her2: str
    transform: Transform  # H&E (moving) -> IHC (fixed), level-0 (x, y) px
    seed: int
    tile: int
    scene: Scene

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.he_levels[0].shape[:2])

    def render(self, section: str, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Render any window of a level directly (numpy), without dask."""
        frame = Frame(None if section == "he" else self.transform)
        return render_window(self.scene, section, frame, y0, x0, h, w, d=2**level)

    def registered_he_levels(self) -> list:
        """The H&E section as a lazy pyramid in the IHC's frame: registered by the pair's known
        transform, rendered (not resampled) like the IHC, so each pixel shows the H&E of the
        cell the IHC pixel shows."""
        tag = f"{self.seed}-{self.her2}-{self.shape[0]}x{self.shape[1]}-{self.mpp}-{self.tile}"
        return [_level_array(self.scene, "he", Frame(self.transform), lv.shape[:2], 2**k, self.tile,
                             f"synthetic-he-registered-{tag}-L{k}") for k, lv in enumerate(self.ihc_levels)]

    def tumour_centre(self, grid: int = 96) -> tuple[float, float]:
        """IHC-frame level-0 ``(y, x)`` px of a point deep in a tumour nest, in tissue: where the
        real IHC shows membranes (the scene's nest field, sampled on a ``grid`` x ``grid`` net and
        smoothed over about 150 um so the point sits in a large nest, not on a sliver)."""
        from scipy import ndimage

        h, w = self.shape
        ys, xs = (np.arange(grid) + 0.5) * h / grid, (np.arange(grid) + 0.5) * w / grid
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        pts = np.stack([xx.ravel(), yy.ravel()], -1)
        he = self.transform.backward(pts) * self.mpp
        f = self.scene.fields(he[:, 0], he[:, 1], ("nest", "tissue", "lumen"))
        score = np.where(f["tissue"] > 0.5, f["nest"], -1.0).reshape(grid, grid)
        sigma = max(1.0, 150.0 / self.mpp / (h / grid))
        score = ndimage.gaussian_filter(score, sigma)
        margin = grid // 10  # keep away from the slide's edge
        inner = score[margin:-margin, margin:-margin]
        iy, ix = np.unravel_index(int(np.argmax(inner)), inner.shape)
        return float(ys[iy + margin]), float(xs[ix + margin])

    def to_json(self) -> dict:
        return {
            "her2": self.her2,
            "mpp": self.mpp,
            "seed": self.seed,
            "tile": self.tile,
            "levels": [list(a.shape[:2]) for a in self.he_levels],
            "transform": self.transform.to_dict(),
        }


def _level_array(scene: Scene, section: str, frame: Frame, shape, d: int, tile: int, name: str):
    import dask.array as da

    h, w = shape
    chunks = (tuple(min(tile, h - y) for y in range(0, h, tile)),
              tuple(min(tile, w - x) for x in range(0, w, tile)), (3,))

    def block(block_info=None):
        (y0, y1), (x0, x1), _ = block_info[None]["array-location"]
        return render_window(scene, section, frame, y0, x0, y1 - y0, x1 - x0, d=d)

    return da.map_blocks(block, chunks=chunks, dtype=np.uint8, name=name, meta=np.empty((0, 0, 0), np.uint8))


def make_wsi_pair(size=16384, seed: int = 0, her2: str = "2+", mpp: float = 0.5, tile: int = 512) -> WSIPair:
    """A lazy synthetic whole-slide pair of ``size`` (int or (h, w)) level-0 pixels."""
    her2 = check_level(her2)
    h, w = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    if tile % 16 or tile < 64:
        raise ValueError(f"tile must be a multiple of 16 and at least 64, got {tile}")
    if min(h, w) < tile:
        raise ValueError(f"size must be at least one tile ({tile} px), got {(h, w)}")
    scene = Scene(seed, her2, mpp, kind="slide", extent_um=(w * mpp, h * mpp))
    shift = max(8.0, 0.006 * max(h, w))
    spacing = int(max(32, 2 ** round(np.log2(max(h, w) / 128))))
    tf = make_transform(seed, (h, w), mpp, max_rot_deg=3.0, max_shift_px=shift, spacing=spacing)
    shapes = level_shapes((h, w), tile)
    tag = f"{seed}-{her2}-{h}x{w}-{mpp}-{tile}"
    he, ihc = [], []
    for k, shp in enumerate(shapes):
        he.append(_level_array(scene, "he", Frame(None), shp, 2**k, tile, f"synthetic-he-{tag}-L{k}"))
        ihc.append(_level_array(scene, "ihc", Frame(tf), shp, 2**k, tile, f"synthetic-ihc-{tag}-L{k}"))
    return WSIPair(he, ihc, float(mpp), her2, tf, int(seed), int(tile), scene)
