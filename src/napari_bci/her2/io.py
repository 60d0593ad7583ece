"""Reading IHC images and region polygons for the HER2 scorer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import InputError


def load_image(path) -> tuple[list, float | None]:
    """(pyramid levels, level-0 mpp or None) of an image or slide file."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, "no such file")
    try:
        from ..io.slide import open_slide
    except ImportError:
        open_slide = None
    if open_slide is not None:
        s = open_slide(p)
        levels = list(getattr(s, "levels", None) or [s])
        return levels, getattr(s, "mpp", None)
    try:
        from skimage.io import imread

        a = imread(str(p))
    except Exception as e:  # any decoder failure is a bad input file
        raise InputError(p, f"cannot read image ({type(e).__name__}: {e})") from None
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise InputError(p, f"not an RGB image (shape {a.shape})")
    return [a[..., :3]], None


def _polygons_from_geojson(obj) -> list[tuple[str, np.ndarray]]:
    feats = obj.get("features", [obj]) if isinstance(obj, dict) else list(obj)
    out = []
    for i, f in enumerate(feats):
        if not isinstance(f, dict):
            continue
        geom = f.get("geometry", f) or {}
        props = f.get("properties") or {}
        name = props.get("name") or (props.get("classification") or {}).get("name") or f"region {i + 1}"
        t, coords = geom.get("type"), geom.get("coordinates")
        rings = []
        if t == "Polygon" and coords:
            rings = [coords[0]]
        elif t == "MultiPolygon" and coords:
            rings = [poly[0] for poly in coords if poly]
        for k, ring in enumerate(rings):
            arr = np.asarray(ring, float)
            if arr.ndim == 2 and arr.shape[0] >= 3 and arr.shape[1] >= 2:
                out.append((name if len(rings) == 1 else f"{name} ({k + 1})", arr[:, :2]))
    return out


def load_regions(path) -> list[tuple[str, object]]:
    """Named regions ``[(name, region), ...]`` from a (QuPath) GeoJSON file; ``region`` is a
    :class:`napari_bci.regions.Region` (or, without that module, an (x, y) polygon array)."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, "no such file")
    try:
        from ..regions import read_geojson
    except ImportError:  # minimal fallback: outer rings of Polygons / MultiPolygons
        read_geojson = None
    if read_geojson is not None:
        regions = [(r.label if (r.name or r.classification) else f"region {i + 1}", r)
                   for i, r in enumerate(read_geojson(p))]
    else:
        try:
            obj = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise InputError(p, f"not a GeoJSON file ({e})") from None
        regions = [(n, poly - 0.5) for n, poly in _polygons_from_geojson(obj)]
    if not regions:
        raise InputError(p, "no polygons found")
    return regions
