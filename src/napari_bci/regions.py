"""Regions of interest: QuPath GeoJSON import/export and napari Shapes conversion (headless).

Coordinates: GeoJSON (as QuPath writes it) uses ``[x, y]`` in level-0 pixels of the full
image, origin top-left. napari Shapes data are ``(row, col) = (y, x)`` vertices in data
coordinates; the ``Regions`` layer shares the image layers' scale (um when mpp is known), so
its data coordinates are level-0 pixels too. napari centres pixel ``(0, 0)`` on ``(0, 0)``
while QuPath's pixel ``(0, 0)`` spans ``[0, 1)``, so ``x_geojson = col + 0.5`` and
``y_geojson = row + 0.5``.

QuPath's export (``File > Export objects as GeoJSON``, ``exportObjectsToGeoJson``) is a
FeatureCollection, or a list of Features, each with ``geometry`` (Polygon/MultiPolygon) and
``properties``: ``objectType`` ("annotation"), optional ``name``, ``classification``
(``{"name", "color": [r, g, b]}``; before 0.4 ``colorRGB``: packed int), ``isLocked`` and
``measurements`` (``{name: value}``; before 0.4 a list of ``{"name", "value"}``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .errors import InputError

#: GeoJSON (QuPath) coordinate of the centre of pixel 0, which napari puts at 0.
PIXEL_CENTRE = 0.5

#: napari shape types this module turns into regions (lines and paths have no area).
AREA_SHAPES = ("rectangle", "polygon", "ellipse")


@dataclass
class Region:
    """A region: ``parts`` is a list of polygons, each a list of rings (``(N, 2)`` float
    ``(x, y)`` level-0 pixels, open: the closing vertex is not repeated); the first ring of a
    part is its outline, any others are holes (GeoJSON MultiPolygon structure)."""

    parts: list[list[np.ndarray]]
    name: str | None = None
    classification: str | None = None
    color: tuple[int, int, int] | None = None
    measurements: dict[str, float] = field(default_factory=dict)
    object_type: str = "annotation"
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    shape_type: str = "polygon"  # how napari draws it: "rectangle" or "polygon"

    @property
    def outline(self) -> np.ndarray:
        """The outline of the first (largest after import) part."""
        return self.parts[0][0]

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` over all outlines."""
        pts = np.concatenate([p[0] for p in self.parts])
        return float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max())

    @property
    def area_px(self) -> float:
        """Area in level-0 square pixels (holes subtracted)."""
        total = 0.0
        for rings in self.parts:
            total += _ring_area(rings[0]) - sum(_ring_area(h) for h in rings[1:])
        return total

    @property
    def label(self) -> str:
        return self.name or self.classification or self.id[:8]

    def mask(self, shape: tuple[int, int], offset_xy=(0.0, 0.0), downsample: float = 1.0) -> np.ndarray:
        """Boolean mask of the region on a ``shape`` (h, w) grid whose pixel (0, 0) is level-0
        ``offset_xy`` and whose pixels are ``downsample`` level-0 pixels wide."""
        from skimage.draw import polygon as fill

        m = np.zeros(shape, bool)
        ox, oy = offset_xy
        for rings in self.parts:
            for k, ring in enumerate(rings):
                x = (ring[:, 0] - ox) / downsample - 0.5
                y = (ring[:, 1] - oy) / downsample - 0.5
                rr, cc = fill(y, x, shape)
                m[rr, cc] = k == 0  # outline fills, holes clear
        return m


