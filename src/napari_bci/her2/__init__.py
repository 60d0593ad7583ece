"""HER2 scoring: explainable ASCO/CAP 2018 scoring of (virtual or real) HER2 IHC, and the learned
level prediction from H&E. Headless (no Qt, no napari)."""

from .cells import CellParams
from .scoring import CLASSES, LEVELS, HER2Result, ScoreParams, score
from .tiles import LEGEND, LEVEL_COLOURS, ScoreMap, score_map, score_polygon

__all__ = [
    "CLASSES", "LEVELS", "LEGEND", "LEVEL_COLOURS", "CellParams", "HER2Result", "ScoreMap",
    "ScoreParams", "score", "score_map", "score_polygon",
]
