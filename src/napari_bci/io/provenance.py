"""Provenance of a generated (virtual) IHC file: which model made it, from which H&E, and whether
that H&E was outside the model's training domain, so that a later reader (``napari-bci score``,
the viewer) can say what the image is.

The record is one line of JSON behind :data:`PREFIX`, stored where each format keeps free text:
a PNG ``tEXt`` chunk (keyword :data:`KEYWORD`), a JPEG comment (COM) segment, a TIFF's
ImageDescription, or the ``Description`` of an OME-TIFF's image. Files without one read as None.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

#: PNG tEXt keyword, and the prefix of the record in the other formats
KEYWORD = "napari-bci"
PREFIX = "napari-bci virtual IHC: "


def record(model: str, source: str | os.PathLike | None = None, out_of_domain: str | None = None) -> dict:
    """The provenance of a virtual IHC made by ``model`` from the H&E ``source``;
    ``out_of_domain``: the model's out-of-domain warning on that H&E (None: within its domain)."""
    from .. import __version__

    return {"virtual_ihc": True, "model": str(model), "source": None if source is None else str(source),
            "out_of_domain": out_of_domain, "napari_bci": __version__}


def text(rec: dict) -> str:
    """The record as stored (7-bit ASCII, as TIFF descriptions must be)."""
    return PREFIX + json.dumps(rec, ensure_ascii=True, separators=(",", ":"))


def _parse(s: str | bytes | None) -> dict | None:
    if isinstance(s, bytes):
        s = s.decode("latin-1")
    if not s or not s.startswith(PREFIX):
        return None
    try:
        rec = json.loads(s[len(PREFIX):])
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def add_to_png(data: bytes, rec: dict) -> bytes:
    """PNG bytes with the record as a ``tEXt`` chunk right after the header chunk."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG stream")
    end = 8 + 12 + struct.unpack(">I", data[8:12])[0]  # signature, IHDR (length, type, data, crc)
    body = b"tEXt" + KEYWORD.encode("latin-1") + b"\0" + text(rec).encode("latin-1")
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    return data[:end] + chunk + data[end:]


def add_to_jpeg(data: bytes, rec: dict) -> bytes:
    """JPEG bytes with the record as a comment segment right after the start-of-image marker."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG stream")
    payload = text(rec).encode("latin-1")
    if len(payload) > 65533:
        raise ValueError("provenance record too long for a JPEG comment")
    return data[:2] + b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


def _from_png(f) -> dict | None:
    f.seek(8)
    while True:
        head = f.read(8)
        if len(head) < 8:
            return None
        n, kind = struct.unpack(">I", head[:4])[0], head[4:]
        if kind in (b"IDAT", b"IEND"):
            return None  # the writer puts the record before the image data
        body = f.read(n)
        f.seek(4, 1)
        if kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            if key == KEYWORD.encode("latin-1"):
                return _parse(value)


def _from_jpeg(f) -> dict | None:
    f.seek(2)
    while True:
        head = f.read(4)
        if len(head) < 4 or head[0] != 0xFF or head[1] in (0xDA, 0xD9):  # start of scan / end
            return None
        n = struct.unpack(">H", head[2:])[0]
        body = f.read(n - 2)
        if head[1] == 0xFE:
            rec = _parse(body)
            if rec is not None:
                return rec


def _from_tiff(path: Path) -> dict | None:
    import xml.etree.ElementTree as ET

    import tifffile

    with tifffile.TiffFile(path) as tf:
        desc = tf.pages[0].description if len(tf.pages) else ""
    rec = _parse(desc)
    if rec is not None or "<OME" not in desc[:512]:
        return rec
    try:
        root = ET.fromstring(desc)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.endswith("}Description") or el.tag == "Description":
            rec = _parse((el.text or "").strip())
            if rec is not None:
                return rec
    return None


def read(path: str | os.PathLike) -> dict | None:
    """The provenance record of the image file at ``path``, None when it has none (or cannot be
    read: reading the image itself reports that)."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            return _from_tiff(path)
        if suffix not in (".png", ".jpg", ".jpeg"):
            return None
        with open(path, "rb") as f:
            return _from_png(f) if suffix == ".png" else _from_jpeg(f)
    except (OSError, ValueError, struct.error):  # tifffile's errors are ValueErrors; damaged: no record
        return None
