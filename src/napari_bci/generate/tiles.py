"""Tile computation shared by every runner: this process, batch output and dask workers.

:func:`compute_tiles` runs a :class:`~napari_bci.generate.engine.TileEngine` over a list of tile
indices and reports unreadable tiles with their coordinates; :func:`generate_image` and
:func:`patch_image` give the whole-image virtual IHC of an in-memory image or a patch file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import BCIError, Cancelled, InputError, ModelError
from .engine import TileEngine, cancel_requested


@dataclass
class TileFailure:
    """A tile whose input could not be read (or generated), reported with its coordinates."""

    index: tuple[int, int]
    box: tuple[int, int, int, int]  # y0, y1, x0, x1 at the generation level
    level: int
    downsample: float
    error: str

    def describe(self, source: Any) -> str:
        y0, y1, x0, x1 = self.box
        ds = self.downsample
        return (f"tile ({self.index[0]}, {self.index[1]}) at level {self.level} pixels y={y0}:{y1}, x={x0}:{x1} "
                f"(level-0 x={int(x0 * ds)}, y={int(y0 * ds)}): {self.error}")

    def as_dict(self) -> dict:
        y0, y1, x0, x1 = self.box
        return {"tile": list(self.index), "level": self.level, "y": y0, "x": x0, "height": y1 - y0,
                "width": x1 - x0, "level0_x": int(x0 * self.downsample), "level0_y": int(y0 * self.downsample),
                "error": self.error}



def tile_failure(engine, idx, exc: BaseException) -> TileFailure:
    """A :class:`TileFailure` for tile ``idx`` of ``engine``'s grid."""
    msg = str(exc) or type(exc).__name__
    if not isinstance(exc, BCIError):
        msg = f"{type(exc).__name__}: {msg}"
    return TileFailure(tuple(int(i) for i in idx), engine.grid.core(idx), engine.level,
                       float(engine.downsample[1]), " ".join(msg.split()))


#: ``(index, tile or None, failure or None)``; ``None`` tile = failed and skipped (white).
Result = tuple[tuple[int, int], "np.ndarray | None", "TileFailure | None"]


def compute_tiles(engine, todo: Sequence[tuple[int, int]], *, cancel: Any = None) -> Iterator[Result]:
    """Compute ``todo`` with ``engine`` batch by batch, in the given order. A batch whose input
    cannot be read is retried tile by tile so that the failing tile is found (and reported with
    its coordinates); generator failures (:class:`ModelError`) propagate. Used in this process
    and, unchanged, by dask workers."""
    i = 0
    while i < len(todo):
        if cancel_requested(cancel):
            raise Cancelled("generation cancelled")
        chunk = [(int(a), int(b)) for a, b in todo[i:i + max(1, engine.batch_size)]]
        try:
            got = dict(engine.generate(chunk, use_cache=False))
        except (ModelError, Cancelled):
            raise
        except Exception:
            got = None
        if got is not None:
            for idx in chunk:
                yield idx, got[idx], None
        else:
            for idx in chunk:
                try:
                    tile = dict(engine.generate([idx], use_cache=False))[idx]
                except (ModelError, Cancelled):
                    raise
                except Exception as e:
                    yield idx, None, tile_failure(engine, idx, e)
                else:
                    yield idx, tile, None
        i += len(chunk)



def generate_image(generator, image, *, tile=None, batch_size=None, cancel=None, progress=None):
    """Whole-image virtual IHC of an in-memory ``(H, W, 3)`` image through the tile engine;
    returns ``(output, engine)``."""
    from .cache import TileCache

    eng = TileEngine(generator, image, tile=tile, batch_size=batch_size, cache=TileCache(64 * 2**20))
    return eng.compute_all(cancel=cancel, progress=progress), eng


def patch_image(generator, path: Path, *, tile=None, batch_size=None):
    """Virtual IHC of the patch file ``path`` and the generator's out-of-domain warning on it
    (None: within its domain, or no domain recorded), or the :class:`InputError` that reading it
    raised (so a folder run can list it and go on)."""
    from ..io.patches import read_patch
    from ..models.domain import check_generator_domain

    try:
        img = np.asarray(read_patch(path))
    except InputError as e:
        return e
    out = generate_image(generator, img, tile=tile, batch_size=batch_size)[0]
    return out, check_generator_domain(generator, img)
