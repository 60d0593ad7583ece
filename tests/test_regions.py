"""QuPath GeoJSON import/export and napari Shapes conversion."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_bci.errors import InputError
from napari_bci.regions import (
    Region,
    parse_geojson,
    read_geojson,
    regions_to_shapes,
    shapes_to_regions,
    to_geojson,
    write_geojson,
)

# As QuPath 0.4+ writes it (File > Export objects as GeoJSON, FeatureCollection option):
# a rectangle annotation with a class and measurements, a polygon with a hole, a two-part
# MultiPolygon, and a point annotation (no area).
QUPATH_EXPORT = {
    "type": "FeatureCollection",
    "features": [
        {
            "type": "Feature",
            "id": "0b0c9c5e-6f6b-4d0e-9d1d-0d6c6f3b9a11",
            "geometry": {"type": "Polygon",
                         "coordinates": [[[100, 50], [300, 50], [300, 150], [100, 150], [100, 50]]]},
            "properties": {
                "objectType": "annotation",
                "name": "Tumour A",
                "classification": {"name": "Tumor", "color": [200, 0, 0]},
                "isLocked": False,
                "measurements": {"Area µm^2": 5000.0, "Num Detections": 12},
            },
        },
        {
            "type": "Feature",
            "id": "5a7c1f0e-2a51-4d4c-8f3e-3f3b8a2c7d22",
            "geometry": {"type": "Polygon", "coordinates": [
                [[400, 400], [600, 420], [580, 600], [410, 590], [400, 400]],
                [[450, 450], [500, 450], [500, 500], [450, 500], [450, 450]],
            ]},
            "properties": {"objectType": "annotation", "classification": {"name": "Stroma", "color": [150, 200, 150]}},
        },
        {
            "type": "Feature",
            "id": "9f4d2b7a-1c3e-4f5a-8b6c-7d8e9f0a1b33",
            "geometry": {"type": "MultiPolygon", "coordinates": [
                [[[10, 10], [40, 10], [40, 30], [10, 10]]],
                [[[700, 700], [800, 700], [800, 800], [700, 800], [700, 700]]],
            ]},
            "properties": {"objectType": "annotation", "name": "two parts"},
        },
        {
            "type": "Feature",
            "id": "c3d4",
            "geometry": {"type": "Point", "coordinates": [5, 5]},
            "properties": {"objectType": "annotation"},
        },
    ],
}


def test_parse_qupath_export():
    with pytest.warns(UserWarning, match="skipped 1 feature"):
        regs = parse_geojson(QUPATH_EXPORT)
    assert len(regs) == 3
    a, b, c = regs
    assert a.name == "Tumour A" and a.classification == "Tumor" and a.color == (200, 0, 0)
    assert a.measurements == {"Area µm^2": 5000.0, "Num Detections": 12.0}
    assert a.shape_type == "rectangle" and a.area_px == pytest.approx(200 * 100)
    assert a.bounds == (100, 50, 300, 150)
    assert a.outline.shape == (4, 2)  # closing vertex dropped
    assert b.shape_type == "polygon" and len(b.parts[0]) == 2
    outer = 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in
                          zip(b.parts[0][0], np.roll(b.parts[0][0], -1, axis=0))))
    assert b.area_px == pytest.approx(outer - 2500)
    assert len(c.parts) == 2 and c.outline[0, 0] == 700  # largest part first
    assert c.id == "9f4d2b7a-1c3e-4f5a-8b6c-7d8e9f0a1b33"


def test_old_qupath_formats_and_bare_list():
    feats = [{
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 0]]]},
        "properties": {"objectType": "annotation",
                       "classification": {"name": "Tumor", "colorRGB": -3670016},
                       "measurements": [{"name": "Area px", "value": 50.0}]},
    }]
    (r,) = parse_geojson(feats)
    assert r.classification == "Tumor" and r.color == (200, 0, 0)
    assert r.measurements == {"Area px": 50.0}
    (g,) = parse_geojson({"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4], [0, 4]]]})
    assert g.area_px == 16


def test_geojson_file_round_trip(tmp_path):
    with pytest.warns(UserWarning):
        regs = parse_geojson(QUPATH_EXPORT)
    regs[0].measurements["PSNR"] = 21.5
    regs[0].measurements["dab_corr"] = float("nan")  # JSON has no NaN: dropped
    path = tmp_path / "out.geojson"
    write_geojson(path, regs)
    obj = json.loads(path.read_text())
    assert obj["type"] == "FeatureCollection" and len(obj["features"]) == 3
    f0 = obj["features"][0]
    assert f0["properties"]["objectType"] == "annotation"
    assert f0["properties"]["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
    assert f0["properties"]["measurements"]["PSNR"] == 21.5
    assert "dab_corr" not in f0["properties"]["measurements"]
    ring = f0["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1]  # GeoJSON rings are closed
    assert obj["features"][2]["geometry"]["type"] == "MultiPolygon"
    back = read_geojson(path)
    for r0, r1 in zip(regs, back):
        assert r1.id == r0.id and r1.name == r0.name and r1.classification == r0.classification
        assert r1.shape_type == r0.shape_type
        assert len(r1.parts) == len(r0.parts)
        for p0, p1 in zip(r0.parts, r1.parts):
            for ring0, ring1 in zip(p0, p1):
                np.testing.assert_allclose(ring1, ring0)
    # a list of Features (QuPath without FEATURE_COLLECTION)
    write_geojson(path, regs, feature_collection=False)
    assert isinstance(json.loads(path.read_text()), list)
    assert len(read_geojson(path)) == 3


def test_shapes_round_trip_axes_and_pixel_centres():
    with pytest.warns(UserWarning):
        regs = parse_geojson(QUPATH_EXPORT)
    with pytest.warns(UserWarning, match="hole"):
        data, types, feats = regions_to_shapes(regs)
    assert types == ["rectangle", "polygon", "polygon", "polygon"]
    # (row, col) = (y, x), shifted so napari's pixel centres sit on QuPath's
    np.testing.assert_allclose(data[0][0], [50 - 0.5, 100 - 0.5])
    back = shapes_to_regions(data, types, feats)
    assert len(back) == 3 and len(back[2].parts) == 2
    assert back[0].shape_type == "rectangle" and back[0].name == "Tumour A"
    np.testing.assert_allclose(back[0].outline, regs[0].outline)
    assert back[1].area_px == pytest.approx(_outer_area(regs[1]))  # the hole is gone


def _outer_area(r):
    x, y = r.parts[0][0][:, 0], r.parts[0][0][:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def test_shapes_without_features_ellipse_and_lines():
    data = [np.array([[10, 10], [10, 50], [30, 50], [30, 10]], float),
            np.array([[0, 0], [0, 40], [20, 40], [20, 0]], float),
            np.array([[0, 0], [5, 5]], float)]
    regs = shapes_to_regions(data, ["rectangle", "ellipse", "line"])
    assert len(regs) == 2
    assert regs[0].shape_type == "rectangle" and regs[0].area_px == pytest.approx(20 * 40)
    assert regs[1].area_px == pytest.approx(np.pi * 10 * 20, rel=0.01)


def test_mask_matches_napari_pixels_and_levels():
    # napari rectangle covering pixels rows 10..29, cols 20..59 (centres at integers)
    data = [np.array([[9.5, 19.5], [9.5, 59.5], [29.5, 59.5], [29.5, 19.5]])]
    (r,) = shapes_to_regions(data, ["rectangle"])
    m = r.mask((64, 80))
    assert m.sum() == 20 * 40 and m[10, 20] and m[29, 59] and not m[30, 59] and not m[10, 19]
    # the same region on a 2x downsampled level, and on a window offset by (x=16, y=8)
    m2 = r.mask((32, 40), downsample=2)
    assert m2.sum() == 10 * 20 and m2[5, 10]
    m3 = r.mask((32, 64), offset_xy=(16, 8))
    assert m3.sum() == 20 * 40 and m3[2, 4]
    # holes are cleared
    with pytest.warns(UserWarning):
        regs = parse_geojson(QUPATH_EXPORT)
    hole = regs[1].mask((700, 700))
    assert not hole[475, 475] and hole[420, 430]


def test_bad_geojson(tmp_path):
    p = tmp_path / "bad.geojson"
    p.write_text("{not json")
    with pytest.raises(InputError, match="bad.geojson: not valid JSON"):
        read_geojson(p)
    p.write_text(json.dumps({"type": "Topology"}))
    with pytest.raises(InputError, match="not GeoJSON"):
        read_geojson(p)
    p.write_text(json.dumps([{"type": "Feature", "properties": {}}]))
    with pytest.raises(InputError, match="feature 0 has no geometry"):
        read_geojson(p)
    p.write_text(json.dumps([{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}}]))
    with pytest.raises(InputError, match="at least 3"):
        read_geojson(p)
    with pytest.raises(InputError, match="no such file"):
        read_geojson(tmp_path / "missing.geojson")
    with pytest.raises(InputError, match="does not exist"):
        write_geojson(tmp_path / "no" / "x.geojson", [Region(parts=[[np.zeros((3, 2))]])])


# --- scale and validity -----------------------------------------------------------------------------

def _star(rng, cx, cy, r, n):
    """A star-shaped simple polygon (angles sorted, radii random), float vertices."""
    t = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = r * rng.uniform(0.4, 1.0, n)
    return np.stack([cx + rad * np.cos(t), cy + rad * np.sin(t)], -1)


def test_rasterize_equals_skimage_polygon_on_simple_polygons():
    from skimage.draw import polygon as sk_polygon

    from napari_bci.regions import rasterize

    rng = np.random.default_rng(7)
    for k in range(40):
        ring = _star(rng, rng.uniform(-20, 120), rng.uniform(-20, 100), rng.uniform(3, 60), int(rng.integers(3, 200)))
        expect = np.zeros((90, 110), bool)
        rr, cc = sk_polygon(ring[:, 1], ring[:, 0], expect.shape)
        expect[rr, cc] = True
        np.testing.assert_array_equal(rasterize([ring], expect.shape), expect, err_msg=f"polygon {k}")
        np.testing.assert_array_equal(rasterize([ring[::-1]], expect.shape), expect)  # either winding


def test_mask_unites_parts_and_clears_holes_in_any_order():
    outer = np.array([[0, 0], [40, 0], [40, 40], [0, 40]], float)
    hole = np.array([[10, 10], [30, 10], [30, 30], [10, 30]], float)  # same winding as the outline
    patch = np.array([[15, 15], [25, 15], [25, 25], [15, 25]], float)  # a second part inside the hole
    for parts in ([[outer, hole], [patch]], [[patch], [outer, hole]]):
        m = Region(parts=parts).mask((50, 50))
        assert m[5, 5] and not m[12, 12] and m[20, 20] and not m[45, 45]
        assert m.sum() == 40 * 40 - 20 * 20 + 10 * 10


def test_deeply_nested_geojson_is_refused_in_one_line(tmp_path):
    geom = {"type": "Polygon", "coordinates": [[[0, 0], [9, 0], [9, 9], [0, 0]]]}
    for _ in range(40):
        geom = {"type": "GeometryCollection", "geometries": [geom]}
    with pytest.raises(InputError, match="feature 0: GeometryCollections nested more than 32 deep"):
        parse_geojson([{"type": "Feature", "geometry": geom, "properties": {}}], "deep.geojson")
    p = tmp_path / "deeper.geojson"
    p.write_text('{"type": "Feature", "geometry": ' + "[" * 200000 + "]" * 200000 + "}")
    with pytest.raises(InputError) as ei:
        read_geojson(p)
    assert str(ei.value).startswith(f"{p}: ") and "\n" not in str(ei.value)
    ok = {"type": "GeometryCollection", "geometries": [{"type": "GeometryCollection", "geometries": [
        {"type": "Polygon", "coordinates": [[[0, 0], [9, 0], [9, 9], [0, 9]]]}]}]}
    (r,) = parse_geojson({"type": "Feature", "geometry": ok, "properties": {}})
    assert r.area_px == 81


def test_zero_area_and_self_intersecting_polygons_warn_naming_the_feature():
    bowtie = [[0, 0], [10, 10], [10, 0], [0, 4], [0, 0]]  # lobes of different areas
    flat = [[0, 0], [5, 5], [10, 10], [0, 0]]
    square = [[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]]
    feats = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [c]}, "properties": {"name": n}}
             for c, n in ((square, "ok"), (bowtie, "bow"), (flat, "line"))]
    with pytest.warns(UserWarning) as rec:
        regs = parse_geojson(feats, "cells.geojson")
    msgs = [str(w.message) for w in rec]
    assert any(m.startswith("cells.geojson: 1 region(s) with zero-area polygons, left out: feature 2 (line)")
               for m in msgs), msgs
    assert any(m.startswith("cells.geojson: 1 region(s) self-intersect") and "feature 1 (bow): Self-intersection" in m
               for m in msgs), msgs
    assert [r.name for r in regs] == ["ok", "bow"]


def test_many_detections_and_a_long_outline(tmp_path):
    """A detection export and a long outline parse and rasterise exactly (60k detections and
    400k vertices are timed in benchmarks/bench_io.py)."""
    from napari_bci.regions import rasterize

    rng = np.random.default_rng(0)
    n = 6000
    c = rng.uniform(0, 20000, (n, 2))
    t = np.linspace(0, 2 * np.pi, 9)[:-1]
    rings = c[:, None, :] + 5 * np.stack([np.cos(t), np.sin(t)], -1)[None]
    feats = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [r.tolist() + [r[0].tolist()]]},
              "properties": {"objectType": "detection"}} for r in rings]
    p = tmp_path / "detections.geojson"
    p.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    regs = read_geojson(p)
    assert len(regs) == n and all(r.object_type == "detection" for r in regs[:10])
    # all detections at once on a 1/16 grid (every ring is one part of a region)
    together = Region(parts=[[r / 16] for r in rings])
    m = together.mask((1250, 1250))
    expect = rasterize([r / 16 - 0.5 for r in rings], (1250, 1250))
    np.testing.assert_array_equal(m, expect)
    # one polygon of 100k vertices: a wobbly circle, area within 0.01% of the shoelace area
    k = 100000
    th = np.linspace(0, 2 * np.pi, k, endpoint=False)
    rad = 3000 + 20 * np.sin(th * 997)
    big = np.stack([4000 + rad * np.cos(th), 4000 + rad * np.sin(th)], -1)
    (r,) = parse_geojson({"type": "Polygon", "coordinates": [big.tolist()]})
    mask = r.mask((8000, 8000), downsample=2)
    assert abs(mask.sum() * 4 - r.area_px) / r.area_px < 1e-3
