"""Small images (patches): PNG, JPEG, plain TIFF -> ``(H, W, 3)`` uint8 RGB, read whole.

Builds on :mod:`.pixels` (decoding, layout conversion) and :mod:`.slide` (TIFF); the names
``sniff``, ``check_file``, ``to_rgb8`` and the suffix tuples are re-exported from ``pixels``.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import InputError
from .pixels import (  # noqa: F401  (re-exported)
    IMAGE_SUFFIXES, JPEG_MAGIC, PATCH_SUFFIXES, PNG_MAGIC, TIFF_MAGICS, TIFF_SUFFIXES, check_file,
    decode_png_jpeg, sniff, to_rgb8,
)
from .slide import open_slide


def read_patch(path: str | os.PathLike) -> np.ndarray:
    """Decode a PNG, JPEG or small TIFF file into ``(H, W, 3)`` uint8 RGB.

    Raises InputError (naming the file) for missing, empty, truncated, corrupt or
    non-image files; warns when it converts the pixel layout.
    """
    p = check_file(path)
    kind = sniff(p)
    if kind is None:
        raise InputError(p, "not an image: the content is not PNG, JPEG or TIFF")
    if kind == "tiff":
        with open_slide(p) as s:
            return s.read_region(0, 0, 0, *s.shape[:2])
    return decode_png_jpeg(p, kind)
