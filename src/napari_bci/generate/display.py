"""The viewer's display store: a multiscale RGB output that fills in tile by tile.

Headless (no Qt): the Virtual IHC widget hands :class:`OutputPyramid` levels to napari as a
multiscale image and writes tiles (and their reductions, prepared off the GUI thread with
:func:`tile_pyramid`) as the engine delivers them.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Sequence

import numpy as np

from ..pyramid import reduce2

TileIndex = tuple[int, int]


def tile_pyramid(tile: np.ndarray, n_levels: int) -> list[np.ndarray]:
    """``tile`` and its 2x reductions (:func:`napari_bci.pyramid.reduce2`; ``n_levels`` arrays)."""
    out = [np.asarray(tile)]
    for _ in range(1, n_levels):
        out.append(reduce2(out[-1]))
    return out


def _blank(h: int, w: int, channels: int) -> np.ndarray:
    """Not generated yet: white, and transparent when there is an alpha channel."""
    a = np.full((h, w, channels), 255, np.uint8)
    if channels == 4:
        a[..., 3] = 0
    return a


def _put(target: np.ndarray, src: np.ndarray) -> None:
    """Copy RGB ``src`` into ``target`` (RGB, or RGBA made opaque)."""
    target[..., :3] = src[..., :3]
    if target.shape[-1] == 4:
        target[..., 3] = 255


class TiledLevel:
    """An ``(H, W, C)`` uint8 array-like (C = 3, or 4 with pending pixels transparent) stored as
    a dict of ``block`` x ``block`` tiles, blank where nothing was written. napari slices it like
    an array; slicing assembles the blocks."""

    def __init__(self, shape: tuple[int, int], block: int, store: "OutputPyramid", level: int, channels: int = 3):
        self.channels = int(channels)
        self.shape = (int(shape[0]), int(shape[1]), self.channels)
        self.dtype, self.ndim = np.dtype(np.uint8), 3
        self.size = int(np.prod(self.shape))
        self.block, self._store, self._level = int(block), store, level
        self.blocks: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return self.shape[0]

    def _range(self, k: Any, dim: int) -> tuple[int, int, int, bool]:
        if isinstance(k, (int, np.integer)):
            i = int(k) + (dim if k < 0 else 0)
            return i, i + 1, 1, True
        start, stop, step = k.indices(dim)
        if step < 0:
            raise IndexError("negative steps are not supported")
        return start, max(start, stop), step, False

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        y0, y1, sy, iy = self._range(key[0], self.shape[0])
        x0, x1, sx, ix = self._range(key[1], self.shape[1])
        out = _blank(y1 - y0, x1 - x0, self.channels)
        b = self.block
        for by in range(y0 // b, (y1 - 1) // b + 1 if y1 > y0 else 0):
            for bx in range(x0 // b, (x1 - 1) // b + 1 if x1 > x0 else 0):
                blk = self.blocks.get((by, bx))
                if blk is None:
                    continue
                self._store._touch(self._level, (by, bx))
                oy0, ox0 = max(y0, by * b), max(x0, bx * b)
                oy1, ox1 = min(y1, by * b + blk.shape[0]), min(x1, bx * b + blk.shape[1])
                if oy1 > oy0 and ox1 > ox0:
                    out[oy0 - y0:oy1 - y0, ox0 - x0:ox1 - x0] = blk[oy0 - by * b:oy1 - by * b, ox0 - bx * b:ox1 - bx * b]
        out = out[::sy, ::sx]
        if key[2] != slice(None):
            out = out[:, :, key[2]]
        if iy and ix:
            return out[0, 0]
        return out[0] if iy else out[:, 0] if ix else out

    def __array__(self, dtype=None, copy=None):
        a = self[:, :]
        return a if dtype is None else a.astype(dtype)

    def _block_for_write(self, by: int, bx: int) -> np.ndarray:
        blk = self.blocks.get((by, bx))
        if blk is None:
            b = self.block
            h, w = min(b, self.shape[0] - by * b), min(b, self.shape[1] - bx * b)
            blk = self.blocks[(by, bx)] = _blank(h, w, self.channels)
            self._store._added(self._level, (by, bx), blk.nbytes)
        else:
            self._store._touch(self._level, (by, bx))
        return blk


class OutputPyramid:
    """Multiscale RGB output that fills in tile by tile: level 0 is the generation level, each
    further level halves it (area mean) down to about ``min_size`` px. Large levels are
    :class:`TiledLevel` dicts of blocks under one LRU byte budget (``max_bytes``; evicting a
    level-0 block calls ``on_evict(tile_index)`` so the caller can regenerate it when seen
    again), small ones plain numpy. Unwritten pixels are white, or transparent with
    ``transparent=True`` (RGBA levels: the H&E under a pending tile stays visible). :meth:`write_pyramid` only
    copies prepared blocks (:func:`tile_pyramid`, computed off the GUI thread)."""

    def __init__(self, shape: tuple[int, int], tile: int, *, min_size: int = 512,
                 memory_bytes: int = 4 * 2**20, max_bytes: int = 1024 * 2**20,
                 on_evict: Callable[[TileIndex], None] | None = None, transparent: bool = False):
        self.channels = 4 if transparent else 3
        self.tile = int(tile)
        self.max_bytes = int(max_bytes)
        self.on_evict = on_evict
        self.nbytes = 0
        self._lru: OrderedDict = OrderedDict()
        self.levels: list[Any] = []
        h, w = int(shape[0]), int(shape[1])
        k = 0
        while True:
            if h * w * self.channels > memory_bytes:
                self.levels.append(TiledLevel((h, w), self.tile, self, k, self.channels))
            else:
                self.levels.append(_blank(h, w, self.channels))
            k += 1
            if max(h, w) <= min_size or self.tile >> k < 1 or min(h, w) < 2:
                break
            h, w = (h + 1) // 2, (w + 1) // 2

    # LRU bookkeeping for TiledLevel blocks
    def _touch(self, level: int, key: tuple[int, int]) -> None:
        k = (level, key)
        if k in self._lru:
            self._lru.move_to_end(k)

    def _added(self, level: int, key: tuple[int, int], nbytes: int) -> None:
        self._lru[(level, key)] = nbytes
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes and len(self._lru) > 1:
            (lv, bkey), nb = self._lru.popitem(last=False)
            self.levels[lv].blocks.pop(bkey, None)
            self.nbytes -= nb
            if lv == 0 and self.on_evict is not None:
                self.on_evict(bkey)

    def write_pyramid(self, y0: int, x0: int, pyramid: Sequence[np.ndarray]) -> None:
        """Copy a tile at level-0 pixel ``(y0, x0)`` (tile-aligned) and its reductions
        (``tile_pyramid(tile, len(self.levels))``) into every level."""
        for k, (lv, blk) in enumerate(zip(self.levels, pyramid)):
            ly, lx = y0 >> k, x0 >> k
            hh, ww = min(blk.shape[0], lv.shape[0] - ly), min(blk.shape[1], lv.shape[1] - lx)
            if hh <= 0 or ww <= 0:
                continue
            if isinstance(lv, TiledLevel):
                # a level-k block holds several reduced tiles (or a tile spans blocks)
                b = lv.block
                for by in range(ly // b, (ly + hh - 1) // b + 1):
                    for bx in range(lx // b, (lx + ww - 1) // b + 1):
                        target = lv._block_for_write(by, bx)
                        sy0, sx0 = max(ly, by * b), max(lx, bx * b)
                        sy1 = min(ly + hh, by * b + target.shape[0])
                        sx1 = min(lx + ww, bx * b + target.shape[1])
                        _put(target[sy0 - by * b:sy1 - by * b, sx0 - bx * b:sx1 - bx * b],
                             blk[sy0 - ly:sy1 - ly, sx0 - lx:sx1 - lx])
            else:
                _put(lv[ly:ly + hh, lx:lx + ww], blk[:hh, :ww])

    def write(self, y0: int, x0: int, tile: np.ndarray) -> None:
        """Write a tile at level-0 pixel ``(y0, x0)`` and its downsampled copies."""
        self.write_pyramid(y0, x0, tile_pyramid(tile, len(self.levels)))

    def close(self) -> None:
        self.levels = []
        self._lru.clear()
        self.nbytes = 0
