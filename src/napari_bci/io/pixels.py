"""Ground floor of ``io``: what a file is (magic bytes, suffixes), whether it can be read, PNG/JPEG
decoding, and the one place that converts other pixel layouts (grayscale, RGBA, 16-bit, float,
planar) to ``(H, W, 3)`` uint8 RGB, with a ``warnings.warn`` naming the file whenever it changes
the data. Imports nothing else of ``io`` (``slide`` and ``patches`` build on it).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from ..errors import InputError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

PATCH_SUFFIXES = (".png", ".jpg", ".jpeg")
TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".btf", ".tf8", ".qptiff")
IMAGE_SUFFIXES = PATCH_SUFFIXES + TIFF_SUFFIXES


def sniff(path: str | os.PathLike) -> str | None:
    """``"png" | "jpeg" | "tiff"`` from the file's first bytes, or None."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(PNG_MAGIC):
        return "png"
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    if head[:4] in TIFF_MAGICS:
        return "tiff"
    return None


def check_file(path: str | os.PathLike) -> Path:
    """The path as a ``Path``; InputError when it is missing, a directory, unreadable or empty."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, "no such file")
    if p.is_dir():
        raise InputError(p, "is a directory, not an image file")
    if not os.access(p, os.R_OK):
        raise InputError(p, "permission denied")
    if p.stat().st_size == 0:
        raise InputError(p, "empty file (0 bytes)")
    return p


def to_rgb8(arr, source, *, value_range: float | None = None):
    """``arr`` (numpy or dask; ``(H, W)``, ``(H, W, C)``) as ``(H, W, 3)`` uint8.

    Warns (naming ``source``) when it converts: grayscale -> RGB, RGBA/LA -> RGB over white,
    16-bit -> 8-bit (scaled by ``value_range``, default the dtype's maximum), float in
    [0, 1] (or [0, 255] when ``value_range`` is 255) -> uint8.
    """
    notes = []
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise InputError(source, f"unsupported image shape {tuple(arr.shape)}; expected a 2-D RGB image")
    c = arr.shape[2]
    if c not in (1, 2, 3, 4):
        raise InputError(source, f"unsupported number of channels ({c}); expected RGB")
    dt = np.dtype(arr.dtype)
    if dt == np.bool_:
        arr = arr.astype(np.uint8) * 255
        notes.append("1-bit converted to 8-bit")
    elif dt == np.uint16:
        vr = float(value_range or 65535)
        arr = _scale(arr, 255.0 / vr)
        notes.append(f"16-bit converted to 8-bit (value * 255/{vr:g})")
    elif dt.kind == "f":
        vr = float(value_range or 1.0)
        arr = _scale(arr, 255.0 / vr)
        notes.append(f"floating point converted to 8-bit (range 0-{vr:g})")
    elif dt != np.uint8:
        raise InputError(source, f"unsupported pixel type {dt}; expected 8- or 16-bit RGB")
    if c in (2, 4):
        arr = _over_white(arr)
        notes.append("alpha channel composited over white")
        c -= 1
    if c == 1:
        arr = _gray_to_rgb(arr)
        notes.append("grayscale shown as RGB")
    if notes:
        warnings.warn(f"{source}: {'; '.join(notes)}", UserWarning, stacklevel=3)
    return arr


def _scale(arr, factor):
    def f(a):
        return np.clip(np.rint(a.astype(np.float32) * factor), 0, 255).astype(np.uint8)

    return arr.map_blocks(f, dtype=np.uint8) if _is_dask(arr) else f(arr)


def _over_white(arr):
    def f(a):
        alpha = a[..., -1:].astype(np.float32) / 255.0
        rgb = a[..., :-1].astype(np.float32)
        return np.rint(rgb * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)

    if _is_dask(arr):
        arr = arr.rechunk({2: -1})
        return arr.map_blocks(f, dtype=np.uint8, chunks=arr.chunks[:2] + ((arr.shape[2] - 1,),))
    return f(arr)


def _gray_to_rgb(arr):
    if _is_dask(arr):
        import dask.array as da

        return da.concatenate([arr, arr, arr], axis=2).rechunk({2: 3})
    return np.repeat(arr, 3, axis=2)


def _is_dask(arr) -> bool:
    return type(arr).__module__.startswith("dask")


#: PNG/JPEG files are decoded whole: larger declared sizes are refused before decoding (a
#: 100 kB file can declare 100000 x 100000 pixels); whole slides belong in tiled TIFFs.
MAX_PATCH_PIXELS = 2**28


def declared_size(data: bytes, kind: str) -> tuple[int, int] | None:
    """``(height, width)`` that a PNG (IHDR) or JPEG (first SOF marker) header declares, or None."""
    if kind == "png":
        if len(data) >= 24 and data[12:16] == b"IHDR":
            return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")
        return None
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def decode_png_jpeg(p: Path, kind: str) -> np.ndarray:
    """Decode PNG or JPEG file ``p`` (``kind`` from :func:`sniff`) into ``(H, W, 3)`` uint8 RGB."""
    import imagecodecs

    data = p.read_bytes()
    size = declared_size(data, kind)
    if size is not None:
        h, w = size
        if h == 0 or w == 0:
            raise InputError(p, f"corrupt {kind.upper()}: the header declares a {w}x{h} image")
        if h * w > MAX_PATCH_PIXELS:
            raise InputError(p, f"{kind.upper()} declares {w}x{h} pixels ({h * w / 1e6:.0f} MP), more than the "
                                f"{MAX_PATCH_PIXELS / 1e6:.0f} MP decoded whole; convert it to a tiled pyramidal "
                                f"TIFF (e.g. `vips tiffsave IN OUT.tif --tile --pyramid`)")
    try:
        if kind == "png":
            arr = imagecodecs.png_decode(data)
        else:
            if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
                raise InputError(p, "truncated JPEG (no end-of-image marker)")
            arr = imagecodecs.jpeg8_decode(data)
    except InputError:
        raise
    except Exception as e:  # imagecodecs raises PngError/Jpeg8Error/... with libpng's text
        raise InputError(p, f"corrupt or truncated {kind.upper()} ({e})") from None
    return np.ascontiguousarray(to_rgb8(arr, p))
