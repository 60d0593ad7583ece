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

Scale: parsing is linear in the file (GeometryCollections nest at most ``MAX_NESTING`` deep;
deeper JSON is refused with one line), validity is checked for all rings in one GEOS call
(shapely), and masks are rasterised by a vectorised scan line over the region's bounding box,
so cost grows with the vertices plus the pixels of the box, not with their product.
"""

from __future__ import annotations

import json
import math
import os
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

#: Below this (box pixels x vertices) a single outline is filled by skimage's point-in-polygon
#: loop, which has less fixed cost than the scan line for cell-sized detections.
SMALL_FILL = 2_000_000

#: Deepest GeometryCollection nesting accepted (QuPath writes none).
MAX_NESTING = 32


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
        ``offset_xy`` and whose pixels are ``downsample`` level-0 pixels wide.

        A pixel is inside when its centre is (nonzero winding over all rings, holes wound
        against their outline: parts unite, holes clear). Only the region's bounding box is
        rasterised."""
        ox, oy = offset_xy
        if len(self.parts) == 1 and len(self.parts[0]) == 1:
            ring = self.parts[0][0]
            x = (ring[:, 0] - ox) / downsample - 0.5
            y = (ring[:, 1] - oy) / downsample - 0.5
            box = (float(x.max() - x.min()) + 1) * (float(y.max() - y.min()) + 1)
            if box * len(ring) < SMALL_FILL:  # a small simple outline: skimage's fill is quicker
                from skimage.draw import polygon as fill

                m = np.zeros(shape, bool)
                m[fill(y, x, shape)] = True
                return m
        rings = []
        for part in self.parts:
            for k, ring in enumerate(part):
                xy = np.empty_like(ring)
                xy[:, 0] = (ring[:, 0] - ox) / downsample - 0.5
                xy[:, 1] = (ring[:, 1] - oy) / downsample - 0.5
                ccw = _signed_area(xy) > 0
                rings.append(xy if ccw == (k == 0) else xy[::-1])
        return rasterize(rings, shape)


