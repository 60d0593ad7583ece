"""The Compare widget in a real napari viewer: layer defaults, heatmap placement, region table,
exports."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from napari_bci.io import layers as L
from napari_bci.metrics import compare_pair

MPP = 0.5


@pytest.fixture(scope="module")
def pair():
    from napari_bci.samples.synthetic import make_pair

    p = make_pair(her2="3+", size=320, seed=5, mpp=MPP)
    rng = np.random.default_rng(0)
    gen = np.clip(np.roll(p.ihc, 3, axis=1).astype(np.int16) + rng.normal(0, 8, p.ihc.shape), 0, 255)
    return p.he, p.ihc, gen.astype(np.uint8)


@pytest.fixture
def viewer_widget(make_napari_viewer, pair):
    from napari_bci.widgets.compare import CompareWidget

    he, ihc, gen = pair
    viewer = make_napari_viewer()
    for data, attrs, _ in (
        L.image_layer(he, L.HE, mpp=MPP, role="he"),
        L.image_layer(ihc, L.IHC_TRUTH, mpp=MPP, role="ihc", her2="3+"),
        L.image_layer(gen, L.generated_name("test"), mpp=MPP, role="generated"),
        L.image_layer(he[::-1], "unrelated", mpp=MPP),
    ):
        viewer.add_image(data, **attrs)
    w = CompareWidget(viewer)
    viewer.window.add_dock_widget(w)
    yield viewer, w
    w.close()


def test_defaults_modes(viewer_widget):
    viewer, w = viewer_widget
    assert w.gen_combo.currentText() == L.generated_name("test")
    assert w.truth_combo.currentText() == L.IHC_TRUTH
    w.opacity.setValue(30)
    g = viewer.layers[L.generated_name("test")]
    assert g.opacity == pytest.approx(0.3)
    assert viewer.layers.index(g) > viewer.layers.index(viewer.layers[L.IHC_TRUTH])
    w.side_radio.setChecked(True)
    # side by side: the H&E source, the pair (and the heatmap); other images are hidden
    assert viewer.canvas.grid.enabled and viewer.layers[L.HE].visible
    assert not viewer.layers["unrelated"].visible
    w.blend_radio.setChecked(True)
    assert not viewer.canvas.grid.enabled and viewer.layers["unrelated"].visible


def test_generated_layer_added_later_becomes_default(make_napari_viewer, pair):
    from napari_bci.widgets.compare import CompareWidget

    he, ihc, gen = pair
    viewer = make_napari_viewer()
    for data, attrs, _ in (L.image_layer(he, L.HE, mpp=MPP, role="he"),
                           L.image_layer(ihc, L.IHC_TRUTH, mpp=MPP, role="ihc")):
        viewer.add_image(data, **attrs)
    w = CompareWidget(viewer)
    assert w.truth_combo.currentText() == L.IHC_TRUTH
    data, attrs, _ = L.image_layer(gen, L.generated_name("later"), mpp=MPP, role="generated")
    viewer.add_image(data, **attrs)
    assert w.gen_combo.currentText() == L.generated_name("later")
    # an explicit choice sticks
    data, attrs, _ = L.image_layer(gen, L.generated_name("other"), mpp=MPP, role="generated")
    viewer.add_image(data, **attrs)
    w.set_layers(L.generated_name("other"), L.IHC_TRUTH)
    data, attrs, _ = L.image_layer(gen, L.generated_name("third"), mpp=MPP, role="generated")
    viewer.add_image(data, **attrs)
    assert w.gen_combo.currentText() == L.generated_name("other")
    # the H&E is never offered as either side
    for combo in (w.gen_combo, w.truth_combo):
        assert L.HE not in [combo.itemText(i) for i in range(combo.count())]
    w.close()


def test_heatmap_layer_extent_and_mean(viewer_widget, qtbot, pair):
    from skimage.metrics import structural_similarity

    from napari_bci.pyramid import view_box

    viewer, w = viewer_widget
    _, ihc, gen = pair
    viewer.scene.camera.center = (60.0, 70.0)  # um
    viewer.scene.camera.zoom = 8.0  # screen px per um: a zoomed-in view inside the image
    vb = viewer.canvas.viewbox_size(viewer.layers)
    y0, y1, x0, x1 = view_box(viewer.scene.camera.center, viewer.scene.camera.zoom, vb)
    # pixels whose centres are in view, clipped to the image
    r0, r1 = max(int(np.ceil(y0 / MPP)), 0), min(int(np.floor(y1 / MPP)) + 1, 320)
    c0, c1 = max(int(np.ceil(x0 / MPP)), 0), min(int(np.floor(x1 / MPP)) + 1, 320)
    assert 0 < r1 - r0 < 320 and 0 < c1 - c0 < 320
    w.update_heatmap()
    qtbot.waitUntil(lambda: L.SSIM in viewer.layers and viewer.layers[L.SSIM].data.shape == (r1 - r0, c1 - c0),
                    timeout=30000)
    ly = viewer.layers[L.SSIM]
    np.testing.assert_allclose(ly.scale, (MPP, MPP))
    np.testing.assert_allclose(ly.translate, (r0 * MPP, c0 * MPP))
    ext = ly.extent.world  # pixel centres of the first and last heatmap pixels
    np.testing.assert_allclose(ext[0], (r0 * MPP, c0 * MPP))
    np.testing.assert_allclose(ext[1], ((r1 - 1) * MPP, (c1 - 1) * MPP))
    # and they coincide with the truth layer's pixel centres
    np.testing.assert_allclose(viewer.layers[L.IHC_TRUTH].data_to_world((r0, c0)), ext[0])
    ref, full = structural_similarity(gen[r0:r1, c0:c1], ihc[r0:r1, c0:c1], channel_axis=-1,
                                      data_range=255, full=True)
    assert w.heatmap_mean == pytest.approx(ref, abs=1e-5)
    np.testing.assert_allclose(ly.data, full.mean(-1), atol=1e-4)
    assert f"{ref:.3f}" in w.mean_label.text()
    # pan: the debounced update follows and replaces the data in place
    viewer.scene.camera.center = (100.0, 90.0)
    qtbot.waitUntil(lambda: not np.allclose(viewer.layers[L.SSIM].translate, (r0 * MPP, c0 * MPP)), timeout=30000)
    assert len([x for x in viewer.layers if x.name == L.SSIM]) == 1


def test_region_table_from_drawn_shapes(viewer_widget, qtbot, pair, tmp_path):
    viewer, w = viewer_widget
    _, ihc, gen = pair
    regions = w.regions_layer()
    assert regions.name == L.REGIONS and tuple(regions.scale) == (MPP, MPP)
    # as drawn by a user: a rectangle over pixel rows 20..99, cols 30..149 (napari data coords),
    # and a triangle
    regions.add_rectangles(np.array([[19.5, 29.5], [99.5, 149.5]]))
    regions.add_polygons([np.array([[150.0, 150.0], [300.0, 160.0], [220.0, 300.0]])])
    w.measure_regions()
    qtbot.waitUntil(lambda: not w._regions.busy and len(w.scores) == 2, timeout=60000)
    assert w.table.rowCount() == 2
    headers = [w.table.horizontalHeaderItem(i).text() for i in range(w.table.columnCount())]
    assert headers[:4] == ["Region", "HER2 pred", "HER2 truth", "SSIM"]  # what fits a dock first
    rect = w.scores[0]
    assert rect.level == 0 and rect.error is None
    assert rect.area_px == pytest.approx(80 * 120)
    assert rect.area_um2 == pytest.approx(80 * 120 * MPP**2)
    expect = compare_pair(gen[20:100, 30:150], ihc[20:100, 30:150], mpp=MPP)
    for k in ("psnr", "ssim", "dab_mae", "delta_e"):
        assert rect.metrics[k] == pytest.approx(expect[k], rel=1e-6, abs=1e-9)
    assert w.table.item(0, headers.index("PSNR")).text() == f"{expect['psnr']:.4g}"
    tri = w.scores[1]
    (ay, ax), (by, bx), (cy, cx) = (150, 150), (300, 160), (220, 300)
    assert tri.area_px == pytest.approx(0.5 * abs(ax * (by - cy) + bx * (cy - ay) + cx * (ay - by)))
    assert tri.her2_truth == "3+"
    assert w.table.item(1, headers.index("HER2 truth")).text() == "3+"
    # each shape drawn gets its own name, on the canvas and in the table
    assert list(regions.features["name"]) == ["Region 1", "Region 2"]
    assert [w.table.item(i, 0).text() for i in range(2)] == ["Region 1", "Region 2"]
    # a predicted level (or why there is none) comes from the HER2 scorer on the generated pixels
    assert tri.her2_pred in ("0", "1+", "2+", "3+") or tri.her2_pred.startswith("not assessable (")
    assert w.table.item(1, headers.index("HER2 pred")).text() == tri.her2_pred
    # clicking a row centres the view on the region
    w.centre_on_row(0)
    np.testing.assert_allclose(viewer.scene.camera.center[-2:], (59.5 * MPP, 89.5 * MPP))

    # exports
    w.export_csv(tmp_path / "regions.csv")
    rows = list(csv.DictReader(open(tmp_path / "regions.csv")))
    assert len(rows) == 2 and float(rows[0]["psnr"]) == pytest.approx(expect["psnr"], rel=1e-5)
    w.export_geojson(tmp_path / "regions.geojson")
    fc = json.loads((tmp_path / "regions.geojson").read_text())
    f0 = fc["features"][0]
    assert f0["properties"]["objectType"] == "annotation"
    assert f0["geometry"]["type"] == "Polygon"
    assert f0["geometry"]["coordinates"][0][0] == [30.0, 20.0]  # GeoJSON x, y of the pixel corner
    meas = f0["properties"]["measurements"]
    assert meas["Compare: psnr"] == pytest.approx(expect["psnr"], rel=1e-6)
    assert meas["Area µm^2"] == pytest.approx(80 * 120 * MPP**2)
    assert meas["HER2 ground truth (0-3)"] == 3


def test_geojson_import_into_regions(viewer_widget, qtbot, tmp_path):
    viewer, w = viewer_widget
    fc = {"type": "FeatureCollection", "features": [{
        "type": "Feature", "id": "abc",
        "geometry": {"type": "Polygon", "coordinates": [[[10, 10], [110, 10], [110, 60], [10, 60], [10, 10]]]},
        "properties": {"objectType": "annotation", "name": "ROI 1",
                       "classification": {"name": "Tumor", "color": [255, 0, 0]}},
    }]}
    p = tmp_path / "in.geojson"
    p.write_text(json.dumps(fc))
    added = []
    w.import_geojson(p, on_done=added.append)  # read in a worker
    qtbot.waitUntil(lambda: added == [1], timeout=30000)
    ly = viewer.layers[L.REGIONS]
    assert list(ly.shape_type) == ["rectangle"]
    assert ly.features["name"][0] == "ROI 1" and ly.features["region_id"][0] == "abc"
    np.testing.assert_allclose(ly.edge_color[0], [1, 0, 0, 1])
    w.measure_regions()
    w.import_geojson(p, on_done=added.append)  # an import while measuring drops nothing
    qtbot.waitUntil(lambda: not w._regions.busy and len(w.scores) == 1 and added == [1, 1], timeout=60000)
    assert w.scores[0].region.label == "ROI 1" and w.scores[0].area_px == pytest.approx(5000)
    assert w.table.item(0, 0).text() == "ROI 1"
    assert len(viewer.layers[L.REGIONS].data) == 2


def test_region_on_a_pyramid_is_measured_at_a_bounded_level(monkeypatch, pair):
    """Headless: a region too big for level 0 is read at the finest level under the bound."""
    from napari_bci.regions import Region
    from napari_bci.metrics import compare as C

    _, ihc, gen = pair
    levels_t = [ihc, ihc[::2, ::2], ihc[::4, ::4]]
    levels_g = [gen, gen[::2, ::2], gen[::4, ::4]]

    def geom(name, levels):
        return C.LayerGeom(name, levels, (MPP, MPP), (0.0, 0.0), [(1.0, 1.0), (2.0, 2.0), (4.0, 4.0)], mpp=MPP,
                           her2="3+")

    t, g = geom("t", levels_t), geom("g", levels_g)
    ring = np.array([[0.0, 0.0], [320.0, 0.0], [320.0, 320.0], [0.0, 320.0]])  # the whole image
    region = Region(parts=[[ring]], name="all", shape_type="rectangle")
    monkeypatch.setattr(C, "MAX_REGION_PIXELS", 100 * 100)
    sc = C.measure_region(region, g, t, predict_her2=False)
    assert (sc.level, sc.step) == (2, 1)  # 80x80 px at level 2; level 1 would be 160x160
    expect = compare_pair(gen[::4, ::4], ihc[::4, ::4], mpp=4 * MPP)
    assert sc.metrics["psnr"] == pytest.approx(expect["psnr"])
    assert sc.metrics["ssim"] == pytest.approx(expect["ssim"], abs=1e-6)
    assert sc.area_um2 == pytest.approx(320 * 320 * MPP**2)
    # beyond the coarsest level, every n-th pixel is read instead
    monkeypatch.setattr(C, "MAX_REGION_PIXELS", 40 * 40)
    sc = C.measure_region(region, g, t, predict_her2=False)
    assert (sc.level, sc.step) == (2, 2) and sc.row()["level"] == "2 (1/2)"
    # a generated layer on a different grid (half the pixel size) is resampled onto the truth's
    g2 = C.LayerGeom("g2", [np.repeat(np.repeat(gen, 2, 0), 2, 1)], (MPP / 2, MPP / 2), (-MPP / 4, -MPP / 4),
                     [(1.0, 1.0)], mpp=MPP / 2)
    win = C.Window(0, 10, 60, 20, 90)
    np.testing.assert_array_equal(C.read_on_grid(g2, t, win), gen[10:60, 20:90])


def test_heatmap_on_a_pyramid_uses_the_displayed_level(make_napari_viewer, qtbot, pair):
    from skimage.metrics import structural_similarity

    from napari_bci.widgets.compare import CompareWidget

    _, ihc, gen = pair
    viewer = make_napari_viewer()
    for img, name, role in ((ihc, L.IHC_TRUTH, "ihc"), (gen, L.generated_name("p"), "generated")):
        data, attrs, _ = L.image_layer([img, img[::2, ::2], img[::4, ::4]], name, mpp=MPP, role=role)
        viewer.add_image(data, **attrs)
    w = CompareWidget(viewer)
    viewer.window.add_dock_widget(w)
    viewer.scene.camera.center = (80.0, 80.0)
    viewer.scene.camera.zoom = 1.0 / (3 * MPP)  # one screen pixel = 3 level-0 pixels -> level 1
    w.update_heatmap()
    qtbot.waitUntil(lambda: L.SSIM in viewer.layers
                    and np.allclose(viewer.layers[L.SSIM].scale, (2 * MPP, 2 * MPP)), timeout=30000)
    ly = viewer.layers[L.SSIM]
    r0, c0 = (np.asarray(ly.translate) / (2 * MPP)).round().astype(int)
    h, wd = ly.data.shape
    t1, g1 = ihc[::2, ::2], gen[::2, ::2]
    ref, full = structural_similarity(g1[r0:r0 + h, c0:c0 + wd], t1[r0:r0 + h, c0:c0 + wd], channel_axis=-1,
                                      data_range=255, full=True)
    np.testing.assert_allclose(ly.data, full.mean(-1), atol=1e-4)
    # the level-1 pixel (r0, c0) sits where napari draws it
    np.testing.assert_allclose(ly.data_to_world((0, 0)), viewer.layers[L.IHC_TRUTH].data_to_world((2 * r0, 2 * c0)))
    assert "level 1" in w.mean_label.text()
    w.close()


def test_a_single_slide_is_not_compared_with_itself(make_napari_viewer, qtbot, pair):
    """With only an H&E open (`napari-bci view slide.svs`), Compare stays idle and says why: no
    SSIM map, no change to the H&E's display, no HER2 prediction from the H&E."""
    from napari_bci.widgets.compare import CompareWidget

    he, ihc, gen = pair
    viewer = make_napari_viewer()
    data, attrs, _ = L.image_layer(he, L.HE, mpp=MPP, role="he")
    h = viewer.add_image(data, **attrs)
    w = CompareWidget(viewer)
    viewer.window.add_dock_widget(w)
    assert w.gen_layer is None and w.truth_layer is None
    assert "Waiting for a generated IHC layer" in w.status.text() and not w.measure_btn.isEnabled()
    w.update_heatmap()
    qtbot.wait(400)
    assert L.SSIM not in viewer.layers
    assert h.opacity == 1.0 and h.visible and h.blending == attrs.get("blending", "translucent_no_depth")
    assert w.measure_regions() is None and not w.scores
    # the real IHC alone is still not enough
    data, attrs, _ = L.image_layer(ihc, L.IHC_TRUTH, mpp=MPP, role="ihc")
    viewer.add_image(data, **attrs)
    assert "generated IHC" in w.status.text()
    data, attrs, _ = L.image_layer(gen, L.generated_name("x"), mpp=MPP, role="generated")
    viewer.add_image(data, **attrs)
    assert w.status.text() == "" and w.measure_btn.isEnabled()
    w.close()


