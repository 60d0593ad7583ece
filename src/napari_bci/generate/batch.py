"""Whole slides in batch: virtual IHC for a slide written as a pyramidal OME-TIFF, resumable.

``generate_slide(source, model, out)`` runs the tile engine (:mod:`napari_bci.generate.engine`,
the only code that tiles images) over the tissue tiles of the generation level and streams the
results, in row-major order, into :func:`napari_bci.io.writers.write_pyramid` (tiled, compressed,
pyramidal OME-TIFF; atomic). Background tiles (outside a low-resolution tissue mask) are white.

Resume: every finished tile is also kept, zstd-compressed, in a tile store next to the output
(``OUT.parts/``: ``progress.json`` + ``tiles/<row>_<col>.zst``, each written atomically). A run
that stops (crash, Ctrl-C, cancel, full disk) leaves the store; running the same command again
computes only the missing tiles and yields the same output as an uninterrupted run. The store
is removed once the output is complete.

Peak memory (single process): the pyramid writer's buffers (two level-0 tile rows,
``2 * tile * W * 3`` bytes for output width ``W``, their 2x2 means and the encoder's buffers),
one engine batch (``batch_size * (tile + 2 * halo)^2 * 3`` input bytes and the model's
activations) and the tissue-mask level (at most ``MASK_MAX_PIXELS``). With dask workers add at
most ``window`` results in the reorder buffer. Nothing grows with the slide's height or the
number of tiles (measured in ``benchmarks/bench_batch.py``: 16k -> 32k slides grow less than
the writer alone does).

Distributed runs (``workers=N`` or ``scheduler=ADDRESS``) are in
:mod:`napari_bci.generate.distributed`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import BCIError, Cancelled, InputError, ModelError
from .engine import cancel_requested
from .tiles import Result, TileFailure, compute_tiles, patch_image

OME_SUFFIXES = (".ome.tif", ".ome.tiff")
#: The tissue mask is computed on the coarsest level with at most this many pixels that still
#: gives every tile at least 2x2 mask pixels.
MASK_MAX_PIXELS = 4096 * 4096
#: Bumped when the stored tile format or the meaning of a stored tile changes.
STORE_VERSION = 1
WHITE = 255


# -- tissue mask ------------------------------------------------------------------------------------
def tissue_mask_image(rgb: np.ndarray) -> np.ndarray:
    """Boolean tissue mask of a low-resolution RGB image: Otsu threshold on saturation (clipped
    to [0.04, 0.15] so faint tissue still counts and noise on glass does not), plus dark pixels;
    opened (specks removed), then dilated by one pixel."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    a = np.asarray(rgb)[..., :3].astype(np.float32) / 255.0
    mx, mn = a.max(axis=-1), a.min(axis=-1)
    sat = (mx - mn) / np.maximum(mx, 1e-6)
    if float(sat.max() - sat.min()) > 0.02:
        thr = float(np.clip(threshold_otsu(sat), 0.04, 0.15))
    else:
        thr = 0.15
    mask = (sat > thr) | (mx < 0.6)
    mask = ndimage.binary_opening(mask)  # drop isolated specks (dust, noise on glass)
    return ndimage.binary_dilation(mask)


def _mask_source(levels: Sequence[Any], level: int, tile: int) -> tuple[Any, int]:
    """``(array, stride)``: the coarsest pyramid level usable for the tissue mask (each tile of
    ``level`` still covers >= 2x2 of its pixels), read with ``stride`` if it is still too large."""
    h_gen = levels[level].shape[0]
    best = level
    for k in range(level, len(levels)):
        ds = h_gen / levels[k].shape[0]
        if ds <= tile / 2:
            best = k
    arr = levels[best]
    px = int(arr.shape[0]) * int(arr.shape[1])
    stride = 1
    while px / stride**2 > MASK_MAX_PIXELS:
        stride *= 2
    return arr, stride


