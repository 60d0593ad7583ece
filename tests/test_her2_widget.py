"""The HER2 dock widget in a real napari viewer."""

from __future__ import annotations

import numpy as np
import pytest

from napari_bci.io import layers as L
from napari_bci.io.layers import image_layer

synthetic = pytest.importorskip("napari_bci.samples.synthetic")


@pytest.fixture(scope="module")
def pair():
    return synthetic.make_pair(her2="3+", size=512, seed=41)


@pytest.fixture
def viewer_with_ihc(make_napari_viewer, pair):
    viewer = make_napari_viewer()
    data, attrs, _ = image_layer(pair.ihc, L.IHC_TRUTH, mpp=0.5, role="ihc", her2="3+")
    viewer.add_image(data, **attrs)
    data, attrs, _ = image_layer(pair.he, L.HE, mpp=0.5, role="he")
    viewer.add_image(data, **attrs)
    return viewer


def _run(widget, qtbot, scope):
    w = widget.run(scope)
    assert w is not None
    qtbot.waitUntil(widget.is_idle, timeout=60_000)


def test_whole_image_map_cells_and_explanation(viewer_with_ihc, qtbot):
    from napari_bci.widgets.her2 import CELLS_LAYER, HER2Widget

    viewer = viewer_with_ihc
    widget = HER2Widget(viewer)
    assert widget.ihc_combo.currentText() == L.IHC_TRUTH and widget.he_combo.currentText() == L.HE
    _run(widget, qtbot, "Whole image")
    assert widget.result is not None and widget.result.her2 == "3+"
    assert widget.explanation.text().startswith("3+:")
    m = viewer.layers[L.HER2]
    assert m.data.shape == (1, 1) and m.data[0, 0] == 4  # 256 um tiles = 512 px at 0.5 um/px
    assert m.scale[-1] == pytest.approx(0.5 * 512)
    pts = viewer.layers[CELLS_LAYER]
    # every detected cell: tumour cells by membrane class, the rejected ones grey
    assert len(pts.data) == len(widget.result.centroid)
    assert pts.features["tumour"].sum() == widget.result.cells
    assert set(pts.features["class"][pts.features["tumour"]]) <= {"none", "faint", "weak_moderate", "intense"}
    assert set(pts.features["class"][~pts.features["tumour"]]) == {"not tumour"}
    assert widget.table.rowCount() == 1 and widget.table.item(0, 1).text() == "3+"
    assert int(widget.table.item(0, 2).text()) == widget.result.cells
    # overlay hides when zoomed far out, shows when zoomed in
    viewer.scene.camera.zoom = 0.01
    assert not pts.visible
    viewer.scene.camera.zoom = 4.0
    assert pts.visible


def test_visible_region_follows_camera(viewer_with_ihc, qtbot):
    from napari_bci.widgets.her2 import HER2Widget

    viewer = viewer_with_ihc
    widget = HER2Widget(viewer)
    h, w = viewer.canvas.size
    # a view of about 150 x 150 px (75 um) around pixel (y, x) = (200, 300)
    viewer.scene.camera.center = (200 * 0.5, 300 * 0.5)
    viewer.scene.camera.zoom = min(h, w) / 75.0
    poly = widget.visible_polygon(viewer.layers[L.IHC_TRUTH])
    assert poly[:, 0].min() == pytest.approx(300 - 75 * w / min(h, w), abs=2)
    _run(widget, qtbot, "Visible region")
    c = widget.result.centroid
    assert len(c) > 0
    # about 20 tumour cells in view: not assessable, said so in the text and the table
    assert widget.result.her2 is None and widget.result.reason_code == "too_few_cells"
    assert widget.explanation.text().startswith("not assessable: too few tumour cells")
    assert widget.table.item(0, 1).text().startswith("not assessable (too few tumour cells")
    assert c[:, 0].min() >= poly[:, 0].min() - 1 and c[:, 0].max() <= poly[:, 0].max() + 1
    assert c[:, 1].min() >= poly[:, 1].min() - 1 and c[:, 1].max() <= poly[:, 1].max() + 1