def test_compare_restores_the_layers_it_changed(make_napari_viewer, pair):
    from napari_bci.widgets.compare import CompareWidget

    he, ihc, gen = pair
    viewer = make_napari_viewer()
    for data, attrs, _ in (
        L.image_layer(he, L.HE, mpp=MPP, role="he"),
        L.image_layer(ihc, L.IHC_TRUTH, mpp=MPP, role="ihc"),
        L.image_layer(gen, L.generated_name("test"), mpp=MPP, role="generated"),
        L.image_layer(he[::-1], "unrelated", mpp=MPP),
    ):
        viewer.add_image(data, **attrs)
    before = {ly.name: (ly.opacity, str(ly.blending), ly.visible) for ly in viewer.layers}
    w = CompareWidget(viewer)
    g = viewer.layers[L.generated_name("test")]
    assert g.opacity == pytest.approx(0.5) and str(g.blending) == "translucent"  # the overlay
    w.side_radio.setChecked(True)
    assert not viewer.layers["unrelated"].visible and g.opacity == 1.0 and viewer.canvas.grid.enabled
    w.close()
    assert {ly.name: (ly.opacity, str(ly.blending), ly.visible) for ly in viewer.layers} == before
    assert not viewer.canvas.grid.enabled


def test_region_exports_say_not_assessable_distinctly(tmp_path, pair):
    """Headless: a region too small for the HER2 minimum is 'not assessable (reason)' in the
    table text, the CSV and the QuPath classification, never '0'."""
    from napari_bci.metrics import compare as C
    from napari_bci.regions import Region

    _, ihc, gen = pair
    t = C.LayerGeom("t", [ihc], (MPP, MPP), (0.0, 0.0), [(1.0, 1.0)], mpp=MPP, her2="3+")
    g = C.LayerGeom("g", [gen], (MPP, MPP), (0.0, 0.0), [(1.0, 1.0)], mpp=MPP)
    ring = np.array([[10.0, 10.0], [60.0, 10.0], [60.0, 60.0], [10.0, 60.0]])  # 50 x 50 px: a few cells
    sc = C.measure_region(Region(parts=[[ring]], name="small", shape_type="rectangle"), g, t)
    assert sc.her2_pred.startswith("not assessable (") and "tumour cells" in sc.her2_pred
    assert sc.her2_row["assessable"] is False
    C.export_csv([sc], tmp_path / "r.csv")
    row = next(csv.DictReader(open(tmp_path / "r.csv")))
    assert row["her2_pred"] == sc.her2_pred and row["her2_assessable"] == "False" and row["her2_reason"]
    C.export_geojson([sc], tmp_path / "r.geojson")
    props = json.loads((tmp_path / "r.geojson").read_text())["features"][0]["properties"]
    assert props["classification"]["name"] == "HER2 not assessable"
    assert "HER2 predicted (0-3)" not in props["measurements"]
    assert (tmp_path / "r.csv").stat().st_mode & 0o777 == 0o644 & ~_umask()


def _umask() -> int:
    import os

    m = os.umask(0)
    os.umask(m)
    return m


def test_layer_updates_set_only_what_changed(make_napari_viewer):
    """A result over the same view re-sets the data only: napari refreshes the layer and its
    overlays on every scale/translate/visible assignment, changed or not."""
    from napari_bci.widgets._layers import update_layer

    viewer = make_napari_viewer()
    ly = viewer.add_image(np.zeros((8, 8), np.float32), scale=(2.0, 2.0), translate=(4.0, 4.0))
    fired = []
    for name in ("scale", "translate", "visible", "opacity"):
        getattr(ly.events, name).connect(lambda e, n=name: fired.append(n))
    update_layer(ly, scale=(2.0, 2.0), translate=np.array([4.0, 4.0]), visible=True, opacity=ly.opacity)
    assert fired == []
    update_layer(ly, scale=(3.0, 3.0), translate=(4.0, 4.0), visible=False)
    assert "scale" in fired and "visible" in fired and "translate" not in fired
    assert tuple(ly.scale) == (3.0, 3.0) and not ly.visible