def tissue_tiles(levels: Sequence[Any], level: int, grid) -> np.ndarray:
    """``(rows, cols)`` boolean array: which tiles of ``grid`` (at ``level``) contain tissue."""
    arr, stride = _mask_source(levels, level, grid.tile)
    low = np.asarray(arr[::stride, ::stride]) if stride > 1 else np.asarray(arr)
    mask = tissue_mask_image(low)
    mh, mw = mask.shape
    sy, sx = mh / grid.height, mw / grid.width
    ny, nx = grid.shape
    out = np.zeros((ny, nx), bool)
    for ty in range(ny):
        for tx in range(nx):
            y0, y1, x0, x1 = grid.core((ty, tx))
            my0, my1 = int(math.floor(y0 * sy)), max(int(math.ceil(y1 * sy)), int(math.floor(y0 * sy)) + 1)
            mx0, mx1 = int(math.floor(x0 * sx)), max(int(math.ceil(x1 * sx)), int(math.floor(x0 * sx)) + 1)
            out[ty, tx] = bool(mask[my0:my1, mx0:mx1].any())
    return out


# -- the tile store (resume) ------------------------------------------------------------------------
class TileStore:
    """Finished tiles of one output, on disk next to it: ``<out>.parts/``.

    ``progress.json`` holds the run's fingerprint (source, model, level, tile, halo, ...) and
    counters; ``tiles/<row>_<col>.zst`` the zstd-compressed RGB pixels of each finished tile.
    Each file is written to a temporary name and renamed, so a killed run never leaves a
    half-written tile. A store whose fingerprint differs from the current run is discarded.
    """

    def __init__(self, path: str | os.PathLike, fingerprint: dict, *, resume: bool = True):
        import imagecodecs

        self._enc, self._dec = imagecodecs.zstd_encode, imagecodecs.zstd_decode
        self.path = Path(path)
        self.tiles_dir = self.path / "tiles"
        self.fingerprint = fingerprint
        self.resumed = False
        self.discarded = False
        old = self._read_progress()
        if old is not None and (not resume or old.get("fingerprint") != fingerprint):
            self.discarded = True
            shutil.rmtree(self.path, ignore_errors=True)
            old = None
        self.resumed = old is not None
        self.tiles_dir.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        if old is None:
            self.write_progress(done=0, total=None, state="running")

    def _read_progress(self) -> dict | None:
        try:
            return json.loads((self.path / "progress.json").read_text())
        except (OSError, ValueError):
            return None

    def _file(self, idx) -> Path:
        return self.tiles_dir / f"{int(idx[0])}_{int(idx[1])}.zst"

    def done(self) -> set[tuple[int, int]]:
        out = set()
        for p in self.tiles_dir.glob("*.zst"):
            try:
                a, b = p.stem.split("_")
                out.add((int(a), int(b)))
            except ValueError:
                continue
        return out

    def put(self, idx, tile: np.ndarray) -> None:
        dst = self._file(idx)
        tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:6]}.tmp")
        data = self._enc(np.ascontiguousarray(tile, dtype=np.uint8).tobytes(), level=1)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, dst)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def get(self, idx, shape: tuple[int, int]) -> np.ndarray | None:
        """The stored tile, or None if absent or unreadable (then it is recomputed)."""
        p = self._file(idx)
        try:
            raw = self._dec(p.read_bytes())
            return np.frombuffer(raw, np.uint8).reshape(shape[0], shape[1], 3)
        except FileNotFoundError:
            return None
        except Exception:
            p.unlink(missing_ok=True)
            return None

    def write_progress(self, **info: Any) -> None:
        doc = {"version": STORE_VERSION, "fingerprint": self.fingerprint, "updated": time.time(), **info}
        self.path.mkdir(parents=True, exist_ok=True)
        dst = self.path / "progress.json"
        tmp = dst.with_name(f".progress.{uuid.uuid4().hex[:6]}.tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, dst)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def parts_dir(out: str | os.PathLike) -> Path:
    """The resume store of output ``out``."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


# -- progress -----------------------------------------------------------------------------------------
class _Progress:
    """tqdm bar (tiles done/total, tiles/s, ETA) and/or a ``callback(done, total)``."""

    def __init__(self, total: int, initial: int, show: bool | None, callback: Callable | None, desc: str,
                 unit: str = "tile"):
        self.total, self.n, self.callback = total, initial, callback
        self.bar = None
        if show is None:
            show = sys.stderr.isatty()
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit=unit, desc=desc, file=sys.stderr,
                            dynamic_ncols=True, smoothing=0.1)
        if callback is not None:
            callback(initial, total)

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.bar is not None:
            self.bar.update(k)
        if self.callback is not None:
            self.callback(self.n, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- the plan of one slide ------------------------------------------------------------------------------
@dataclass
class SlidePlan:
    """What a whole-slide run computes: the engine (geometry, level), the tissue tiles, the store."""

    source: Any  # path (str) or None for in-memory levels
    levels: list
    mpp: float | None
    engine: Any
    tissue: np.ndarray
    fingerprint: dict
    extra: dict = field(default_factory=dict)

    @property
    def grid(self):
        return self.engine.grid

    @property
    def level(self) -> int:
        return self.engine.level

    def close(self) -> None:
        """Close the slide file if the plan opened it."""
        slide = self.extra.pop("opened", None)
        if slide is not None:
            slide.close()

    @property
    def out_mpp(self) -> float | None:
        return None if self.mpp is None else float(self.mpp) * float(self.engine.downsample[1])



def _file_id(p: Path) -> dict:
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _model_id(model: Any, generator) -> dict:
    d: dict[str, Any] = {"name": getattr(generator, "name", str(model))}
    src = getattr(generator, "source", None) or (model if isinstance(model, (str, os.PathLike)) else None)
    if src is not None and Path(str(src)).exists():
        d["file"] = _file_id(Path(str(src)))
    cfg = getattr(generator, "config", None)
    if cfg:
        d["config"] = hashlib.sha1(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()
    return d


def plan_slide(source: Any, generator, *, model: Any = None, mpp: float | None = None, level: int | None = None,
               tile: int | None = None, halo: int | None = None, batch_size: int | None = None,
               tissue: bool = True, source_id: dict | None = None, on_error: str = "stop") -> SlidePlan:
    """Open ``source`` (a path, a :class:`~napari_bci.io.slide.Slide` or a list of levels), set up
    the tile engine and find the tissue tiles. With ``on_error="skip"`` a tissue mask that cannot
    be read (corrupt tile data in the mask level) makes every tile count as tissue, with a
    warning, so the bad tiles are then found, skipped and reported one by one."""
    from ..io.slide import Slide, open_slide
    from .cache import TileCache
    from .engine import TileEngine

    path = None
    opened = None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        source = opened = open_slide(path)
    if isinstance(source, Slide):
        path = path or source.path
        levels, mpp = list(source.levels), (source.mpp if mpp is None else mpp)
    else:
        levels = list(source) if isinstance(source, (list, tuple)) else [source]
    eng = TileEngine(generator, levels, mpp=mpp, level=level, tile=tile, halo=halo, batch_size=batch_size,
                     cache=TileCache(0), image_id=str(path) if path else None)
    if eng.grid.tile % 16:
        raise InputError(None, f"tile size {eng.grid.tile}: OME-TIFF tiles must be a multiple of 16 (use --tile)")
    mask = np.ones(eng.grid.shape, bool)
    if tissue:
        try:
            mask = tissue_tiles(levels, eng.level, eng.grid)
        except InputError as e:
            if on_error != "skip":
                raise
            import warnings

            warnings.warn(f"tissue mask unreadable ({e}); generating every tile", RuntimeWarning, stacklevel=2)
    if source_id is None and path is None:  # in-memory levels: their shapes and tissue layout
        source_id = {"levels": [list(map(int, lv.shape)) for lv in levels],
                     "tissue": hashlib.sha1(np.packbits(mask).tobytes()).hexdigest()}
    fp = {
        "source": source_id or _file_id(path),
        "model": _model_id(model, generator),
        "level": eng.level, "shape": list(eng.shape), "tile": eng.grid.tile, "halo": eng.grid.halo,
        "tissue_only": bool(tissue), "store": STORE_VERSION,
    }
    return SlidePlan(str(path) if path else None, levels, mpp, eng, mask, fp,
                     {"batch_size": batch_size, "opened": opened})


def local_results(plan: SlidePlan, todo: Sequence[tuple[int, int]], *, cancel: Any = None) -> Iterator[Result]:
    """This process's tile producer: :func:`compute_tiles` with the plan's engine."""
    return compute_tiles(plan.engine, todo, cancel=cancel)


def _white(shape) -> np.ndarray:
    return np.full((shape[0], shape[1], 3), WHITE, np.uint8)


def run_plan(plan: SlidePlan, out: str | os.PathLike, *, results: Callable[[Sequence], Iterator[Result]] | None = None,
             on_error: str = "stop", resume: bool = True, keep_parts: bool = False,
             compression: str | None = "jpeg", quality: int = 90, layout: str = "subifd",
             progress: Callable[[int, int], Any] | None = None, show_progress: bool | None = None,
             cancel: Any = None, name: str | None = None, prefilled: dict | None = None,
             provenance: dict | None = None) -> dict:
    """Generate the plan's missing tissue tiles and write the output pyramid (atomically).

    ``results(todo)`` yields :data:`Result` in the order of ``todo`` (default: this process,
    :func:`local_results`; see :meth:`napari_bci.generate.distributed.DaskTiles.results`).
    ``prefilled``: ``{(row, col): tile}`` already generated elsewhere (e.g. by the viewer).
    ``provenance``: the record the output carries (:mod:`napari_bci.io.provenance`).
    """
    from ..io.writers import OutputLock

    if on_error not in ("stop", "skip"):
        raise InputError(None, f"--on-error must be 'stop' or 'skip', not {on_error!r}")
    out = Path(out)
    check_output_path(out)
    with OutputLock(out):  # a second run on the same output refuses instead of resetting the store
        return _run_plan(plan, out, results=results, on_error=on_error, resume=resume, keep_parts=keep_parts,
                         compression=compression, quality=quality, layout=layout, progress=progress,
                         show_progress=show_progress, cancel=cancel, name=name, prefilled=prefilled,
                         provenance=provenance)


def _run_plan(plan: SlidePlan, out: Path, *, results, on_error, resume, keep_parts, compression, quality,
              layout, progress, show_progress, cancel, name, prefilled, provenance) -> dict:
    from ..io.writers import write_pyramid

    grid = plan.grid
    t0 = time.perf_counter()
    try:
        store = TileStore(parts_dir(out), plan.fingerprint, resume=resume)
        done = store.done()
        for idx, t in (prefilled or {}).items():
            idx = (int(idx[0]), int(idx[1]))
            if idx not in done and plan.tissue[idx]:
                store.put(idx, t)
                done.add(idx)
    except OSError as e:
        raise _os_error(out, e) from None
    order = grid.all_indices()
    tissue_idx = [i for i in order if plan.tissue[i]]
    todo = [i for i in tissue_idx if i not in done]
    n_resumed = len(tissue_idx) - len(todo)
    bar = _Progress(len(tissue_idx), n_resumed, show_progress, progress, desc=f"generate {out.name}")
    failures: list[TileFailure] = []
    computed = 0
    stream = iter((results or (lambda td: local_results(plan, td, cancel=cancel)))(todo)) if todo else iter(())
    last_save = [time.monotonic()]

    def save_progress(state: str) -> None:
        store.write_progress(done=bar.n, total=len(tissue_idx), computed=computed, state=state,
                             failures=[f.as_dict() for f in failures], level=plan.level,
                             grid=list(grid.shape), output=str(out))

    def tiles() -> Iterator[np.ndarray]:
        nonlocal computed
        for idx in order:
            core = grid.core(idx)
            shape = (core[1] - core[0], core[3] - core[2])
            if not plan.tissue[idx]:
                yield _white(shape)
                continue
            if idx in done:
                t = store.get(idx, shape)
                if t is None:  # the stored copy went bad: compute it again, here (already counted)
                    (_, t, fail), = local_results(plan, [idx], cancel=cancel)
                    if t is not None:
                        store.put(idx, t)
                if t is not None:
                    yield t
                    continue
            else:
                if cancel_requested(cancel):
                    raise Cancelled("generation cancelled")
                try:
                    got_idx, t, fail = next(stream)
                except StopIteration:
                    raise Cancelled("generation stopped before all tiles were computed") from None
                if got_idx != idx:
                    raise RuntimeError(f"tile stream out of order: expected {idx}, got {got_idx}")
            if t is None:
                failures.append(fail)
                if on_error == "stop":
                    save_progress("failed")
                    raise InputError(plan.source, f"corrupt input: {fail.describe(plan.source)}")
                t = _white(shape)
            elif idx not in done:
                store.put(idx, t)
                computed += 1
            # count before yielding: the writer stops pulling after the last tile
            bar.update()
            if time.monotonic() - last_save[0] > 2.0:
                save_progress("running")
                last_save[0] = time.monotonic()
            yield t

    try:
        write_pyramid(out, tiles(), shape=plan.engine.shape, mpp=plan.out_mpp, tile=grid.tile,
                      compression=compression, quality=quality, layout=layout, name=name, provenance=provenance,
                      cancel=(lambda: cancel_requested(cancel)) if cancel is not None else None)
    except BaseException as e:
        state = "cancelled" if isinstance(e, (Cancelled, KeyboardInterrupt)) else "failed"
        try:
            save_progress(state)
        except OSError:
            pass
        close = getattr(stream, "close", None)
        if close:
            close()
        bar.close()
        if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, PermissionError)):
            raise _os_error(out, e) from None
        raise
    bar.close()
    dt = time.perf_counter() - t0
    if not keep_parts:
        store.remove()
    else:
        save_progress("complete")
    return {
        "out": str(out), "source": plan.source, "level": plan.level, "shape": list(plan.engine.shape),
        "mpp": plan.out_mpp, "tile": grid.tile, "halo": grid.halo,
        "tiles": len(order), "tissue_tiles": len(tissue_idx), "computed": computed, "resumed": n_resumed,
        "store_discarded": store.discarded,
        "skipped": [f.as_dict() for f in failures], "seconds": round(dt, 3),
        "tiles_per_s": round(computed / dt, 3) if dt > 0 else None,
    }


def _os_error(out: Path, e: OSError) -> BCIError:
    import errno

    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        what = "disk full" if e.errno != errno.EFBIG else "file size limit reached"
        return BCIError(f"{out}: {what} while writing ({e.strerror or e}); nothing was written, "
                        f"finished tiles are kept in {parts_dir(out)} to resume")
    return BCIError(f"{out}: write failed ({type(e).__name__}: {e})")


def check_output_path(out: Path) -> None:
    """InputError (exit 2) unless ``out`` can be created: its folder exists and is writable and
    it is not a folder itself."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise InputError(out, "cannot write: is a folder (give a file name ending in .ome.tif)")
    if not parent.is_dir():
        raise InputError(out, "cannot write: the folder does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(out, "cannot write: permission denied")
    if out.exists() and not os.access(out, os.W_OK):
        raise InputError(out, "cannot write: the existing file is read-only")


# -- public entry points --------------------------------------------------------------------------------
_HEAP_TUNED = False


def _limit_heap_fragmentation() -> None:
    """Keep glibc from growing the heap with the many tile-sized buffers of a long run.

    glibc raises its mmap threshold each time a large block (the writer's tile rows) is freed, so
    later tile-sized buffers come from the heap and fragment it: peak memory then grows with the
    number of tiles (measured: 654 MB instead of 403 MB for a 32k slide). A fixed threshold of
    128 KiB keeps them in their own mappings, returned on free. No-op off glibc."""
    global _HEAP_TUNED
    if _HEAP_TUNED or not sys.platform.startswith("linux"):
        return
    _HEAP_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def generate_slide(source: Any, model: Any, out: str | os.PathLike, *, device: str | None = None,
                   level: int | None = None, tile: int | None = None, halo: int | None = None,
                   batch_size: int | None = None, workers: int | None = None, scheduler: str | None = None,
                   on_error: str = "stop", resume: bool = True, tissue: bool = True,
                   compression: str | None = "jpeg", quality: int = 90, layout: str = "subifd",
                   progress: Callable[[int, int], Any] | None = None, show_progress: bool | None = None,
                   cancel: Any = None, keep_parts: bool = False, window: int | None = None,
                   generator=None, prefilled: dict | None = None, tiles_per_task: int = 1,
                   client=None, resources: dict | None = None, provenance: dict | None = None) -> dict:
    """Virtual IHC of a whole slide as a pyramidal OME-TIFF at ``out``; returns a report dict.

    ``model``: a registry name, a checkpoint path or a :class:`Generator`. ``workers``/
    ``scheduler``: compute tiles on dask.distributed (see :mod:`.distributed`); the output is
    identical to a single-process run. ``on_error``: ``"stop"`` raises on a tile whose input
    cannot be read, ``"skip"`` fills it white and lists it under ``"skipped"``. ``cancel``: an
    Event or callable; when set the run stops with :class:`Cancelled`, keeping finished tiles
    for the next run (``resume``). ``client``: an existing ``distributed.Client`` to compute on;
    ``resources``: dask resources each task needs (e.g. ``{"GPU": 1}`` on workers started with
    ``--resources GPU=1``). ``provenance``: the record the output carries (default: the model,
    the source and the model's out-of-domain warning on the slide, :mod:`napari_bci.io.provenance`;
    the warning is also the report's ``out_of_domain``).
    """
    from ..io.provenance import record
    from ..models.domain import check_generator_domain
    from ..models.registry import load_generator

    out = Path(out)
    check_output_path(out)
    _limit_heap_fragmentation()
    distributed = bool(workers) or bool(scheduler) or client is not None
    if generator is None:
        generator = load_generator(model, device="cpu" if distributed else device)
    plan = plan_slide(source, generator, model=model, level=level, tile=tile, halo=halo, batch_size=batch_size,
                      tissue=tissue, on_error=on_error)
    results = None
    cluster_info: dict = {}
    ctx = None
    try:
        if provenance is None:
            provenance = record(generator.name, plan.source,
                                check_generator_domain(generator, plan.levels[plan.level]))
        if distributed:
            from .distributed import DaskTiles

            ctx = DaskTiles(plan, model if model is not None else generator, workers=workers, scheduler=scheduler,
                            device=device, window=window, tiles_per_task=tiles_per_task, client=client,
                            resources=resources)
            results = ctx.results
            ctx.start()
            cluster_info = ctx.info()
        report = run_plan(plan, out, results=results, on_error=on_error, resume=resume, keep_parts=keep_parts,
                          compression=compression, quality=quality, layout=layout, progress=progress,
                          show_progress=show_progress, cancel=cancel, prefilled=prefilled, provenance=provenance,
                          name=Path(plan.source).name.split(".")[0] if plan.source else None)
    finally:
        if ctx is not None:
            ctx.close()
        plan.close()
    report["model"] = generator.name
    if provenance.get("out_of_domain"):
        report["out_of_domain"] = provenance["out_of_domain"]
    report["device"] = getattr(generator, "device", "cpu") if not distributed else cluster_info.get("devices")
    if distributed:
        report["cluster"] = cluster_info
    return report


def bci_test_files(root: Path) -> list[Path] | None:
    """``HE/test/*.png`` of a BCI dataset root (or ``HE/`` when there is no split), else None."""
    for sub in (("HE", "test"), ("HE",)):
        d = root.joinpath(*sub)
        if d.is_dir():
            files = sorted(p for p in d.iterdir() if p.suffix.lower() == ".png" and not p.name.startswith("."))
            if files:
                return files
    return None


#: A single-level image with a longer side above this is handled as a whole slide (tiled into an
#: OME-TIFF, memory flat in its size) rather than as one image held in memory.
SLIDE_MIN_SIDE = 4096


def is_pyramid(slide) -> bool:
    """Whether an open slide becomes a whole-slide OME-TIFF rather than one image: it has
    pyramid levels of its own, or a side above :data:`SLIDE_MIN_SIDE` (a 20k one-strip TIFF as
    one PNG would hold the image and its result whole). The rule for folders and for single
    inputs without an explicit PNG/JPEG output."""
    return slide.native_levels > 1 or max(slide.shape[:2]) > SLIDE_MIN_SIDE


def _is_pyramid_file(p: Path) -> bool:
    from ..io.slide import open_slide

    if p.suffix.lower() in (".png", ".jpg", ".jpeg"):
        return False
    try:
        with open_slide(p) as s:
            return is_pyramid(s)
    except InputError:
        return False


def folder_files(src: Path) -> list[Path]:
    """The input files of folder ``src``: a BCI root's test H&E patches, else its images."""
    from ..io.patches import IMAGE_SUFFIXES

    src = Path(src)
    bci = bci_test_files(src)
    if bci is not None:
        return bci
    return sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def generate_folder(files: Sequence[Path], model: Any, out_dir: str | os.PathLike, *, generator=None,
                    device: str | None = None, tile: int | None = None, batch_size: int | None = None,
                    workers: int | None = None, scheduler: str | None = None, resume: bool = True,
                    on_error: str = "stop", show_progress: bool | None = None,
                    progress: Callable[[int, int], Any] | None = None,
                    warn: Callable[[str], Any] | None = None, **slide_kw: Any) -> dict:
    """Patches -> ``out_dir/<stem>.png`` (same names, ready for ``napari-bci evaluate``), slides ->
    ``out_dir/<stem>.ome.tif``. Outputs already present are kept when ``resume`` (each is written
    atomically, so a present file is complete). Patches go to dask workers as tasks when
    ``workers``/``scheduler`` is given; slides are tiled as in :func:`generate_slide`. A patch that
    cannot be read stops the run (``on_error="stop"``) or is listed under ``failed``.

    Before the work starts, :func:`~napari_bci.models.domain.check_folder_domain` judges a few
    of the images against the
    generator's training domain; its warning (if any) goes to ``warn`` and the report."""
    from ..io.provenance import record
    from ..io.writers import write_image_atomic
    from ..models.domain import check_folder_domain
    from ..models.registry import load_generator

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(out_dir, "output for a folder must be a folder")
    if not out_dir.parent.is_dir():
        raise InputError(out_dir, "cannot write: the parent folder does not exist")
    try:
        out_dir.mkdir(exist_ok=True)
    except PermissionError:
        raise InputError(out_dir, "cannot write: permission denied") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise InputError(out_dir, "cannot write: permission denied")
    distributed = bool(workers) or bool(scheduler)
    if generator is None:
        generator = load_generator(model, device="cpu" if distributed else device)
    domain = check_folder_domain(generator, files)
    if domain and warn is not None:
        warn(domain)
    t0 = time.perf_counter()
    slides = [f for f in files if _is_pyramid_file(f)]
    patches = [f for f in files if f not in set(slides)]
    kept = [f for f in patches if resume and (out_dir / (f.stem + ".png")).exists()]
    todo = [f for f in patches if f not in set(kept)]
    written: list[str] = []
    failed: list[dict] = []
    bar = _Progress(len(patches), len(kept), show_progress, progress, desc="generate", unit="image")
    try:
        if todo:
            for f, res in _patch_results(todo, model, generator, device=device, tile=tile, batch_size=batch_size,
                                         workers=workers, scheduler=scheduler):
                if isinstance(res, BaseException):
                    failed.append({"file": str(f), "error": str(res)})
                    if on_error == "stop":
                        raise res
                else:
                    image, out_of_domain = res
                    write_image_atomic(out_dir / (f.stem + ".png"), image,
                                       provenance=record(generator.name, f, out_of_domain))
                    written.append(f.stem + ".png")
                bar.update()
    finally:
        bar.close()
    if failed and not written and not kept and not slides:
        raise InputError(Path(failed[0]["file"]).parent, f"no image could be read (first: {failed[0]['error']})")
    slide_reports = []
    for f in slides:
        slide_reports.append(generate_slide(f, model, out_dir / (f.name.split(".")[0] + ".ome.tif"),
                                            device=device, tile=tile, batch_size=batch_size, workers=workers,
                                            scheduler=scheduler, resume=resume, on_error=on_error,
                                            show_progress=show_progress,
                                            generator=None if distributed else generator, **slide_kw))
    dt = time.perf_counter() - t0
    return {"n": len(written) + len(kept) + len(slide_reports), "out": str(out_dir), "model": generator.name,
            "written": len(written), "kept": len(kept), "slides": slide_reports, "failed": failed,
            "seconds": round(dt, 3), "images_per_s": round(len(written) / dt, 3) if dt > 0 and written else None,
            **({"out_of_domain": domain} if domain else {})}


def _patch_results(files, model, generator, *, device, tile, batch_size, workers, scheduler):
    """``(file, (image, out-of-domain warning) | exception)`` per patch, in order: here, or as dask
    tasks (:func:`~.tiles.patch_image`)."""
    if not (workers or scheduler):
        for f in files:
            yield f, patch_image(generator, f, tile=tile, batch_size=batch_size)
        return
    from .distributed import patch_results

    yield from patch_results(files, model, device=device, tile=tile, batch_size=batch_size,
                             workers=workers, scheduler=scheduler)


# -- napari writer: save a generated layer, computing the tiles the viewer has not -----------------------
def can_complete_layer(meta: dict | None) -> bool:
    """Whether a layer's metadata says how to compute its missing tiles (a generated layer)."""
    meta = meta or {}
    return meta.get("role") == "generated" and bool(meta.get("source_path")) and bool(meta.get("model")) \
        and Path(str(meta["source_path"])).exists()


def save_generated_layer(path: str | os.PathLike, data: Any, meta: dict, *,
                         progress: Callable[[int, int], Any] | None = None, cancel: Any = None,
                         device: str | None = None) -> list[str]:
    """Write a generated layer as a whole-slide OME-TIFF, computing the tiles it does not have yet.

    ``meta`` (the layer's metadata) needs ``source_path`` (the H&E file) and ``model`` (name or
    checkpoint); optional ``source_level`` (or ``generation_level``), ``tile``, ``halo`` (the
    engine settings the viewer used) and ``tiles_done`` (``(row, col)`` pairs already in
    ``data``, whose level 0 is the generation level): those tiles are taken from ``data``
    instead of being recomputed.
    """
    from ..io.provenance import record
    from ..models.registry import load_generator

    gen = load_generator(meta["model"], device=device)
    level = meta.get("source_level", meta.get("generation_level"))
    plan = plan_slide(meta["source_path"], gen, model=meta["model"], level=level,
                      tile=meta.get("tile"), halo=meta.get("halo"))
    prefilled = {}
    from collections.abc import Sequence as _Seq

    level0 = data[0] if isinstance(data, _Seq) else data  # a list or napari's MultiScaleData
    done = list(meta.get("tiles_done") or [])
    if done and tuple(level0.shape[:2]) == tuple(plan.engine.shape):
        for r, c in done:
            if 0 <= r < plan.grid.shape[0] and 0 <= c < plan.grid.shape[1] and plan.tissue[r, c]:
                y0, y1, x0, x1 = plan.grid.core((r, c))
                prefilled[(int(r), int(c))] = np.ascontiguousarray(np.asarray(level0[y0:y1, x0:x1])[..., :3],
                                                                   dtype=np.uint8)
    try:
        report = run_plan(plan, path, on_error="skip", progress=progress, show_progress=False, cancel=cancel,
                          prefilled=prefilled, name=Path(plan.source).name.split(".")[0] if plan.source else None,
                          provenance=record(gen.name, plan.source, meta.get("out_of_domain")))
    finally:
        plan.close()
    report["reused"] = len(prefilled)
    save_generated_layer.last_report = report  # type: ignore[attr-defined]
    return [str(path)]


