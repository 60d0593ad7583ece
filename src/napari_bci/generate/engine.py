"""The tile engine: the one place that tiles images for generation.

Shared by the viewer (visible tiles, centre first), the CLI (whole images) and batch/dask
runners (lists of tile indices). It knows

* the generation level: the pyramid level whose mpp is closest to the generator's training
  mpp (level 0 when either is unknown);
* the tile grid at that level: core tiles of ``tile`` px, each read with ``halo`` px of context
  on every side (mirror-padded at the image border) and cropped back to its core, so each output
  tile is a pure function of its input window (seam-free when the halo covers the receptive
  field; cacheable and computable in any order or process);
* batching, the device policy and out-of-memory handling (halve the batch, then CPU);
* a byte-budgeted LRU cache keyed by (image, model, level, tile size, tile index);
* world placement: output pixel ``(i, j)`` of the generation level sits exactly over the H&E
  pixels it was computed from (:attr:`TileEngine.out_scale`, :attr:`TileEngine.out_translate`).

Level arrays may be numpy, dask or zarr (anything sliceable that ``np.asarray`` reads).
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from ..errors import Cancelled, InputError, ModelError
from ..models.base import Generator, check_tiles, with_tta
from .cache import TileCache, default_cache
from ..pyramid import pick_level

TileIndex = tuple[int, int]


# -- geometry ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileGrid:
    """Core tiles of ``tile`` px over an ``(height, width)`` level, with ``halo`` px context."""

    height: int
    width: int
    tile: int
    halo: int

    @property
    def shape(self) -> tuple[int, int]:
        return math.ceil(self.height / self.tile), math.ceil(self.width / self.tile)

    def __len__(self) -> int:
        ny, nx = self.shape
        return ny * nx

    def all_indices(self) -> list[TileIndex]:
        ny, nx = self.shape
        return [(ty, tx) for ty in range(ny) for tx in range(nx)]

    def core(self, idx: TileIndex) -> tuple[int, int, int, int]:
        """``(y0, y1, x0, x1)`` of the tile's core, clipped to the level."""
        ty, tx = idx
        y0, x0 = ty * self.tile, tx * self.tile
        return y0, min(y0 + self.tile, self.height), x0, min(x0 + self.tile, self.width)

    def in_box(self, y0: float, y1: float, x0: float, x1: float) -> list[TileIndex]:
        """Tiles intersecting the pixel box ``[y0, y1) x [x0, x1)`` (clipped to the level)."""
        ny, nx = self.shape
        ty0, ty1 = max(0, int(math.floor(y0 / self.tile))), min(ny, int(math.ceil(y1 / self.tile)))
        tx0, tx1 = max(0, int(math.floor(x0 / self.tile))), min(nx, int(math.ceil(x1 / self.tile)))
        return [(ty, tx) for ty in range(ty0, ty1) for tx in range(tx0, tx1)]

    def centre_first(self, indices: Iterable[TileIndex], centre: tuple[float, float] | None = None) -> list[TileIndex]:
        """``indices`` sorted by distance of their centres from ``centre`` (pixels; default: the
        centre of the indices' bounding box)."""
        idx = list(dict.fromkeys(indices))
        if not idx:
            return idx
        if centre is None:
            ys = [i[0] for i in idx]
            xs = [i[1] for i in idx]
            centre = ((min(ys) + max(ys) + 1) * self.tile / 2, (min(xs) + max(xs) + 1) * self.tile / 2)
        cy, cx = centre
        return sorted(idx, key=lambda i: ((i[0] + 0.5) * self.tile - cy) ** 2 + ((i[1] + 0.5) * self.tile - cx) ** 2)