def test_drawn_regions(viewer_with_ihc, qtbot):
    from napari_bci.widgets.her2 import HER2Widget

    viewer = viewer_with_ihc
    widget = HER2Widget(viewer)
    assert widget.run("Drawn regions") is None  # no Regions layer: a warning, nothing runs
    assert widget.result is None
    rect = np.array([[0, 0], [0, 255], [511, 255], [511, 0]], float)  # (y, x) left half
    viewer.add_shapes([rect], shape_type="rectangle", name=L.REGIONS, scale=(0.5, 0.5),
                      features={"name": ["left half"]})
    _run(widget, qtbot, "Drawn regions")
    assert list(widget.region_results) == ["left half"]
    r = widget.region_results["left half"]
    assert r.cells > 20 and r.centroid[:, 0].max() <= 256.5
    assert widget.explanation.text().startswith("left half: ")
    # cell outlines: one label per result cell, where the cell is, grey when not a tumour cell
    from napari_bci.widgets.her2 import CLASS_COLOURS, OUTLINES_LAYER, REJECTED_COLOUR

    ol = viewer.layers[OUTLINES_LAYER]
    ids = np.unique(ol.data)
    assert ol.contour == 1 and len(ids[ids > 0]) == len(r.centroid)
    ihc = viewer.layers[L.IHC_TRUTH]
    for j in (0, len(r.centroid) // 2, len(r.centroid) - 1):
        yy, xx = np.nonzero(ol.data == j + 1)
        world = ol.data_to_world((yy.mean(), xx.mean()))
        y, x = ihc.world_to_data(world)[-2:]
        assert np.hypot(x - r.centroid[j, 0], y - r.centroid[j, 1]) < 8  # 4 um: cell vs nucleus centre
        want = CLASS_COLOURS[r.cell_class[j]] if r.tumour[j] else REJECTED_COLOUR
        assert np.allclose(ol.colormap.color_dict[j + 1], want)


def test_cancel_whole_image(make_napari_viewer, qtbot):
    from napari_bci.widgets.her2 import HER2Widget

    viewer = make_napari_viewer()
    big = np.tile(synthetic.make_pair(her2="1+", size=256, seed=3).ihc, (8, 8, 1))  # 2048 px
    data, attrs, _ = image_layer(big, L.IHC_TRUTH, mpp=0.5)
    viewer.add_image(data, **attrs)
    widget = HER2Widget(viewer)
    widget.learned_check.setChecked(False)
    widget.run("Whole image")
    widget.cancel()
    qtbot.waitUntil(widget.is_idle, timeout=60_000)
    assert widget.result is None and L.HER2 not in viewer.layers
    assert widget.score_btn.isEnabled()


def test_learned_level_next_to_rule_score(viewer_with_ihc, qtbot):
    """A registered generator with a HER2 head (the real level-aware architecture, untrained)
    gives the learned level per tile and the comparison with the rule-based score."""
    torch = pytest.importorskip("torch")
    from napari_bci.models import registry
    from napari_bci.models.base import TorchGenerator
    from napari_bci.models.level_aware import build
    from napari_bci.widgets.her2 import LEARNED_LAYER, HER2Widget

    def factory(device=None, **_):
        torch.manual_seed(0)
        module = build({"channels": [8, 8, 16, 16], "n_blocks": 1, "head_channels": 8})
        return TorchGenerator(module, name="tiny-her2-test", tile=128, halo=0, mpp=1.0, multiple=16)

    registry.register("tiny-her2-test", factory, tile=128, halo=0, mpp=1.0, predicts_her2=True)
    try:
        widget = HER2Widget(viewer_with_ihc)
        widget.model_name = "tiny-her2-test"
        _run(widget, qtbot, "Whole image")
        text = widget.explanation.text()
        assert "rule-based 3+ vs learned" in text and "tiles: " in text
        assert widget.learned["rule"] == "3+" and widget.learned["learned"] in ("0", "1+", "2+", "3+")
        assert LEARNED_LAYER in viewer_with_ihc.layers
        layers = viewer_with_ihc.layers
        assert layers[LEARNED_LAYER].data.shape == layers[L.HER2].data.shape
    finally:
        registry.unregister("tiny-her2-test")


def test_he_layer_is_refused(viewer_with_ihc, qtbot):
    from napari_bci.widgets.her2 import HER2Widget

    widget = HER2Widget(viewer_with_ihc)
    widget.ihc_combo.setCurrentText(L.HE)
    _run(widget, qtbot, "Whole image")
    assert widget.result is None and L.HER2 not in viewer_with_ihc.layers
    assert widget.explanation.text().startswith(f"Refused: {L.HE}: not a DAB IHC: H&E-like colours")


def test_export_report(viewer_with_ihc, qtbot, tmp_path):
    from skimage.io import imread

    from napari_bci.widgets.her2 import HER2Widget

    widget = HER2Widget(viewer_with_ihc)
    widget.learned_check.setChecked(False)
    assert not widget.export_btn.isEnabled()
    _run(widget, qtbot, "Whole image")
    assert widget.export_btn.isEnabled()
    csv_path, png_path = widget.export_report(tmp_path / "slide_report.png")
    lines = csv_path.read_text().splitlines()
    assert len(lines) == 2 and lines[1].startswith("whole image,3+,3+,True")
    png = imread(png_path)
    assert png.shape[1] == 1100 and png.shape[0] > 512


def test_cell_and_level_colours_do_not_share_meanings():
    """The level map and the cell classes use different palettes (a yellow cell is not '1+')."""
    from napari_bci.her2 import LEGEND
    from napari_bci.widgets.her2 import CLASS_COLOURS

    for c in CLASS_COLOURS:
        for lv in LEGEND.values():
            assert np.abs(np.asarray(c[:3]) - np.asarray(lv[:3])).sum() > 0.3


def test_learned_level_from_a_bcistainer_checkpoint(viewer_with_ihc, qtbot, data_dir):
    """The level model is chosen in the widget: a published level-aware checkpoint (BCIStainer,
    upstream file layout, the YAML beside it) gives the learned level; a model without a HER2
    head says so instead of silently showing nothing."""
    pytest.importorskip("torch")
    from napari_bci.widgets.her2 import CHECKPOINT_ITEM, HER2Widget

    widget = HER2Widget(viewer_with_ihc)
    items = [widget.level_combo.itemText(i) for i in range(widget.level_combo.count())]
    assert items[0] == "builtin" and items[-1] == CHECKPOINT_ITEM and "baseline" not in items
    ckpt = data_dir / "upstream_tiny" / "bcistainer_tiny.pth"
    widget.set_level_model(ckpt)
    assert widget.level_combo.currentText() == "file: bcistainer_tiny.pth" and widget.model_name == str(ckpt)
    _run(widget, qtbot, "Whole image")
    assert widget.learned["learned"] in ("0", "1+", "2+", "3+") and widget.learned["probabilities"]
    assert "vs learned" in widget.explanation.text()
    widget.set_level_model("baseline")  # a registry model with no HER2 head
    _run(widget, qtbot, "Whole image")
    assert widget.learned["learned"] is None
    assert "baseline has no HER2 head" in widget.explanation.text()


def test_a_virtual_ihc_score_says_so_in_the_widget_and_the_report(make_napari_viewer, pair, qtbot, tmp_path):
    """Scoring the generated layer (the widget's default choice) says the level is the model's
    drawing, in the explanation and on the exported report; the real IHC's score does not."""
    from skimage.io import imread

    from napari_bci.widgets.her2 import HER2Widget

    viewer = make_napari_viewer()
    data, attrs, _ = image_layer(pair.ihc, L.IHC_TRUTH, mpp=0.5, role="ihc", her2="3+")
    viewer.add_image(data, **attrs)
    data, attrs, _ = image_layer(pair.ihc, L.generated_name("builtin"), mpp=0.5, role="generated",
                                 extra_metadata={"model": "builtin"})
    viewer.add_image(data, **attrs)
    widget = HER2Widget(viewer)
    widget.learned_check.setChecked(False)
    assert widget.ihc_combo.currentText() == L.generated_name("builtin")
    _run(widget, qtbot, "Whole image")
    assert "virtual IHC generated by builtin" in widget.explanation.text()
    _, png_virtual = widget.export_report(tmp_path / "virtual.png")
    widget.ihc_combo.setCurrentText(L.IHC_TRUTH)
    _run(widget, qtbot, "Whole image")
    assert widget.result.her2 == "3+" and "virtual" not in widget.explanation.text()
    _, png_real = widget.export_report(tmp_path / "real.png")
    # the same image and score: the virtual report carries one more (note) line of text
    assert imread(png_virtual).shape[0] > imread(png_real).shape[0]
