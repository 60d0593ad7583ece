"""Whole-slide images as lazy pyramids.

``open_slide(path) -> Slide`` reads SVS, NDPI, OME-TIFF (SubIFD pyramids), tiled multi-page
("generic") pyramidal TIFF, plain TIFF and PNG/JPEG patches. TIFF levels are dask arrays over
tifffile's zarr store, so only the tiles (or strips) a caller slices are read and decoded.
Slides without low-resolution levels get lazily computed 2x box-filtered levels down to
about 512 px. Formats tifffile cannot read (e.g. MIRAX ``.mrxs``) go through OpenSlide when
``openslide-python`` is installed (``pip install napari-bci[openslide]``).
"""

from __future__ import annotations

import os
import re
import warnings
from itertools import count
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..pyramid import reduce2
from .pixels import IMAGE_SUFFIXES, check_file, decode_png_jpeg, sniff, to_rgb8

#: Synthesised levels stop once the smaller side is at most this many pixels ...
MIN_LEVEL_SIZE = 512
#: ... and are only added to images whose larger side exceeds this (patches stay one level).
SYNTH_ABOVE = 2048
#: A chunk (tile or strip) larger than this is refused instead of being decoded whole.
MAX_CHUNK_BYTES = 256 * 2**20
#: Series that are not pyramid levels (SVS/NDPI/SCN/BIF associated images).
ASSOCIATED = {"thumbnail", "label", "macro", "map", "overview", "probability"}
OPENSLIDE_ONLY = (".mrxs", ".vms", ".vmu", ".svslide", ".dcm", ".isyntax", ".czi", ".sis", ".vsi")
#: Every suffix :func:`open_slide` reads (the OpenSlide-only ones need ``napari-bci[openslide]``).
SLIDE_SUFFIXES = IMAGE_SUFFIXES + OPENSLIDE_ONLY

_ids = count()


