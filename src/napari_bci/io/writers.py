"""Atomic output files: single images (``write_image_atomic``) and streamed pyramidal OME-TIFF.

Every output goes through a hidden temporary file in the destination folder
(``.<name>.<pid>-<random>.tmp``) that ``os.replace`` renames over the target only when
complete: no partial file, ever. A successful write removes the temporaries that killed runs
(SIGKILL, power loss) left for the same target (``remove_stale_temps``).

Streaming writer of tiled, compressed, pyramidal OME-TIFF:

``write_pyramid`` takes level 0 as an array (numpy/dask), a list of ready levels, a
``Slide``, a tile callable ``tile(y, x, h, w)`` or an iterator of tiles in row-major order, and
writes every level tile by tile. Lower levels are 2x2 box-filtered from the level above, one
tile row at a time, while level 0 streams into the file; their tiles wait in a compressed
spill file next to the output until tifffile writes them.

Peak memory does not depend on the slide's height: about five tile rows of level 0
(``5 * tile * width * 3`` bytes: the row being written, the encoder's buffer, the box filter
and the lower levels' pending rows); measured 60 MiB for an 8192-px-wide slide with 512-px
tiles. Output is atomic: a hidden temporary file in the same directory, renamed over
``path`` only when complete.

Layouts (``layout=``):

- ``"subifd"`` (default): OME-TIFF with OME-XML (PhysicalSizeX/Y in µm) in level 0's
  ImageDescription and the lower levels in SubIFDs (Bio-Formats/QuPath/tifffile/napari pyramid
  convention). OpenSlide reads such a file as a single-level generic TIFF.
- ``"pages"``: the levels as consecutive top-level tiled pages marked reduced-resolution
  (NewSubfileType 1), no OME-XML: OpenSlide's "generic-tiff" sees every level.

Both carry XResolution/YResolution in pixels per centimetre when ``mpp`` is known.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ..errors import Cancelled, InputError
from ..pyramid import reduce2


IMAGE_OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
JPEG_MAX_SIDE = 65535


_OWN_TEMPS: set[Path] = set()


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh hidden temporary path beside ``path`` naming this process: ``.<name>.<pid>-<hex>.tmp``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    _OWN_TEMPS.add(tmp)
    return tmp


def _forget(tmp: Path) -> None:
    """``tmp`` is renamed or removed: :func:`remove_own_temps` need not know it any more."""
    _OWN_TEMPS.discard(tmp)


def remove_own_temps() -> list[Path]:
    """Remove the temporaries this process has named and not yet renamed or removed; returns them.

    For a process that must exit at once (see ``cli``'s SIGTERM grace) without unwinding.
    """
    removed = []
    for tmp in list(_OWN_TEMPS):
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(tmp)
    _OWN_TEMPS.clear()
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of ``path`` left by processes that no longer run; returns them.

    Only names written by :func:`temp_path` (``.<name>.<pid>-<hex>.tmp``, or the older
    ``.<name>.<hex>.tmp`` / ``.<name>.tmp-<pid>``) are considered; a temporary whose process is
    alive (another run writing now) is kept.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    removed = []
    prefix = f".{path.name}."
    try:
        candidates = [c for c in parent.iterdir() if c.name.startswith(prefix)]
    except OSError:
        return removed
    for c in candidates:
        rest = c.name[len(prefix):]
        if rest.endswith(".tmp"):
            tag = rest[:-4]
            pid_text = tag.split("-", 1)[0] if "-" in tag else None
        elif rest.startswith("tmp-"):
            pid_text = rest[4:]
        else:
            continue
        if pid_text is not None:
            if not pid_text.isdigit():
                continue
            pid = int(pid_text)
            if pid == os.getpid() or _pid_alive(pid):
                continue
        elif not all(ch in "0123456789abcdef" for ch in tag) or _age(c) < 3600:
            continue  # an old-style name without a PID: only when clearly abandoned
        try:
            c.unlink()
            removed.append(c)
        except OSError:
            pass
    return removed


def _age(p: Path) -> float:
    import time

    try:
        return time.time() - p.stat().st_mtime
    except OSError:
        return 0.0


def check_writable(path: str | os.PathLike) -> Path:
    """``path`` as a Path; InputError (naming it) unless a file can be created there.

    Checks by creating (and removing) a temporary file beside it, so read-only file systems
    and folders that permissions close even to root are caught before any work starts.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise InputError(path, "cannot write: is a directory")
    if parent.exists() and not parent.is_dir():
        raise InputError(path, f"cannot write: {parent} is not a folder")
    if not parent.is_dir():
        raise InputError(path, "cannot write: the directory does not exist")
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(path, "cannot write: the file is read-only")
    probe = temp_path(path)
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except OSError as e:
        raise InputError(path, f"cannot write: {_os_problem(e)}") from None
    finally:
        probe.unlink(missing_ok=True)
        _forget(probe)
    return path


def _encode_image(path: Path, arr: np.ndarray, quality: int) -> bytes | None:
    """Encoded bytes for PNG/JPEG (None for TIFF, which tifffile writes to the file itself)."""
    import imagecodecs

    suffix = path.suffix.lower()
    if suffix == ".png":
        return imagecodecs.png_encode(arr)
    if suffix in (".jpg", ".jpeg"):
        if arr.dtype != np.uint8:
            raise InputError(path, f"JPEG holds 8-bit images only, not {arr.dtype}")
        if max(arr.shape[:2]) > JPEG_MAX_SIDE:
            raise InputError(path, f"JPEG is limited to {JPEG_MAX_SIDE} px a side, the image is "
                                   f"{arr.shape[1]} x {arr.shape[0]}; write .ome.tif instead")
        return imagecodecs.jpeg8_encode(arr, level=quality)
    return None


def write_image_atomic(path: str | os.PathLike, array: Any, *, quality: int = 95,
                       provenance: dict | None = None) -> Path:
    """Write one image at ``path`` (format by suffix: .png, .jpg/.jpeg, .tif/.tiff); returns the path.

    ``array``: ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` uint8 (PNG/TIFF also uint16), numpy
    or dask. The file appears complete or not at all (temporary file in the same folder,
    ``os.replace``), with mode 0644 (less the umask), and stale temporaries of earlier killed
    runs are removed. ``quality``: JPEG quality (1-100). ``provenance``: a virtual IHC's record
    (:mod:`napari_bci.io.provenance`), stored in the file. Raises InputError naming the file for an
    unsupported suffix, a missing or read-only folder, or an image the format cannot hold.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_OUTPUT_SUFFIXES:
        raise InputError(path, "unsupported output type (use .png, .jpg, .tif, or .ome.tif for slides)")
    check_writable(path)
    arr = np.ascontiguousarray(np.asarray(array))
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))) or arr.dtype not in (np.uint8, np.uint16):
        raise InputError(path, f"cannot write a {arr.shape} {arr.dtype} array as an image "
                               "(expected (H, W[, 3|4]) uint8 or uint16)")
    if min(arr.shape[:2]) < 1:
        raise InputError(path, f"cannot write an empty image {arr.shape}")
    if suffix in (".jpg", ".jpeg") and arr.ndim == 3 and arr.shape[2] == 4:
        raise InputError(path, "JPEG has no alpha channel; write .png or .tif")
    try:
        data = _encode_image(path, arr, quality)
    except InputError:
        raise
    except Exception as e:  # imagecodecs' PngError/Jpeg8Error: size or layout it cannot encode
        raise InputError(path, f"cannot encode the image ({type(e).__name__}: {e})") from None
    if provenance is not None:
        from .provenance import add_to_jpeg, add_to_png, text

        if data is not None:
            data = (add_to_png if suffix == ".png" else add_to_jpeg)(data, provenance)
    with atomic_output(path, "wb", check=False) as f:  # checked above, before encoding
        if data is not None:
            f.write(data)
        else:
            import tifffile

            tifffile.imwrite(f, arr, photometric="minisblack" if arr.ndim == 2 else "rgb",
                             compression="zlib", bigtiff=arr.nbytes > 2**31 - 2**25,
                             tile=(512, 512) if max(arr.shape[:2]) > 2048 else None,
                             extrasamples=("unassalpha",) if arr.ndim == 3 and arr.shape[2] == 4 else None,
                             **({} if provenance is None else {"description": text(provenance), "metadata": None}))
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = "utf-8",
                  newline: str | None = "", check: bool = True):
    """``with atomic_output(path) as f: ...``: a file object on a hidden temporary beside
    ``path``, renamed over it (mode 0644 less the umask) only when the block succeeds; on any
    error the temporary is removed and ``path`` is untouched. For text (``"w"``) and bytes
    (``"wb"``); :func:`write_image_atomic` and :func:`write_pyramid` use the same temporaries."""
    path = Path(path)
    if check:  # False: the caller has just checked (before expensive work)
        check_writable(path)
    tmp = temp_path(path)
    binary = "b" in mode
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        # reopened by name: writers such as tifffile want a file object with a real path
        with open(tmp, mode, **({} if binary else {"encoding": encoding, "newline": newline})) as f:
            yield f
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InputError(path, f"cannot write: {_os_problem(e)}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        _forget(tmp)
    remove_stale_temps(path)


class OutputLock:
    """``with OutputLock(out):`` one run at a time per output path.

    The lock is a hidden file beside the output (``.<name>.lock``) holding the owner's PID, host
    and start time, created exclusively. A lock whose process is gone (same host) is stale and
    taken over; a live one makes the second run fail at once with an :class:`InputError` naming
    the other run. A lock from another host cannot be checked: it is respected, and the message
    says which file to remove if that run is known to be dead.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.file = self.path.with_name(f".{self.path.name}.lock")
        self._held = False

    def _owner(self) -> dict | None:
        import json

        try:
            return json.loads(self.file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        import json
        import socket
        import time

        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None:
                    continue  # released meanwhile
                pid, host = owner.get("pid"), owner.get("host")
                if host == me["host"] and isinstance(pid, int) and not _pid_alive(pid) or owner == {}:
                    self.file.unlink(missing_ok=True)  # stale (or unreadable): take it over
                    continue
                when = time.strftime("%Y-%m-%d %H:%M", time.localtime(owner.get("started", 0)))
                where = f"PID {pid}" + (f" on {host}" if host != me["host"] else "")
                hint = "" if host == me["host"] else f"; if that run is dead, remove {self.file}"
                raise InputError(self.path, f"another napari-bci run ({where}, since {when}) is writing "
                                            f"this output; wait for it or choose another --out{hint}")
            except OSError as e:
                raise InputError(self.path, f"cannot write: {_os_problem(e)}") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._held = True
            return
        raise InputError(self.path, f"could not take the output lock {self.file}")

    def release(self) -> None:
        if self._held:
            self._held = False
            self.file.unlink(missing_ok=True)

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _os_problem(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on the device"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied" if e.errno != errno.EROFS else "read-only file system"
    return e.strerror or type(e).__name__


def pyramid_shapes(shape: tuple[int, int], tile: int, n_levels: int | None = None) -> list[tuple[int, int]]:
    """Level shapes: halve (floor) until the whole level fits one tile, or ``n_levels`` levels."""
    h, w = int(shape[0]), int(shape[1])
    out = [(h, w)]
    while (n_levels is None and max(h, w) > tile) or (n_levels is not None and len(out) < n_levels):
        h, w = h // 2, w // 2
        if min(h, w) < 1:
            break
        out.append((h, w))
    return out


class _Spill:
    """Row-major tiles of one level, zstd-compressed in an anonymous temporary file."""

    def __init__(self, directory: Path):
        import imagecodecs

        self._enc, self._dec = imagecodecs.zstd_encode, imagecodecs.zstd_decode
        self.f = tempfile.TemporaryFile(dir=directory, prefix=".napari-bci-spill-")
        self.n = 0

    def put(self, t: np.ndarray) -> None:
        b = self._enc(np.ascontiguousarray(t).tobytes(), level=1)
        self.f.write(struct.pack("<QHH", len(b), t.shape[0], t.shape[1]))
        self.f.write(b)
        self.n += 1

    def tiles(self) -> Iterator[np.ndarray]:
        self.f.seek(0)
        for _ in range(self.n):
            n, h, w = struct.unpack("<QHH", self.f.read(12))
            yield np.frombuffer(self._dec(self.f.read(n)), np.uint8).reshape(h, w, 3)

    def close(self) -> None:
        self.f.close()


class _Level:
    """Receives rows of level k, tiles and spills them, and feeds their 2x2 mean to level k+1."""

    def __init__(self, shape, tile, spill: _Spill, below: "_Level | None"):
        self.h, self.w = shape
        self.tile, self.spill, self.below = tile, spill, below
        self.rows: list[np.ndarray] = []  # pending rows for the current tile row
        self.nrows = 0  # rows received so far
        self.carry: np.ndarray | None = None  # odd row waiting for its pair

    def push(self, strip: np.ndarray) -> None:
        strip = strip[: max(0, self.h - self.nrows), : self.w]
        if not len(strip):
            return
        self.nrows += len(strip)
        self.rows.append(strip)
        if sum(len(r) for r in self.rows) >= self.tile:
            buf = np.concatenate(self.rows) if len(self.rows) > 1 else self.rows[0]
            while len(buf) >= self.tile:
                self._emit(buf[: self.tile])
                buf = buf[self.tile:]
            self.rows = [buf] if len(buf) else []
        if self.below is not None:
            self._reduce(strip)

    def _reduce(self, strip: np.ndarray) -> None:
        if self.carry is not None:
            strip = np.concatenate([self.carry, strip])
            self.carry = None
        if len(strip) % 2:
            self.carry, strip = strip[-1:].copy(), strip[:-1]
        if len(strip):
            self.below.push(reduce2(strip, odd="drop"))

    def _emit(self, buf: np.ndarray) -> None:
        for x in range(0, self.w, self.tile):
            self.spill.put(buf[:, x:x + self.tile])

    def finish(self) -> None:
        if self.rows:
            self._emit(np.concatenate(self.rows))
            self.rows = []
        if self.below is not None:
            self.below.finish()


def _pad(t: np.ndarray, tile: int) -> np.ndarray:
    """Edge-replicate a partial tile to ``tile x tile`` (no dark JPEG ringing at slide edges)."""
    h, w = t.shape[:2]
    if h == tile and w == tile:
        return t
    return np.pad(t, ((0, tile - h), (0, tile - w), (0, 0)), mode="edge")


def _as_rgb_tile(t: Any, h: int, w: int, where: str) -> np.ndarray:
    a = np.asarray(t)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8 or a.shape[0] < h or a.shape[1] < w:
        raise ValueError(f"{where}: expected a ({h}, {w}, 3) uint8 tile, got {a.shape} {a.dtype}")
    return a[:h, :w]


def _rows_from_array(arr, tile: int) -> Iterator[list[np.ndarray]]:
    H, W = arr.shape[:2]
    for y in range(0, H, tile):
        strip = np.asarray(arr[y:y + tile])
        if strip.dtype != np.uint8 or strip.ndim != 3 or strip.shape[2] != 3:
            raise ValueError(f"level data must be (H, W, 3) uint8, got {strip.shape} {strip.dtype}")
        yield [strip[:, x:x + tile] for x in range(0, W, tile)]


def _rows_from_callable(fn: Callable, shape, tile: int) -> Iterator[list[np.ndarray]]:
    H, W = shape
    for y in range(0, H, tile):
        h = min(tile, H - y)
        yield [_as_rgb_tile(fn(y, x, h, min(tile, W - x)), h, min(tile, W - x), f"tile at y={y}, x={x}")
               for x in range(0, W, tile)]


def _rows_from_iterator(it: Iterable, shape, tile: int) -> Iterator[list[np.ndarray]]:
    H, W = shape
    it = iter(it)
    for y in range(0, H, tile):
        h = min(tile, H - y)
        row = []
        for x in range(0, W, tile):
            try:
                t = next(it)
            except StopIteration:
                raise ValueError(f"tile iterator ended early, at tile y={y}, x={x}") from None
            row.append(_as_rgb_tile(t, h, min(tile, W - x), f"tile at y={y}, x={x}"))
        yield row


def write_pyramid(
    path: str | os.PathLike,
    source: Any,
    *,
    shape: tuple[int, int] | None = None,
    mpp: float | None = None,
    tile: int = 512,
    compression: str | None = "jpeg",
    quality: int = 90,
    n_levels: int | None = None,
    layout: str = "subifd",
    progress: Callable[[int, int], Any] | None = None,
    cancel: Callable[[], bool] | None = None,
    name: str | None = None,
    maxworkers: int | None = None,
    provenance: dict | None = None,
) -> Path:
    """Write a tiled pyramidal (OME-)TIFF at ``path``; returns the path.

    ``source``: an ``(H, W, 3)`` uint8 array (numpy or dask) as level 0; a list of such arrays
    (the levels, written as given); a :class:`~napari_bci.io.slide.Slide` (its level 0, and its
    mpp unless ``mpp`` is given); a callable ``tile(y, x, h, w) -> (h, w, 3) uint8`` in level-0
    pixels; or an iterator of such tiles in row-major order of the ``tile`` grid. Callables and
    iterators need ``shape=(H, W)``. ``compression``: ``"jpeg"`` (``quality``), ``"zlib"``,
    ``"zstd"``, ``"lzw"``, ``"webp"``, ... (tifffile names) or None. ``progress(done, total)`` is
    called per tile; ``cancel()`` returning True stops with :class:`Cancelled` (no output).
    ``maxworkers``: encoder threads (default: up to 4); tifffile buffers one tile row for them.
    ``provenance``: a virtual IHC's record (:mod:`napari_bci.io.provenance`), stored as the
    image's description.
    """
    import tifffile

    from .slide import Slide

    path = Path(path)
    if layout not in ("subifd", "pages"):
        raise ValueError(f"layout must be 'subifd' or 'pages', not {layout!r}")
    if tile % 16:
        raise ValueError(f"tile must be a multiple of 16, not {tile}")
    parent = path.parent if str(path.parent) else Path(".")
    check_writable(path)

    given_levels: list | None = None
    if isinstance(source, Slide):
        mpp = source.mpp if mpp is None else mpp
        name = name or source.path.stem
        source = source.levels[0]
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):  # incl. napari MultiScaleData
        if len(source) == 1:
            source = source[0]
        else:
            given_levels = list(source)
            source = given_levels[0]
    if callable(source) and not hasattr(source, "shape"):
        if shape is None:
            raise ValueError("shape=(H, W) is required with a tile callable")
        rows = _rows_from_callable(source, shape[:2], tile)
    elif hasattr(source, "shape") and hasattr(source, "dtype"):
        shape = tuple(source.shape[:2])
        rows = _rows_from_array(source, tile)
    else:
        if shape is None:
            raise ValueError("shape=(H, W) is required with a tile iterator")
        rows = _rows_from_iterator(source, shape[:2], tile)
    H, W = int(shape[0]), int(shape[1])
    if given_levels is not None:
        shapes = [tuple(int(s) for s in a.shape[:2]) for a in given_levels]
    else:
        shapes = pyramid_shapes((H, W), tile, n_levels)
    n_tiles = [-(-h // tile) * -(-w // tile) for h, w in shapes]
    total, done = sum(n_tiles), 0

    def tick():
        nonlocal done
        if cancel is not None and cancel():
            raise Cancelled(f"{path}: writing cancelled")
        done += 1
        if progress is not None:
            progress(done, total)

    spills: list[_Spill] = []
    tmp = temp_path(path)
    try:
        cascade = None
        if given_levels is None:
            for k in range(len(shapes) - 1, 0, -1):
                spills.insert(0, _Spill(parent))
                cascade = _Level(shapes[k], tile, spills[0], cascade)

        n_rows0 = -(-H // tile)

        def level0_tiles():
            # tifffile stops pulling after the last tile, so finish the cascade before yielding it
            for i, row in enumerate(rows):
                if cascade is not None:
                    _feed(np.concatenate(row, axis=1) if len(row) > 1 else row[0])
                    if i == n_rows0 - 1:
                        cascade.finish()
                for t in row:
                    tick()
                    yield _pad(t, tile)

        carry: list[np.ndarray] = []

        def _feed(strip):
            if carry:
                strip = np.concatenate([carry.pop(), strip])
            if len(strip) % 2:
                carry.append(strip[-1:].copy())
                strip = strip[:-1]
            if len(strip):
                cascade.push(reduce2(strip[:, : 2 * shapes[1][1]], odd="drop"))

        def lower_tiles(k):
            if given_levels is not None:
                for row in _rows_from_array(given_levels[k], tile):
                    for t in row:
                        tick()
                        yield _pad(t, tile)
            else:
                for t in spills[k - 1].tiles():
                    tick()
                    yield _pad(t, tile)

        workers = maxworkers or min(4, os.cpu_count() or 1)
        # tifffile's default encoder buffer is 512 MB of tiles; one tile row keeps memory bounded
        opts: dict[str, Any] = dict(tile=(tile, tile), dtype=np.uint8, photometric="rgb", maxworkers=workers,
                                    buffersize=-(-W // tile) * tile * tile * 3)
        if compression:  # tifffile stores RGB JPEG tiles as YCbCr 4:2:0 (photometric 6) itself
            opts["compression"] = compression
            if compression.lower() in ("jpeg", "webp", "jpegxl", "avif"):
                opts["compressionargs"] = {"level": int(quality)}
        bigtiff = H * W * 3 * 4 / 3 > 2**31 - 2**25
        ome = layout == "subifd"
        meta: dict[str, Any] | None
        if ome:
            meta = {"axes": "YXS", "Name": name or path.name.split(".")[0]}
            if mpp:
                meta.update(PhysicalSizeX=float(mpp), PhysicalSizeXUnit="µm",
                            PhysicalSizeY=float(mpp), PhysicalSizeYUnit="µm")
        else:
            meta = None
        described: dict[str, Any] = {}  # the record goes with level 0 only
        if provenance is not None:
            from .provenance import text

            if ome:
                meta["Description"] = text(provenance)
            else:
                described["description"] = text(provenance)

        def res(k):
            if not mpp:
                return {}
            ds_y, ds_x = H / shapes[k][0], W / shapes[k][1]
            return dict(resolution=(1e4 / (mpp * ds_x), 1e4 / (mpp * ds_y)), resolutionunit="CENTIMETER")

        with tifffile.TiffWriter(tmp, bigtiff=bigtiff, ome=ome) as tw:
            tw.write(level0_tiles(), shape=(H, W, 3), subifds=(len(shapes) - 1) if ome else None,
                     metadata=meta, software="napari-bci", **opts, **described, **res(0))
            for k in range(1, len(shapes)):
                tw.write(lower_tiles(k), shape=shapes[k] + (3,), subfiletype=1, metadata=None,
                         **opts, **res(k))
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    finally:
        _forget(tmp)
        for s in spills:
            s.close()
    remove_stale_temps(path)
    return path