def rasterize(rings: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Boolean ``shape`` mask of pixel centres (integer ``(x, y)``) with nonzero winding number
    over ``rings`` (``(N, 2)`` ``(x, y)`` arrays, open or closed). A vectorised scan line over
    the rings' bounding box: O(edges + crossings + box pixels)."""
    h, w = int(shape[0]), int(shape[1])
    out = np.zeros((h, w), bool)
    rings = [np.asarray(r, np.float64) for r in rings if len(r) >= 3]
    if not rings or h <= 0 or w <= 0:
        return out
    a = np.concatenate(rings)
    b = np.concatenate([np.roll(r, -1, axis=0) for r in rings])  # each vertex's next: closes every ring
    lo, hi = a.min(axis=0), a.max(axis=0)
    r0, r1 = max(int(np.ceil(lo[1])), 0), min(int(np.floor(hi[1])) + 1, h)
    c0, c1 = max(int(np.ceil(lo[0])), 0), min(int(np.floor(hi[0])) + 1, w)
    if r1 <= r0 or c1 <= c0:
        return out
    y0, y1 = a[:, 1], b[:, 1]
    up = y1 > y0
    ymin, ymax = np.minimum(y0, y1), np.maximum(y0, y1)
    # rows r (pixel centres) with ymin <= r < ymax, within the box
    first = np.clip(np.ceil(ymin), r0, r1).astype(np.int64)
    last = np.clip(np.ceil(ymax), r0, r1).astype(np.int64)
    n = last - first
    keep = n > 0
    if not keep.any():
        return out
    first, n = first[keep], n[keep]
    ax, ay, bx, by, d = a[keep, 0], a[keep, 1], b[keep, 0], b[keep, 1], np.where(up[keep], 1, -1)
    edge = np.repeat(np.arange(len(n)), n)
    start = np.cumsum(n) - n
    rows = first[edge] + (np.arange(len(edge)) - start[edge])
    t = (rows - ay[edge]) / (by[edge] - ay[edge])
    xs = ax[edge] + t * (bx[edge] - ax[edge])
    cols = np.clip(np.ceil(xs), c0, c1).astype(np.int64) - c0  # the crossing counts from this column on
    bw = c1 - c0 + 1
    diff = np.bincount((rows - r0) * bw + cols, weights=d[edge], minlength=(r1 - r0) * bw)
    winding = np.cumsum(diff.reshape(r1 - r0, bw)[:, :-1], axis=1)
    out[r0:r1, c0:c1] = np.abs(winding) > 0.5
    return out


def _signed_area(r: np.ndarray) -> float:
    x, y = r[:, 0], r[:, 1]
    return 0.5 * float(x[:-1] @ y[1:] - y[:-1] @ x[1:] + x[-1] * y[0] - y[-1] * x[0])


def _ring_areas(rings: Sequence[np.ndarray]) -> np.ndarray:
    """Unsigned areas of many rings in one vectorised pass."""
    if not rings:
        return np.zeros(0)
    xy = np.concatenate(rings)
    n = np.array([len(r) for r in rings])
    starts = np.cumsum(n) - n
    nxt = np.arange(1, len(xy) + 1)
    nxt[starts + n - 1] = starts
    cross = xy[:, 0] * xy[nxt, 1] - xy[:, 1] * xy[nxt, 0]
    return 0.5 * np.abs(np.add.reduceat(cross, starts))


def _ring_area(r: np.ndarray) -> float:
    return abs(_signed_area(r))


def _open_ring(coords, where: str) -> np.ndarray:
    try:
        a = np.asarray(coords, dtype=np.float64)
    except (ValueError, TypeError, RecursionError):
        raise ValueError(f"{where}: a ring must be a list of [x, y] positions") from None
    if a.ndim != 2 or a.shape[1] < 2 or len(a) < 3:
        raise ValueError(f"{where}: a ring needs at least 3 [x, y] positions")
    a = a[:, :2]
    if len(a) > 3 and abs(a[0, 0] - a[-1, 0]) <= 1e-8 and abs(a[0, 1] - a[-1, 1]) <= 1e-8:
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
    """The polygons of a geometry (GeometryCollections flattened without recursion, at most
    ``MAX_NESTING`` deep); points and lines give none."""
    out: list[list[np.ndarray]] = []
    stack = [(geom, 0)]
    while stack:
        g, depth = stack.pop()
        if not isinstance(g, dict):
            raise ValueError(f"{where}: a geometry must be an object")
        t = g.get("type")
        if t == "GeometryCollection":
            if depth >= MAX_NESTING:
                raise ValueError(f"{where}: GeometryCollections nested more than {MAX_NESTING} deep")
            members = g.get("geometries") or []
            if not isinstance(members, list):
                raise ValueError(f"{where}: 'geometries' must be a list")
            stack.extend((m, depth + 1) for m in reversed(members))
            continue
        coords = g.get("coordinates")
        if t == "Polygon":
            polys = [coords]
        elif t == "MultiPolygon":
            polys = coords
        else:
            continue
        if not isinstance(polys, list) or not all(isinstance(p, list) for p in polys):
            raise ValueError(f"{where}: {t} coordinates must be lists of rings")
        out.extend([_open_ring(ring, where) for ring in poly] for poly in polys if poly)
    return out


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
        if len(parts) > 1:
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
    return _checked(regions, source)


def _examples(items: list, n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _checked(regions: list[Region], source: str) -> list[Region]:
    """Drop zero-area polygons and warn about them and about self-intersecting rings (whose
    area and masks are not what the drawing suggests), naming the features, in one GEOS call."""
    import shapely

    names = {id(r): (f"feature {i}" + (f" ({r.name})" if r.name else "")) for i, r in enumerate(regions)}
    flat, zero = [], []
    areas = iter(_ring_areas([rings[0] for r in regions for rings in r.parts]))
    for r in regions:
        kept = [rings for rings in r.parts if next(areas) > 1e-9]
        if len(kept) < len(r.parts):
            zero.append(names[id(r)])
            r.parts = kept
        flat.extend((r, ring) for rings in kept for ring in rings)
    if zero:
        warnings.warn(f"{source}: {len(zero)} region(s) with zero-area polygons, left out: {_examples(zero)}",
                      UserWarning, stacklevel=3)
    if flat:
        coords = np.concatenate([ring for _, ring in flat])
        index = np.repeat(np.arange(len(flat)), [len(ring) for _, ring in flat])
        polys = shapely.polygons(shapely.linearrings(coords, indices=index))
        bad = np.flatnonzero(~shapely.is_valid(polys))
        if len(bad):
            reasons = shapely.is_valid_reason(polys[bad[:3]])
            seen: dict[int, str] = {}
            for k in bad:
                seen.setdefault(id(flat[k][0]), names[id(flat[k][0])])
            where = [f"{names[id(flat[k][0])]}: {why}" for k, why in zip(bad[:3], reasons)]
            warnings.warn(f"{source}: {len(seen)} region(s) self-intersect, so their area and score may not be "
                          f"what they look like; {_examples(where)}", UserWarning, stacklevel=3)
    return [r for r in regions if r.parts]


def read_geojson(path: str | os.PathLike) -> list[Region]:
    """Regions from a QuPath (or any) GeoJSON file."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, "no such file")
    if p.is_dir():
        raise InputError(p, "is a directory, not a GeoJSON file")
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(p, f"not valid JSON ({e})") from None
    except RecursionError:
        raise InputError(p, "not GeoJSON: JSON nested too deeply") from None
    except OSError as e:
        raise InputError(p, f"cannot read: {e.strerror}") from None
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
    """Write regions as QuPath-importable GeoJSON, atomically (:func:`napari_bci.io.writers.atomic_output`)."""
    from .io.writers import atomic_output

    p = Path(path)
    parent = p.resolve().parent
    if not parent.is_dir():
        raise InputError(p, f"folder {parent} does not exist")
    text = json.dumps(to_geojson(regions, feature_collection=feature_collection), indent=2)
    with atomic_output(p) as f:
        f.write(text)


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
