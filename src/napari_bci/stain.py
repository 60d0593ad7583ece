"""Stain optics: Beer-Lambert optical density and Ruifrok-Johnston colour deconvolution.

One place for the stain vectors and the RGB <-> optical-density conversions used by the
synthetic sample renderer, the classical generator, the metrics and the HER2 scorer.
Optical density (OD) is ``-log10(I / I0)`` with ``I0 = 255`` (skimage's convention uses
natural log; values here are base-10, as in Ruifrok & Johnston 2001 and QuPath).
"""

from __future__ import annotations

import numpy as np

#: Unit stain vectors (OD per channel R, G, B), Ruifrok & Johnston 2001.
HEMATOXYLIN = np.array([0.65, 0.70, 0.29])
EOSIN = np.array([0.07, 0.99, 0.11])
DAB = np.array([0.27, 0.57, 0.78])

I0 = 255.0
#: OD of one intensity level below full transmission; keeps log finite.
_MIN_I = 1.0


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def stain_matrix(*vectors: np.ndarray) -> np.ndarray:
    """A 3x3 stain matrix (rows = unit stain vectors); a third row is completed by the cross
    product when only two stains are given."""
    rows = [_unit(v) for v in vectors]
    if len(rows) == 2:
        rows.append(_unit(np.cross(rows[0], rows[1])))
    if len(rows) != 3:
        raise ValueError("stain_matrix needs two or three stain vectors")
    return np.stack(rows)


HE_MATRIX = stain_matrix(HEMATOXYLIN, EOSIN)
HDAB_MATRIX = stain_matrix(HEMATOXYLIN, DAB)
#: The matrix skimage's ``rgb2hed`` uses: H, E, DAB.
HED_MATRIX = stain_matrix(HEMATOXYLIN, EOSIN, DAB)


def rgb_to_od(rgb: np.ndarray) -> np.ndarray:
    """RGB (uint8 or float in 0..255) -> base-10 optical density, float32, same shape."""
    i = np.maximum(np.asarray(rgb, dtype=np.float32), _MIN_I)
    return -np.log10(i / I0)


def od_to_rgb(od: np.ndarray) -> np.ndarray:
    """Base-10 optical density -> RGB uint8 (Beer-Lambert transmission)."""
    i = I0 * np.power(10.0, -np.maximum(np.asarray(od, dtype=np.float32), 0.0))
    return np.clip(np.rint(i), 0, 255).astype(np.uint8)


def render(concentrations: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Render stain concentrations ``(..., k)`` (OD units along each unit vector) with the
    ``(k, 3)`` stain matrix into RGB uint8 by Beer-Lambert."""
    od = np.asarray(concentrations, dtype=np.float32) @ np.asarray(matrix, dtype=np.float32)
    return od_to_rgb(od)


def separate(rgb: np.ndarray, matrix: np.ndarray = HED_MATRIX) -> np.ndarray:
    """Colour deconvolution: RGB ``(..., 3)`` -> stain concentrations ``(..., 3)`` in OD units,
    ordered as the rows of ``matrix`` (default H, E, DAB)."""
    od = rgb_to_od(rgb)
    inv = np.linalg.inv(np.asarray(matrix, dtype=np.float64)).astype(np.float32)
    return od @ inv


def hematoxylin(rgb: np.ndarray, matrix: np.ndarray = HED_MATRIX) -> np.ndarray:
    """Hematoxylin concentration (OD units, float32, >= 0)."""
    return np.maximum(separate(rgb, matrix)[..., 0], 0.0)


def dab(rgb: np.ndarray, matrix: np.ndarray = HED_MATRIX) -> np.ndarray:
    """DAB concentration (OD units, float32, >= 0); uses the last row of ``matrix``."""
    return np.maximum(separate(rgb, matrix)[..., -1], 0.0)