def read_window(arr: Any, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """``arr[y0:y1, x0:x1, :3]`` as uint8 numpy, mirror-padded where the box leaves the image."""
    h, w = arr.shape[:2]
    cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
    if cy1 <= cy0 or cx1 <= cx0:
        raise ValueError("window outside the image")
    win = np.asarray(arr[cy0:cy1, cx0:cx1])
    if win.ndim == 2:
        win = np.repeat(win[..., None], 3, axis=-1)
    win = win[..., :3]
    if win.dtype != np.uint8:
        win = np.clip(win, 0, 255).astype(np.uint8)
    pads = [(cy0 - y0, y1 - cy1), (cx0 - x0, x1 - cx1)]
    for axis, (a, b) in enumerate(pads):
        while a > 0 or b > 0:  # reflect as far as the data allows, repeatedly for tiny images
            size = win.shape[axis]
            pa, pb = min(a, size - 1) if size > 1 else a, min(b, size - 1) if size > 1 else b
            mode = "reflect" if size > 1 else "edge"
            width = [(0, 0)] * 3
            width[axis] = (pa, pb)
            win = np.pad(win, width, mode=mode)
            a, b = a - pa, b - pb
    return win


# -- the engine ---------------------------------------------------------------------------------------
class TileEngine:
    """Generate virtual IHC tile by tile for one image (a pyramid) with one generator.

    Parameters
    ----------
    generator: the :class:`Generator` (see :func:`napari_bci.models.registry.load_generator`)
    levels: one ``(H, W, 3)`` array or a list of pyramid levels (level 0 first)
    mpp: level-0 microns per pixel (None: unknown; then level 0 is used)
    image_id: cache key of the image (default: derived from the array object)
    level: force a pyramid level (default: the one matching ``generator.mpp``)
    tile, halo: override the generator's preferred sizes
    batch_size: tiles per forward pass (default: 8 on accelerators, 4 on CPU)
    scale, translate: the H&E layer's world transform (level-0 pixels -> world)
    on_warning: called with a message when the engine degrades (OOM -> smaller batch / CPU)
    blend: feathered blending for generators whose output depends on the whole input window
        (instance norm: per-window statistics). The model then runs on windows of ``tile`` px at
        a stride of ``tile / 2`` and each output pixel is the triangular-weighted mean of the two
        windows covering it along each axis (weights sum to one), so tile borders fall where a
        window's weight is zero: no seams, and each tile stays a pure function of its input
        (9 windows per tile, shared with neighbours through the cache). Default: on for
        window-dependent generators (``generator.window_dependent``: instance norm, SimAM, a
        global style vector), else off (halo cropping is exact for the others). A level that
        fits in one window (the generator's native ``window``, else one tile of a window-dependent
        model) runs as a single pass on the whole image (no halo, no blending), so a native-size
        patch gives exactly the upstream forward pass.
    tta: run the generator with test-time augmentation (:func:`napari_bci.models.base.with_tta`)
    """

    def __init__(self, generator: Generator, levels: Any, *, mpp: float | None = None,
                 image_id: Any = None, level: int | None = None, tile: int | None = None,
                 halo: int | None = None, batch_size: int | None = None, cache: TileCache | None = None,
                 scale: Sequence[float] = (1.0, 1.0), translate: Sequence[float] = (0.0, 0.0),
                 on_warning: Callable[[str], None] | None = None, blend: bool | None = None,
                 tta: bool = False):
        if tta:
            generator = with_tta(generator)
        self.generator = generator
        self.levels = list(levels) if isinstance(levels, (list, tuple)) else [levels]
        for i, lv in enumerate(self.levels):
            if len(lv.shape) not in (2, 3) or (len(lv.shape) == 3 and lv.shape[2] not in (3, 4)):
                raise InputError(None, f"level {i} has shape {tuple(lv.shape)}; expected (H, W, 3) RGB")
        self.mpp = mpp
        self.level = pick_level(self.levels, mpp, generator.mpp) if level is None else int(level)
        if not 0 <= self.level < len(self.levels):
            raise InputError(None, f"level {self.level} does not exist (image has {len(self.levels)})")
        self.array = self.levels[self.level]
        mult = max(1, int(getattr(generator, "multiple", 1)))
        # tile origins and halo on the model's stride grid keep tiling exact (shift equivariance);
        # for U-Nets (multiple 128/256) the window is only padded up to the multiple
        align = mult if mult <= 16 else 1
        t = int(tile or generator.tile)
        t = max(align, int(round(t / align)) * align)
        hl = int(generator.halo if halo is None else halo)
        hl = int(math.ceil(hl / align) * align) if hl else 0
        dependent = bool(getattr(generator, "window_dependent", False)) or \
            (getattr(generator, "config", None) or {}).get("norm") == "instance"
        lh, lw = int(self.array.shape[0]), int(self.array.shape[1])
        fits = int(getattr(generator, "window", None) or (t if dependent else 0))
        if tile is None and halo is None and lh <= fits and lw <= fits:  # one pass, as upstream runs a patch
            blend, hl, t = False, 0, max(align, int(math.ceil(max(lh, lw) / align)) * align)
        if blend is None:
            blend = dependent
        self.blend = bool(blend)
        if self.blend:  # windows at a stride of half a tile
            t = max(2 * align, int(round(t / (2 * align))) * 2 * align)
        self.grid = TileGrid(int(self.array.shape[0]), int(self.array.shape[1]), t, hl)
        self.multiple = mult
        self.image_id = image_id if image_id is not None else f"array-{id(self.levels[0])}-{tuple(self.levels[0].shape)}"
        self.model_key = f"{generator.name}:{getattr(generator, 'source', '') or id(generator)}"
        self.cache = cache if cache is not None else default_cache()
        dev = getattr(generator, "device", "cpu")
        self.batch_size = int(batch_size or (8 if dev != "cpu" else 4))
        h0, w0 = self.levels[0].shape[:2]
        self.downsample = (h0 / self.array.shape[0], w0 / self.array.shape[1])
        s, tr = tuple(float(v) for v in scale[-2:]), tuple(float(v) for v in translate[-2:])
        self.he_scale, self.he_translate = s, tr
        self.out_scale = (s[0] * self.downsample[0], s[1] * self.downsample[1])
        self.out_translate = (tr[0] + s[0] * (self.downsample[0] - 1) / 2,
                              tr[1] + s[1] * (self.downsample[1] - 1) / 2)
        self.on_warning = on_warning or (lambda msg: warnings.warn(msg, RuntimeWarning, stacklevel=3))
        self.computed = 0
        self.cache_hits = 0
        self._lock = threading.Lock()

    # -- geometry helpers ----------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """Output shape (H, W) at the generation level."""
        return self.grid.height, self.grid.width

    def key(self, idx: TileIndex) -> tuple:
        return (self.image_id, self.model_key, self.level, self.grid.tile, self.grid.halo, self.blend,
                int(idx[0]), int(idx[1]))

    def world_to_pixel(self, y: float, x: float) -> tuple[float, float]:
        """World (y, x) -> generation-level pixel coordinates (continuous, pixel centres at .0)."""
        return ((y - self.out_translate[0]) / self.out_scale[0], (x - self.out_translate[1]) / self.out_scale[1])

    def tiles_in_world_box(self, box: Sequence[float], max_tiles: int | None = None) -> list[TileIndex]:
        """Tiles visible in the world box ``(y0, y1, x0, x1)``, centre first (at most ``max_tiles``)."""
        y0, y1, x0, x1 = box
        py0, px0 = self.world_to_pixel(y0, x0)
        py1, px1 = self.world_to_pixel(y1, x1)
        idx = self.grid.in_box(py0 + 0.5, py1 + 0.5, px0 + 0.5, px1 + 0.5)
        idx = self.grid.centre_first(idx, ((py0 + py1) / 2 + 0.5, (px0 + px1) / 2 + 0.5))
        return idx[:max_tiles] if max_tiles else idx

    def is_cached(self, idx: TileIndex) -> bool:
        return self.key(idx) in self.cache

    def cached(self, idx: TileIndex) -> np.ndarray | None:
        return self.cache.get(self.key(idx))

    def tile_input(self, idx: TileIndex) -> np.ndarray:
        """The generator input of a tile: full ``tile + 2 halo`` window (padded to the model's multiple)."""
        g = self.grid
        ty, tx = idx
        y0, x0 = ty * g.tile - g.halo, tx * g.tile - g.halo
        size = g.tile + 2 * g.halo
        size += (-size) % self.multiple
        return read_window(self.array, y0, y0 + size, x0, x0 + size)

    def _window_input(self, win: TileIndex) -> np.ndarray:
        """Generator input of blend window ``win``: core ``[a*s, a*s + tile)`` per axis (stride
        ``s = tile / 2``) plus the halo, padded to the model's multiple."""
        g, s = self.grid, self.grid.tile // 2
        y0, x0 = win[0] * s - g.halo, win[1] * s - g.halo
        size = g.tile + 2 * g.halo
        size += (-size) % self.multiple
        return read_window(self.array, y0, y0 + size, x0, x0 + size)

    def _blend_tiles(self, chunk: list[TileIndex]) -> list[np.ndarray]:
        """Feathered tiles of ``chunk`` from their 3x3 half-offset windows (cached per window)."""
        g, s, h = self.grid, self.grid.tile // 2, self.grid.halo
        wkey = lambda w: (self.image_id, self.model_key, self.level, g.tile, h, "window", w[0], w[1])  # noqa: E731
        wins = {}
        # windows starting past the image's end only feather pixels beyond the last core: skipped
        needed = list(dict.fromkeys((2 * ty + i, 2 * tx + j) for ty, tx in chunk for i in (-1, 0, 1) for j in (-1, 0, 1)
                                    if (2 * ty + i) * s < g.height and (2 * tx + j) * s < g.width))
        todo = []
        for w in needed:
            hit = self.cache.get(wkey(w))
            if hit is None:
                todo.append(w)
            else:
                wins[w] = hit
        for i in range(0, len(todo), max(self.batch_size, 1)):
            part = todo[i:i + max(self.batch_size, 1)]
            out = self._run(np.stack([self._window_input(w) for w in part]))
            for w, o in zip(part, out):
                wins[w] = np.ascontiguousarray(o[h:h + g.tile, h:h + g.tile])
                self.cache.put(wkey(w), wins[w])
        # triangular weight of a window at offset q in [0, tile) of its core: 1 - |q + 0.5 - s| / s
        ramp = (1.0 - np.abs(np.arange(g.tile) + 0.5 - s) / s).astype(np.float32)
        tiles = []
        for ty, tx in chunk:
            y0, y1, x0, x1 = g.core((ty, tx))
            acc = np.zeros((g.tile, g.tile, 3), np.float32)
            for i in (-1, 0, 1):
                for j in (-1, 0, 1):
                    a, b = 2 * ty + i, 2 * tx + j
                    # the part of window (a, b)'s core inside this tile, in tile and window coordinates
                    ty0, ty1 = max(a * s - ty * g.tile, 0), min(a * s + g.tile - ty * g.tile, g.tile)
                    tx0, tx1 = max(b * s - tx * g.tile, 0), min(b * s + g.tile - tx * g.tile, g.tile)
                    if ty1 <= ty0 or tx1 <= tx0 or (a, b) not in wins:
                        continue
                    wy0, wx0 = ty * g.tile + ty0 - a * s, tx * g.tile + tx0 - b * s
                    wy = ramp[wy0:wy0 + ty1 - ty0, None, None]
                    wx = ramp[None, wx0:wx0 + tx1 - tx0, None]
                    part = wins[(a, b)][wy0:wy0 + ty1 - ty0, wx0:wx0 + tx1 - tx0]
                    acc[ty0:ty1, tx0:tx1] += part * (wy * wx)
            tiles.append(np.clip(np.rint(acc[: y1 - y0, : x1 - x0]), 0, 255).astype(np.uint8))
        return tiles

    # -- generation ------------------------------------------------------------------------------
    def _run(self, batch: np.ndarray) -> np.ndarray:
        """Run the generator on a batch with the OOM policy: halve the batch, then go to CPU."""
        from ..models.device import empty_cache, is_oom

        out: list[np.ndarray] = []
        i = 0
        while i < len(batch):
            n = min(self.batch_size, len(batch) - i)
            try:
                res = self.generator(batch[i:i + n])
            except Exception as e:
                if not is_oom(e):
                    if isinstance(e, (ModelError, Cancelled)):
                        raise
                    raise ModelError(f"generator '{self.generator.name}' failed: {type(e).__name__}: {e}") from e
                dev = getattr(self.generator, "device", "cpu")
                empty_cache(dev)
                if self.batch_size > 1:
                    self.batch_size = max(1, self.batch_size // 2)
                    self.on_warning(f"out of memory on {dev}: batch size reduced to {self.batch_size}")
                    continue
                if dev != "cpu":
                    self.on_warning(f"out of memory on {dev} even with batch size 1: falling back to CPU")
                    self.generator.to("cpu")
                    continue
                raise ModelError(f"generator '{self.generator.name}' ran out of memory on CPU") from e
            res = check_tiles(res)
            if res.shape[:3] != batch[i:i + n].shape[:3]:
                raise ModelError(f"generator '{self.generator.name}' returned shape {res.shape} "
                                 f"for input {batch[i:i + n].shape}")
            out.append(res)
            i += n
        return np.concatenate(out) if len(out) > 1 else out[0]

    def _crop(self, idx: TileIndex, out: np.ndarray) -> np.ndarray:
        y0, y1, x0, x1 = self.grid.core(idx)
        h = self.grid.halo
        return np.ascontiguousarray(out[h:h + (y1 - y0), h:h + (x1 - x0)])

    def generate(self, indices: Iterable[TileIndex], *, cancel: Any = None,
                 progress: Callable[[int, int], None] | None = None,
                 use_cache: bool = True) -> Iterator[tuple[TileIndex, np.ndarray]]:
        """Yield ``(index, tile)`` for ``indices`` in order of availability: cached tiles first,
        then computed ones batch by batch in the given order. ``cancel`` (an Event or a callable
        returning True) is checked between batches; when set, the iterator stops.
        ``progress(done, total)`` is called after each batch."""
        indices = list(dict.fromkeys((int(a), int(b)) for a, b in indices))
        ny, nx = self.grid.shape
        for ty, tx in indices:
            if not (0 <= ty < ny and 0 <= tx < nx):
                raise InputError(None, f"tile ({ty}, {tx}) outside the {ny}x{nx} grid")
        total, done = len(indices), 0
        todo = []
        for idx in indices:
            hit = self.cache.get(self.key(idx)) if use_cache else None
            if hit is not None:
                self.cache_hits += 1
                done += 1
                yield idx, hit
            else:
                todo.append(idx)
        if progress and done:
            progress(done, total)
        step = max(self.batch_size, 1)
        i = 0
        while i < len(todo):
            if cancel_requested(cancel):
                return
            chunk = todo[i:i + step]
            if self.blend:
                tiles = self._blend_tiles(chunk)
            else:
                batch = np.stack([self.tile_input(idx) for idx in chunk])
                if cancel_requested(cancel):
                    return
                tiles = [self._crop(idx, o) for idx, o in zip(chunk, self._run(batch))]
            for idx, tile in zip(chunk, tiles):
                self.cache.put(self.key(idx), tile)
                with self._lock:
                    self.computed += 1
                done += 1
                yield idx, tile
            if progress:
                progress(done, total)
            i += len(chunk)
            step = max(self.batch_size, 1)

    def compute(self, indices: Iterable[TileIndex], *, cancel: Any = None,
                progress: Callable[[int, int], None] | None = None) -> dict[TileIndex, np.ndarray]:
        """All requested tiles as a dict; raises :class:`Cancelled` if cancelled first."""
        indices = list(indices)
        res = dict(self.generate(indices, cancel=cancel, progress=progress))
        if len(res) < len(set(map(tuple, indices))):
            raise Cancelled("generation cancelled")
        return res

    def region(self, y0: int, y1: int, x0: int, x1: int, *, cancel: Any = None,
               progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Generated pixels ``[y0:y1, x0:x1]`` of the generation level (centre tiles first)."""
        y0, x0 = max(0, int(y0)), max(0, int(x0))
        y1, x1 = min(self.grid.height, int(y1)), min(self.grid.width, int(x1))
        if y1 <= y0 or x1 <= x0:
            raise InputError(None, f"empty region [{y0}:{y1}, {x0}:{x1}]")
        out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        idx = self.grid.centre_first(self.grid.in_box(y0, y1, x0, x1))
        for (ty, tx), tile in self.compute(idx, cancel=cancel, progress=progress).items():
            cy0, cy1, cx0, cx1 = self.grid.core((ty, tx))
            sy0, sy1, sx0, sx1 = max(cy0, y0), min(cy1, y1), max(cx0, x0), min(cx1, x1)
            out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = tile[sy0 - cy0:sy1 - cy0, sx0 - cx0:sx1 - cx0]
        return out

    def compute_all(self, **kw: Any) -> np.ndarray:
        """The whole generation level (for images that fit in memory; slides stream instead)."""
        return self.region(0, self.grid.height, 0, self.grid.width, **kw)

    def predict_her2(self, center: tuple[float, float] | None = None) -> np.ndarray | None:
        """The generator's own HER2 probabilities ("0", "1+", "2+", "3+") on its native window
        (``window`` px, 1024 if unset) centred at generation-level pixel ``center`` (default: the
        image centre), clipped to the image; ``None`` for generators without a HER2 head."""
        g = self.generator
        if not getattr(g, "predicts_her2", False):
            return None
        h, w = self.shape
        size = int(getattr(g, "window", None) or 1024)
        cy, cx = center if center is not None else (h / 2, w / 2)
        y0 = int(min(max(cy - size / 2, 0), max(h - size, 0)))
        x0 = int(min(max(cx - size / 2, 0), max(w - size, 0)))
        win = read_window(self.array, y0, min(y0 + size, h), x0, min(x0 + size, w))
        m = self.multiple
        ph, pw = (-win.shape[0]) % m, (-win.shape[1]) % m
        if ph or pw:
            win = read_window(win, 0, win.shape[0] + ph, 0, win.shape[1] + pw)
        return np.asarray(g.predict_her2(win[None]))[0]

    def stats(self) -> dict:
        return {"computed": self.computed, "cache_hits": self.cache_hits, "batch_size": self.batch_size, "blend": self.blend,
                "level": self.level, "tile": self.grid.tile, "halo": self.grid.halo,
                "device": getattr(self.generator, "device", "cpu"), "cache": self.cache.stats()}


def cancel_requested(cancel: Any) -> bool:
    """Whether ``cancel`` (None, a ``threading.Event``-like object or a callable) asks to stop."""
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())