class Slide:
    """A slide (or a patch) as a pyramid of ``(H, W, 3)`` uint8 dask arrays, level 0 first."""

    def __init__(self, path, fmt: str, levels: list, mpp: float | None, metadata: dict | None = None,
                 closer=None, native_levels: int | None = None):
        self.path = Path(path)
        self.format = fmt
        self.levels = list(levels)
        self.mpp = None if mpp is None else float(mpp)
        self.native_levels = len(self.levels) if native_levels is None else native_levels
        self.metadata = dict(metadata or {})
        self._closer = closer

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.levels[0].shape)

    @property
    def level_shapes(self) -> list[list[int]]:
        return [[int(a.shape[0]), int(a.shape[1])] for a in self.levels]

    @property
    def downsamples(self) -> list[float]:
        h0, w0 = self.shape[:2]
        return [float((h0 / a.shape[0] + w0 / a.shape[1]) / 2) for a in self.levels]

    def level_for_mpp(self, mpp: float) -> int:
        """The finest level whose pixel size does not exceed ``mpp`` (level 0 when mpp is unknown)."""
        from ..pyramid import pick_level

        return pick_level(self.levels, self.mpp or None, mpp, prefer="finer", tolerance=1.05)

    def read_region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Pixels ``[y:y+h, x:x+w]`` of ``level`` as an ``(h, w, 3)`` uint8 array; outside is white."""
        a = self.levels[level]
        H, W = a.shape[:2]
        out = np.full((h, w, 3), 255, np.uint8)
        y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, H), min(x + w, W)
        if y1 > y0 and x1 > x0:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = np.asarray(a[y0:y1, x0:x1].compute())
        return out

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
            self._closer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        mpp = "unknown" if self.mpp is None else f"{self.mpp:.4g} um/px"
        return f"<Slide {self.path.name} {self.format} levels={self.level_shapes} mpp={mpp}>"

    def info(self) -> dict[str, Any]:
        """The JSON summary used by ``napari-bci info``."""
        return {
            "levels": self.level_shapes,
            "mpp": self.mpp,
            "format": self.format,
            "path": str(self.path),
            "downsamples": [round(d, 4) for d in self.downsamples],
            "native_levels": self.native_levels,
            "backend": self.metadata.get("backend"),
        }


def is_slide_file(path: str | os.PathLike) -> bool:
    """The one "is it a slide" rule: a file :func:`open_slide` takes (a slide/image suffix, or
    PNG/JPEG/TIFF content under another name). Folders and unreadable paths are not."""
    p = Path(path)
    if p.name.lower().endswith(SLIDE_SUFFIXES):
        return not p.is_dir()
    try:
        return p.is_file() and sniff(p) is not None
    except OSError:
        return False


def open_slide(path: str | os.PathLike, *, on_error: str = "raise") -> Slide:
    """Open a slide or an image file lazily; InputError names the file and the problem.

    ``on_error``: what reading a tile whose data cannot be decoded does later: ``"raise"``
    (InputError naming the file, level and tile) or ``"fill"`` (white, one warning per tile;
    for viewing).
    """
    if on_error not in ("raise", "fill"):
        raise ValueError(f"on_error must be 'raise' or 'fill', not {on_error!r}")
    p = check_file(path)
    suffix = p.suffix.lower()
    if suffix in OPENSLIDE_ONLY:
        return _open_openslide(p, reason=f"{suffix} files")
    kind = sniff(p)
    if kind in ("png", "jpeg"):
        return _patch_slide(p, decode_png_jpeg(p, kind), kind)
    if kind == "tiff":
        return _open_tiff(p, fill=on_error == "fill")
    if suffix in IMAGE_SUFFIXES:  # all TIFF-based or PNG/JPEG: OpenSlide could not read it either
        raise InputError(p, f"not a {suffix[1:].upper()} image: the content is not PNG, JPEG or TIFF")
    if _openslide_available():
        return _open_openslide(p, reason="this file")
    raise InputError(p, "unsupported file type (napari-bci reads SVS, NDPI, OME-TIFF, TIFF, PNG, JPEG; "
                        "install napari-bci[openslide] for other slide formats)")


# --------------------------------------------------------------------------------- patches


def _patch_slide(p: Path, arr: np.ndarray, fmt: str) -> Slide:
    import dask.array as da

    level0 = da.from_array(arr, chunks=(1024, 1024, 3), name=f"patch-{next(_ids)}-{p.name}")
    levels = _with_synthesised_levels([level0])
    return Slide(p, fmt, levels, None, {"backend": "image", "synthesised_levels": len(levels) - 1},
                 native_levels=1)


# ------------------------------------------------------------------------------------ TIFF


def _tiff_format(tf) -> str:
    for flag, name in (("is_svs", "svs"), ("is_ndpi", "ndpi"), ("is_ome", "ome-tiff"), ("is_scn", "scn"),
                       ("is_bif", "bif"), ("is_qpi", "qptiff"), ("is_philips", "philips-tiff")):
        if getattr(tf, flag, False):
            return name
    return "tiff"


def _pick_series(tf):
    """Index of the pyramid series: the largest image that is not an associated image."""
    best, best_area = None, -1
    for i, s in enumerate(tf.series):
        if (s.name or "").strip().lower() in ASSOCIATED:
            continue
        h, w = _yx(s)
        if h * w > best_area:
            best, best_area = i, h * w
    if best is None:
        raise InputError(tf.filename, "no image series found")
    return best


def _yx(s) -> tuple[int, int]:
    axes = s.axes
    return int(s.shape[axes.index("Y")]), int(s.shape[axes.index("X")])


def _mpp_from_tiff(tf, series, fmt: str) -> float | None:
    page = series.pages[0] if series.pages else tf.pages[0]
    desc = page.description or ""
    if fmt == "svs":
        m = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", desc)
        if m:
            return float(m.group(1))
    if fmt == "ome-tiff" and tf.ome_metadata:
        mpp = _mpp_from_ome(tf.ome_metadata, tf.series.index(series))
        if mpp:
            return mpp
    tags = page.tags
    xres, unit = tags.get("XResolution"), tags.get("ResolutionUnit")
    if xres is not None and unit is not None:
        num, den = xres.value
        ppu = num / den if den else 0.0
        um_per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
        if ppu > 0 and um_per_unit:
            mpp = um_per_unit / ppu
            if 0.01 < mpp < 1000:  # (1, 1) per inch/cm is a default, not a measurement
                return mpp
    return None


_UNIT_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "pm": 1e-6}


def _mpp_from_ome(xml: str, series: int) -> float | None:
    from xml.etree import ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    pixels = [el for el in root.iter() if el.tag.endswith("}Pixels") or el.tag == "Pixels"]
    idx = series
    if not pixels:
        return None
    px = pixels[idx] if idx < len(pixels) else pixels[0]
    v = px.get("PhysicalSizeX")
    if v is None:
        return None
    unit = px.get("PhysicalSizeXUnit", "µm")
    return float(v) * _UNIT_UM.get(unit, 1.0)


def _normalise_axes(arr, axes: str, src: Path, photometric: int | None, colormap):
    """A dask array with tifffile ``axes`` as ``(Y, X[, S|C])``; extra planes: the first, with a warning."""
    extra = [i for i, a in enumerate(axes) if a not in "YXSC"]
    if "C" in axes and "S" in axes:
        extra.append(axes.index("C"))
    if extra:
        index = tuple(0 if i in extra else slice(None) for i in range(arr.ndim))
        if any(arr.shape[i] > 1 for i in extra):
            warnings.warn(f"{src}: has {axes} axes of shape {tuple(arr.shape)}; showing the first plane only",
                          UserWarning, stacklevel=4)
        arr = arr[index]
        axes = "".join(a for i, a in enumerate(axes) if i not in extra)
    order = [axes.index(a) for a in ("Y", "X", "C" if "C" in axes else "S") if a in axes]
    if order != list(range(len(order))):  # e.g. planar RGB (axes CYX): move channels last
        arr = arr.transpose(order)
    if photometric == 3 and colormap is not None:  # palette
        lut = np.asarray(colormap)
        lut = (lut >> 8).astype(np.uint8).T if lut.max() > 255 else lut.astype(np.uint8).T
        arr = arr.map_blocks(lambda b: lut[b], dtype=np.uint8, new_axis=2, chunks=arr.chunks + ((3,),))
    elif photometric == 0 and arr.ndim == 2 and arr.dtype == np.uint8:  # min-is-white
        arr = 255 - arr
    return to_rgb8(arr, src)


class _TiffLog:
    """Collects what tifffile logs (e.g. "invalid offset to first page") instead of letting it
    reach stderr, so the problem becomes part of one error line or one warning naming the file."""

    def __enter__(self):
        import logging

        self.messages: list[str] = []
        self.logger = logging.getLogger("tifffile")
        self.handler = logging.Handler()
        self.handler.emit = lambda rec: self.messages.append(
            re.sub(r"^<tifffile\.\w+ @\d+> ", "", rec.getMessage()))
        self.saved = self.logger.propagate
        self.logger.addHandler(self.handler)
        self.logger.propagate = False
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        self.logger.propagate = self.saved

    def why(self) -> str:
        return f" ({self.messages[0]})" if self.messages else ""


def _open_tiff(p: Path, fill: bool = False) -> Slide:
    import tifffile

    with _TiffLog() as log:
        try:
            tf = tifffile.TiffFile(p)
            series_list = tf.series
        except Exception as e:
            if _openslide_available():
                return _open_openslide(p, reason=f"tifffile could not read it ({e})")
            raise InputError(p, f"corrupt or unreadable TIFF ({type(e).__name__}: {e})") from None
    for m in dict.fromkeys(log.messages):
        if series_list:
            warnings.warn(f"{p}: {m}", UserWarning, stacklevel=3)
    try:
        if not series_list:
            raise InputError(p, "TIFF without images" + (f"; the file is damaged or truncated{log.why()}"
                                                         if log.messages else ""))
        fmt = _tiff_format(tf)
        idx = _pick_series(tf)
        series = series_list[idx]
        level_series = [(series, i) for i in range(len(series.levels))]
        if len(level_series) == 1 and fmt == "tiff":
            level_series += [(s, 0) for s in _generic_reduced_series(tf, series)]
        _check_offsets(p, tf, [s.levels[i] for s, i in level_series])
        raws: list[_RawStrips] = []
        levels = [_tiff_level(p, tf, s, lv, i, fill, raws) for i, (s, lv) in enumerate(level_series)]
        _check_decodes(p, levels[-1])
        mpp = _mpp_from_tiff(tf, series, fmt)
        meta = {
            "backend": "tifffile",
            "series": idx,
            "series_name": series.name,
            "associated": [s.name for s in series_list if (s.name or "").strip().lower() in ASSOCIATED],
            "tiled": bool(series.pages[0].is_tiled) if series.pages else None,
        }
        native = len(levels)
        levels = _with_synthesised_levels(levels)
        meta["synthesised_levels"] = len(levels) - native
    except BaseException:
        tf.close()
        raise

    def close():
        for r in raws:
            r.close()
        tf.close()

    return Slide(p, fmt, levels, mpp, meta, closer=close, native_levels=native)


def _generic_reduced_series(tf, base) -> list:
    """Further top-level series that are consistent 2^k-ish reductions of ``base`` (generic pyramids)."""
    H, W = _yx(base)
    out, last = [], (H, W)
    for s in tf.series[tf.series.index(base) + 1:]:
        if (s.name or "").strip().lower() in ASSOCIATED or not s.pages or not s.pages[0].is_tiled:
            continue
        h, w = _yx(s)
        if not (h < last[0] and w < last[1]):
            continue
        d = W / w
        if abs(H / d - h) <= max(1.0, 0.01 * h) and s.shape[-1] == base.shape[-1] and s.dtype == base.dtype:
            out.append(s)
            last = (h, w)
    return out


def _check_offsets(p: Path, tf, level_series) -> None:
    size = os.path.getsize(p)
    for i, s in enumerate(level_series):
        for page in s.pages[:1]:
            page = page.keyframe if hasattr(page, "keyframe") else page
            ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts) if c]
            if ends and max(ends) > size:
                raise InputError(p, f"truncated file: level {i} image data ends at byte {max(ends)} "
                                    f"but the file has {size} bytes")
            if ends and page.is_tiled and any(c == 0 for c in page.databytecounts):
                warnings.warn(f"{p}: level {i} has missing tiles (shown as empty)", UserWarning, stacklevel=4)


def _tiff_level(p: Path, tf, series, level: int, i: int, fill: bool = False, raws: list | None = None):
    import dask.array as da
    import zarr

    s = series.levels[level]
    page = s.pages[0]
    page = page.keyframe if hasattr(page, "keyframe") else page
    chunk_bytes = int(np.prod(page.chunks)) * page.dtype.itemsize if page.chunks else 0
    h, w = _yx(s)
    raw = None if page.is_tiled else _RawStrips.for_level(p, tf, s)
    if raw is None and chunk_bytes > MAX_CHUNK_BYTES:
        kind = "tile" if page.is_tiled else ("strip" if len(page.dataoffsets) > 1 else "single strip")
        raise InputError(p, f"{w}x{h} image stored as compressed {kind}s of {chunk_bytes / 2**20:.0f} MiB, "
                            f"too large to read lazily; convert it to a tiled pyramid "
                            f"(e.g. `vips tiffsave IN OUT --tile --pyramid --compression jpeg`)")
    if raw is not None:
        if raws is not None:
            raws.append(raw)
        arr = da.from_array(raw, chunks=(1024, 1024) + raw.shape[2:], name=f"strips-{next(_ids)}-{p.name}-L{i}",
                            asarray=False, fancy=False, lock=False, inline_array=True)
    else:
        z = zarr.open_array(series.aszarr(level=level), mode="r")
        # dask chunks of ~512 px group tiles under 256 px: one zarr call per group, far fewer
        # tasks. Tiles of 256 px and more stay one chunk each, so a corrupt tile fails only the
        # windows that overlap it (a whole group would fail with it).
        chunks = tuple(c * max(1, round(512 / c)) if k < 2 and c < 256 else c for k, c in enumerate(z.chunks))
        arr = da.from_array(_Chunks(p, z, page, i, fill), chunks=chunks, name=f"tiff-{next(_ids)}-{p.name}-L{i}",
                            asarray=False, fancy=False, lock=False, inline_array=True)
    return _normalise_axes(arr, s.axes, p, page.photometric, getattr(page, "colormap", None))


class _Chunks:
    """One TIFF level's zarr array for dask, whose read errors name the file, the level and the
    tile (or strip). ``fill``: a tile that cannot be decoded reads as white, with one warning
    naming it (for viewing), instead of raising :class:`InputError`."""

    def __init__(self, path: Path, z, page, level: int, fill: bool = False):
        self.path, self.z, self.level, self.fill = path, z, level, fill
        self.shape, self.dtype, self.ndim = z.shape, z.dtype, z.ndim
        self.tiled = bool(page.is_tiled)
        self.warned: set = set()

    def __getitem__(self, key):
        try:
            return self.z[key]
        except InputError:
            raise
        except Exception as e:
            return self._locate(key, e)

    def _locate(self, key, first: Exception):
        """Re-read ``key`` chunk by chunk to name the bad one(s); fill or raise."""
        (y0, y1, _), (x0, x1, _) = key[0].indices(self.shape[0]), key[1].indices(self.shape[1])
        th, tw = self.z.chunks[:2]
        rest = tuple(key[2:])
        out = np.full((y1 - y0, x1 - x0) + tuple(self.shape[2:]), 255, self.dtype)[(slice(None), slice(None)) + rest]
        for cy in range(y0 // th, -(-y1 // th)):
            for cx in range(x0 // tw, -(-x1 // tw)):
                ty0, tx0 = max(cy * th, y0), max(cx * tw, x0)
                ty1, tx1 = min((cy + 1) * th, y1), min((cx + 1) * tw, x1)
                try:
                    out[ty0 - y0:ty1 - y0, tx0 - x0:tx1 - x0] = self.z[(slice(ty0, ty1), slice(tx0, tx1)) + rest]
                except Exception as e:
                    where = self._where(cy, cx, th, tw)
                    problem = f"corrupt image data in {where} ({type(e).__name__}: {e})"
                    if not self.fill:
                        raise InputError(self.path, problem) from None
                    if (cy, cx) not in self.warned:
                        self.warned.add((cy, cx))
                        warnings.warn(f"{self.path}: {problem}; shown as white", UserWarning, stacklevel=2)
        if not self.fill:  # the chunk-wise re-read worked: report the first error
            raise InputError(self.path, f"cannot read level {self.level} at y={y0}-{y1}, x={x0}-{x1} "
                                        f"({type(first).__name__}: {first})") from None
        return out

    def _where(self, cy: int, cx: int, th: int, tw: int) -> str:
        if self.tiled:
            n_cols = -(-self.shape[1] // tw)
            return (f"level {self.level} tile {cy * n_cols + cx} (row {cy}, column {cx}; "
                    f"y={cy * th}, x={cx * tw}, {th}x{tw} px)")
        return f"level {self.level} strip {cy} (rows {cy * th}-{min((cy + 1) * th, self.shape[0]) - 1})"


class _RawStrips:
    """An uncompressed, interleaved strip image read by windows (``os.preadv`` straight into the
    result): memory per read is the window, never the image; nothing is memory-mapped, so the
    resident set stays flat however much of the file is read."""

    def __init__(self, path: Path, shape: tuple, dtype, offsets, rows_per_strip: int):
        self.path, self.shape = path, tuple(int(x) for x in shape)
        self.stored = np.dtype(dtype)  # the file's byte order; reads come back native
        self.dtype = self.stored.newbyteorder("=")
        self.ndim = len(self.shape)
        self.offsets = np.asarray(offsets, np.int64)
        self.rps = int(rows_per_strip)
        self.pixel = self.dtype.itemsize * (self.shape[2] if self.ndim == 3 else 1)
        self.row = self.shape[1] * self.pixel
        self._fd, self._pid = None, None

    @classmethod
    def for_level(cls, p: Path, tf, s) -> "_RawStrips | None":
        page = s.pages[0]
        page = page.keyframe if hasattr(page, "keyframe") else page
        if (len(s.pages) != 1 or page.is_tiled or page.compression != 1 or page.predictor not in (None, 1)
                or page.fillorder != 1 or page.bitspersample % 8 or (page.samplesperpixel > 1 and page.planarconfig != 1)):
            return None
        h, w = _yx(s)
        shape = (h, w, page.samplesperpixel) if page.samplesperpixel > 1 else (h, w)
        if s.axes not in ("YXS", "YX"):
            return None
        rps = min(int(page.rowsperstrip or h), h)
        if len(page.dataoffsets) < -(-h // rps):
            return None
        return cls(p, shape, page.dtype.newbyteorder(tf.byteorder), page.dataoffsets, rps)

    def __getstate__(self):  # picklable (dask workers): reopened by path in the new process
        d = dict(self.__dict__)
        d["_fd"] = d["_pid"] = None
        return d

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            try:
                self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            except OSError as e:
                raise InputError(self.path, f"cannot read: {e.strerror}") from None
            self._pid = os.getpid()
        return self._fd

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        y0, y1, _ = key[0].indices(self.shape[0])
        x0, x1, _ = (key[1] if len(key) > 1 else slice(None)).indices(self.shape[1])
        h, w = max(0, y1 - y0), max(0, x1 - x0)
        out = np.empty((h, w) + self.shape[2:], self.stored)
        if h and w:
            fd, n = self._file(), w * self.pixel
            flat = out.reshape(h, n // self.dtype.itemsize).view(np.uint8)
            full = x0 == 0 and w == self.shape[1]
            r = y0
            while r < y1:  # full-width windows: one read per strip; else one per row
                take = min(y1, (r // self.rps + 1) * self.rps) - r if full else 1
                off = int(self.offsets[r // self.rps]) + (r % self.rps) * self.row + x0 * self.pixel
                buf, done = flat[r - y0:r - y0 + take].reshape(-1), 0
                while done < buf.nbytes:
                    got = _pread_into(fd, buf[done:], off + done)
                    if got <= 0:
                        raise InputError(self.path, f"truncated image data: rows {r}-{r + take - 1} end past "
                                                    f"the end of the file")
                    done += got
                r += take
        if not self.stored.isnative:
            out = out.byteswap(inplace=True).view(self.dtype)
        return out[(slice(None), slice(None)) + tuple(key[2:])]


def _pread_into(fd: int, buf: np.ndarray, offset: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, [memoryview(buf)], offset)
    data = os.pread(fd, buf.nbytes, offset) if hasattr(os, "pread") else _seek_read(fd, buf.nbytes, offset)
    buf[:len(data)] = np.frombuffer(data, np.uint8)
    return len(data)


def _seek_read(fd: int, n: int, offset: int) -> bytes:
    import threading

    with _SEEK_LOCK.setdefault("lock", threading.Lock()):
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, n)


_SEEK_LOCK: dict = {}


def _check_decodes(p: Path, level) -> None:
    """Decode one chunk of the smallest native level, so corrupt tile data fails at open time."""
    cy, cx = level.chunks[0][0], level.chunks[1][0]
    try:
        level[:cy, :cx].compute()
    except InputError:
        raise
    except Exception as e:
        raise InputError(p, f"corrupt image data ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------- synthesised levels


def downsample2(a):
    """A lazy 2x2 box-filtered (mean, rounded) half-size copy of dask array ``a`` ``(H, W, 3)``."""
    h2, w2 = a.shape[0] // 2, a.shape[1] // 2
    a = a[: 2 * h2, : 2 * w2]
    cy = _even_chunk(a.chunks[0][0])
    cx = _even_chunk(a.chunks[1][0])
    a = a.rechunk((cy, cx, 3))
    out_chunks = (tuple(c // 2 for c in a.chunks[0]), tuple(c // 2 for c in a.chunks[1]), (3,))
    return a.map_blocks(reduce2, dtype=np.uint8, chunks=out_chunks)


def _even_chunk(native: int, target: int = 1024) -> int:
    c = native * max(1, round(target / native)) if native <= target else target
    return c if c % 2 == 0 else 2 * c


def _with_synthesised_levels(levels: list) -> list:
    levels = list(levels)
    if max(levels[0].shape[:2]) <= SYNTH_ABOVE:
        return levels
    while min(levels[-1].shape[:2]) > MIN_LEVEL_SIZE:
        levels.append(downsample2(levels[-1]))
    return levels


# ------------------------------------------------------------------------------- OpenSlide


def _openslide_available() -> bool:
    try:
        import openslide  # noqa: F401
    except Exception:
        return False
    return True


class _OpenSlideLevel:
    """Array-like view of one OpenSlide level for ``da.from_array``."""

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, osr, level: int):
        self.osr, self.level = osr, level
        w, h = osr.level_dimensions[level]
        self.shape = (h, w, 3)
        self.ds = osr.level_downsamples[level]

    def __getitem__(self, key):
        ys, xs = key[0], key[1]
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        if y1 <= y0 or x1 <= x0:
            return np.zeros((max(0, y1 - y0), max(0, x1 - x0), 3), np.uint8)[(slice(None), slice(None)) + tuple(key[2:])]
        img = self.osr.read_region((int(x0 * self.ds), int(y0 * self.ds)), self.level, (x1 - x0, y1 - y0))
        rgba = np.asarray(img)
        a = rgba[..., 3:4].astype(np.float32) / 255.0
        rgb = np.rint(rgba[..., :3] * a + 255.0 * (1 - a)).astype(np.uint8)
        return rgb[(slice(None), slice(None)) + tuple(key[2:])]


_OPENSLIDE_FORMATS = {"aperio": "svs", "hamamatsu": "ndpi", "mirax": "mrxs", "generic-tiff": "tiff", "leica": "scn",
                      "ventana": "bif", "philips": "philips-tiff", "dicom": "dicom", "sakura": "svslide",
                      "trestle": "tif", "zeiss": "czi"}


def _open_openslide(p: Path, reason: str) -> Slide:
    if not _openslide_available():
        raise InputError(p, f"{reason} need the OpenSlide backend: pip install 'napari-bci[openslide]'")
    import dask.array as da
    import openslide

    try:
        osr = openslide.OpenSlide(str(p))
    except Exception as e:
        raise InputError(p, f"unsupported or corrupt slide ({type(e).__name__}: {e})") from None
    levels = [da.from_array(_OpenSlideLevel(osr, i), chunks=(512, 512, 3), name=f"openslide-{next(_ids)}-L{i}",
                            asarray=True, fancy=False, lock=True)
              for i in range(osr.level_count)]
    props = dict(osr.properties)
    mpp = props.get(openslide.PROPERTY_NAME_MPP_X)
    meta = {"backend": "openslide", "vendor": props.get(openslide.PROPERTY_NAME_VENDOR),
            "associated": list(osr.associated_images.keys())}
    native = len(levels)
    levels = _with_synthesised_levels(levels)
    meta["synthesised_levels"] = len(levels) - native
    vendor = props.get(openslide.PROPERTY_NAME_VENDOR) or ""
    fmt = _OPENSLIDE_FORMATS.get(vendor, vendor or p.suffix.lstrip(".").lower())
    return Slide(p, fmt, levels, float(mpp) if mpp else None, meta, closer=osr.close, native_levels=native)


def level_count_for(shape: tuple[int, int], min_size: int = MIN_LEVEL_SIZE) -> int:
    """Levels a pyramid of ``shape`` gets when halving until the smaller side is <= ``min_size``."""
    n, (h, w) = 1, shape
    while min(h, w) > min_size:
        h, w, n = h // 2, w // 2, n + 1
    return n