def _ring_area(r: np.ndarray) -> float:
    x, y = r[:, 0], r[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _open_ring(coords, where: str) -> np.ndarray:
    a = np.asarray(coords, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] < 2 or len(a) < 3:
        raise ValueError(f"{where}: a ring needs at least 3 [x, y] positions")
    a = a[:, :2]
    if len(a) > 3 and np.allclose(a[0], a[-1]):
        a = a[:-1]
    if not np.isfinite(a).all():
        raise ValueError(f"{where}: non-finite coordinates")
    return a


def _closed(r: np.ndarray) -> list[list[float]]:
    pts = [[float(x), float(y)] for x, y in r]
    return pts + [pts[0]]


def is_axis_rectangle(ring: np.ndarray) -> bool:
    """Four vertices forming an axis-aligned rectangle (QuPath's rectangle ROI)."""
    if len(ring) != 4:
        return False
    xs, ys = np.unique(np.round(ring[:, 0], 6)), np.unique(np.round(ring[:, 1], 6))
    if len(xs) != 2 or len(ys) != 2:
        return False
    return all(abs(ring[i, 0] - ring[(i + 1) % 4, 0]) < 1e-6 or abs(ring[i, 1] - ring[(i + 1) % 4, 1]) < 1e-6
               for i in range(4))


# ------------------------------------------------------------------ GeoJSON import


def _color(c: Any) -> tuple[int, int, int] | None:
    if isinstance(c, (list, tuple)) and len(c) >= 3:
        return tuple(int(v) for v in c[:3])
    if isinstance(c, int):  # QuPath < 0.4: packed ARGB
        return ((c >> 16) & 255, (c >> 8) & 255, c & 255)
    return None


def _measurements(m: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(m, dict):
        items = m.items()
    elif isinstance(m, list):  # QuPath < 0.4
        items = ((d.get("name"), d.get("value")) for d in m if isinstance(d, dict))
    else:
        return out
    for k, v in items:
        if k is None:
            continue
        try:
            out[str(k)] = float(v) if v is not None else float("nan")
        except (TypeError, ValueError):
            continue
    return out


def _parts(geom: dict, where: str) -> list[list[np.ndarray]]:
    t = geom.get("type")
    coords = geom.get("coordinates")
    if t == "Polygon":
        polys = [coords]
    elif t == "MultiPolygon":
        polys = coords
    elif t == "GeometryCollection":
        out = []
        for g in geom.get("geometries", []):
            if g.get("type") in ("Polygon", "MultiPolygon"):
                out.extend(_parts(g, where))
        return out
    else:
        return []
    if not isinstance(polys, list):
        raise ValueError(f"{where}: {t} coordinates must be a list")
    return [[_open_ring(ring, where) for ring in poly] for poly in polys if poly]


def parse_geojson(obj: Any, source: str = "GeoJSON") -> list[Region]:
    """Regions from a parsed GeoJSON object: a FeatureCollection, a list of Features, one
    Feature, or a bare Polygon/MultiPolygon. Features without an area (points, lines) are
    skipped with a warning. Raises ``InputError`` naming ``source`` for malformed input."""
    if isinstance(obj, dict) and obj.get("type") == "FeatureCollection":
        feats = obj.get("features")
    elif isinstance(obj, list):
        feats = obj
    elif isinstance(obj, dict) and obj.get("type") == "Feature":
        feats = [obj]
    elif isinstance(obj, dict) and obj.get("type") in ("Polygon", "MultiPolygon"):
        feats = [{"type": "Feature", "geometry": obj, "properties": {}}]
    else:
        raise InputError(source, "not GeoJSON: expected a FeatureCollection, a Feature or a list of Features")
    if not isinstance(feats, list):
        raise InputError(source, "'features' must be a list")
    regions, skipped = [], 0
    for i, f in enumerate(feats):
        if not isinstance(f, dict) or not isinstance(f.get("geometry"), dict):
            raise InputError(source, f"feature {i} has no geometry object")
        props = f.get("properties") or {}
        try:
            parts = _parts(f["geometry"], f"feature {i}")
        except (ValueError, TypeError) as e:
            raise InputError(source, str(e)) from None
        if not parts:
            skipped += 1
            continue
        cls = props.get("classification") or {}
        if isinstance(cls, str):
            cls = {"name": cls}
        color = _color(cls.get("color", cls.get("colorRGB"))) or _color(props.get("color"))
        parts.sort(key=lambda rings: -_ring_area(rings[0]))
        single = len(parts) == 1 and len(parts[0]) == 1
        regions.append(
            Region(
                parts=parts,
                name=props.get("name"),
                classification=cls.get("name"),
                color=color,
                measurements=_measurements(props.get("measurements")),
                object_type=str(props.get("objectType", "annotation")),
                id=str(f.get("id") or uuid.uuid4()),
                shape_type="rectangle" if single and is_axis_rectangle(parts[0][0]) else "polygon",
            )
        )
    if skipped:
        warnings.warn(f"{source}: skipped {skipped} feature(s) without an area (points or lines)", stacklevel=2)
    return regions


def read_geojson(path: str | os.PathLike) -> list[Region]:
    """Regions from a QuPath (or any) GeoJSON file."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, "no such file")
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(p, f"not valid JSON ({e})") from None
    return parse_geojson(obj, str(p))


# ------------------------------------------------------------------ GeoJSON export


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def to_feature(r: Region) -> dict:
    """One QuPath-style GeoJSON Feature."""
    polys = [[_closed(ring) for ring in rings] for rings in r.parts]
    geom = {"type": "Polygon", "coordinates": polys[0]} if len(polys) == 1 else {
        "type": "MultiPolygon", "coordinates": polys}
    props: dict[str, Any] = {"objectType": r.object_type}
    if r.name:
        props["name"] = r.name
    if r.classification:
        cls: dict[str, Any] = {"name": r.classification}
        if r.color is not None:
            cls["color"] = [int(c) for c in r.color]
        props["classification"] = cls
    props["isLocked"] = False
    meas = {k: float(v) for k, v in r.measurements.items() if _finite(v)}
    if meas:
        props["measurements"] = meas
    return {"type": "Feature", "id": r.id, "geometry": geom, "properties": props}


def to_geojson(regions: Iterable[Region], *, feature_collection: bool = True) -> dict | list:
    feats = [to_feature(r) for r in regions]
    return {"type": "FeatureCollection", "features": feats} if feature_collection else feats


def write_geojson(path: str | os.PathLike, regions: Iterable[Region], *, feature_collection: bool = True) -> None:
    """Write regions as QuPath-importable GeoJSON, atomically (temp file + ``os.replace``)."""
    p = Path(path)
    parent = p.resolve().parent
    if not parent.is_dir():
        raise InputError(p, f"folder {parent} does not exist")
    text = json.dumps(to_geojson(regions, feature_collection=feature_collection), indent=2)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------ napari Shapes


def regions_to_shapes(regions: Sequence[Region]) -> tuple[list[np.ndarray], list[str], dict[str, list]]:
    """``(data, shape_type, features)`` for a napari Shapes layer: one shape per outline
    ((y, x) vertices, level-0 pixels); ``features`` columns ``region_id``, ``name``,
    ``classification`` let :func:`shapes_to_regions` regroup multi-part regions. Holes cannot
    be drawn by napari and are dropped (with a warning)."""
    data, types = [], []
    feats: dict[str, list] = {"region_id": [], "name": [], "classification": []}
    holes = 0
    for r in regions:
        for rings in r.parts:
            holes += len(rings) - 1
            data.append(rings[0][:, ::-1] - PIXEL_CENTRE)
            types.append(r.shape_type if len(r.parts) == 1 else "polygon")
            feats["region_id"].append(r.id)
            feats["name"].append(r.name or "")
            feats["classification"].append(r.classification or "")
    if holes:
        warnings.warn(f"{holes} hole(s) dropped: napari shapes have no holes", stacklevel=2)
    return data, types, feats


def _ellipse_polygon(corners_yx: np.ndarray, n: int = 64) -> np.ndarray:
    c = corners_yx.mean(axis=0)
    # napari stores an ellipse as the 4 corners of its (possibly rotated) bounding box
    u = (corners_yx[1] - corners_yx[0]) / 2
    v = (corners_yx[3] - corners_yx[0]) / 2
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)[:, None]
    return c + np.cos(t) * u + np.sin(t) * v


def shapes_to_regions(
    data: Sequence[np.ndarray],
    shape_types: Sequence[str],
    features: Any = None,
) -> list[Region]:
    """Regions from napari Shapes data (level-0 ``(y, x)`` vertices). Rectangles, polygons and
    ellipses (as 64-gons) become regions; lines and paths are ignored. Shapes sharing a
    ``region_id`` feature become one multi-part region; ``name``/``classification`` features
    are kept."""

    def col(name):
        if features is None:
            return None
        try:
            v = features[name]
        except (KeyError, IndexError, TypeError):
            return None
        return list(v)

    ids, names, classes = col("region_id"), col("name"), col("classification")
    by_id: dict[str, Region] = {}
    out: list[Region] = []
    for i, (d, t) in enumerate(zip(data, shape_types)):
        if t not in AREA_SHAPES:
            continue
        yx = np.asarray(d, dtype=np.float64)[:, -2:]
        if t == "ellipse":
            yx = _ellipse_polygon(yx)
        if len(yx) < 3:
            continue
        ring = yx[:, ::-1] + PIXEL_CENTRE
        rid = str(ids[i]) if ids and ids[i] not in (None, "", float("nan")) else None
        name = names[i] if names and isinstance(names[i], str) and names[i] else None
        cls = classes[i] if classes and isinstance(classes[i], str) and classes[i] else None
        if rid is not None and rid in by_id:
            by_id[rid].parts.append([ring])
            by_id[rid].shape_type = "polygon"
            continue
        r = Region(parts=[[ring]], name=name, classification=cls,
                   shape_type="rectangle" if t == "rectangle" and is_axis_rectangle(ring) else "polygon")
        if rid is not None:
            r.id = rid
            by_id[rid] = r
        out.append(r)
    return out
