"""Registration of H&E (moving) onto IHC (fixed): landmarks, automatic features, deformable
refinement, whole slides in parts, lazy warping and quality figures. Headless (no Qt/napari).

The result is a :class:`napari_bci.transform.Transform` (moving -> fixed, level-0 ``(x, y)`` px).
"""

from ..transform import Transform
from .api import METHODS, RegistrationResult, map_shapes, map_vertices, register
from .deformable import ENGINES, elastix_available, register_deformable
from .features import RegistrationFailed, register_auto
from .landmarks import LandmarkFit, fit_landmarks, read_landmarks_csv, write_landmarks_csv
from .quality import folded_fraction, mutual_information, ncc, quality_report, tre
from .warp import warp, warp_lazy, warp_levels, warp_region

__all__ = [
    "ENGINES", "METHODS", "LandmarkFit", "RegistrationFailed", "RegistrationResult", "Transform",
    "elastix_available", "fit_landmarks", "folded_fraction", "map_shapes", "map_vertices",
    "mutual_information", "ncc", "quality_report",
    "read_landmarks_csv", "register", "register_auto", "register_deformable", "tre", "warp", "warp_lazy",
    "warp_levels", "warp_region", "write_landmarks_csv",
]
