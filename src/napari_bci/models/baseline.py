"""The classical, weight-free ``baseline`` generator: a stain-space mapping.

H&E is separated into hematoxylin and eosin (Ruifrok-Johnston colour deconvolution); the
hematoxylin is re-rendered as the IHC counterstain (slightly lighter, as hematoxylin in HER2
IHC is a light counterstain), eosin becomes a faint counterstain tint (or nothing), and no DAB
is drawn: a learned model has to beat this floor by predicting where the brown goes.
Pixel-wise, so it needs no halo and is exactly seam-free.
"""

from __future__ import annotations

import numpy as np

from .. import stain
from .base import Generator, check_tiles


class BaselineGenerator(Generator):
    name = "baseline"
    tile = 512
    halo = 0
    mpp = None
    predicts_her2 = False
    description = "classical stain-space mapping (hematoxylin kept, no DAB); weight-free floor"

    def __init__(self, hematoxylin_gain: float = 0.8, eosin_gain: float = 0.15, **_: object):
        self.hematoxylin_gain = float(hematoxylin_gain)
        self.eosin_gain = float(eosin_gain)
        self._h = (stain.HEMATOXYLIN / np.linalg.norm(stain.HEMATOXYLIN)).astype(np.float32)[None]

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        tiles = check_tiles(tiles)
        conc = stain.separate(tiles, stain.HE_MATRIX)
        h = np.maximum(conc[..., 0], 0.0) * self.hematoxylin_gain
        e = np.maximum(conc[..., 1], 0.0) * self.eosin_gain
        # counterstain only: hematoxylin, plus a faint hematoxylin-coloured tint where eosin was
        return stain.render((h + e)[..., None], self._h)
