"""The Slides dock widget and the reader inside a real napari viewer."""

from __future__ import annotations

import numpy as np
import pytest

from napari_bci.io.layers import HE, IHC_TRUTH
from napari_bci.widgets.slides import SlidesWidget

from test_io_bci import make_bci


@pytest.fixture
def widget(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    w = SlidesWidget(viewer)
    qtbot.addWidget(w)
    return w


def _wait_layers(qtbot, viewer, names, timeout=20000):
    qtbot.waitUntil(lambda: [l.name for l in viewer.layers] == list(names), timeout=timeout)


def test_open_slide_with_physical_scale(widget, qtbot, data_dir):
    v = widget.viewer
    widget.he_edit.setText(str(data_dir / "CMU-1-Small-Region.svs"))
    widget.open_button.click()
    _wait_layers(qtbot, v, [HE])
    layer = v.layers[HE]
    assert layer.multiscale and len(layer.data) == 4 and layer.rgb
    np.testing.assert_allclose(layer.scale, [0.499, 0.499])
    assert layer.metadata["format"] == "svs" and layer.metadata["mpp"] == pytest.approx(0.499)
    assert "svs" in widget.info.text() and "0.499" in widget.info.text() and "4 level" in widget.info.text()
    assert not widget.bci_box.isEnabled()


def test_he_and_separate_ihc(widget, qtbot, data_dir):
    v = widget.viewer
    widget.open(data_dir / "he_carcinoma_1000.png", data_dir / "he_tile_240.png")
    _wait_layers(qtbot, v, [HE, IHC_TRUTH])
    assert v.layers[IHC_TRUTH].metadata["role"] == "ihc"
    assert v.layers[HE].data.shape == (1000, 1000, 3)
    np.testing.assert_allclose(v.layers[HE].scale, [1, 1])  # no mpp in a PNG


def test_bci_folder_stepping_and_filters(widget, qtbot, tmp_path, data_dir):
    root = make_bci(tmp_path / "BCI", data_dir)
    v = widget.viewer
    widget.open_dropped([str(root)])
    _wait_layers(qtbot, v, [HE, IHC_TRUTH])
    assert widget.bci_box.isEnabled()
    he_layer = v.layers[HE]
    assert he_layer.metadata["her2"] == "0" and "pair 1 / 6" in widget.pair_label.text()

    first = np.array(he_layer.data)
    widget.next_button.click()
    qtbot.waitUntil(lambda: v.layers[HE].metadata["bci"]["index"] == 1, timeout=20000)
    assert v.layers[HE] is he_layer  # replaced in place, not stacked up
    assert len(v.layers) == 2
    assert not np.array_equal(np.asarray(v.layers[HE].data), first)
    assert v.layers[HE].metadata["her2"] == v.layers[IHC_TRUTH].metadata["her2"] == "2+"
    assert "HER2 2+" in widget.pair_label.text()

    widget.her2_combo.setCurrentText("3+")
    qtbot.waitUntil(lambda: v.layers[HE].metadata["bci"]["name"] == "00003_train_3+.png", timeout=20000)
    assert "pair 1 / 2" in widget.pair_label.text()
    widget.prev_button.click()
    qtbot.waitUntil(lambda: v.layers[HE].metadata["bci"]["name"] == "00011_test_3+.png", timeout=20000)
    widget.split_combo.setCurrentText("train")
    qtbot.waitUntil(lambda: v.layers[HE].metadata["bci"]["name"] == "00003_train_3+.png", timeout=20000)
    assert v.layers[IHC_TRUTH].metadata["path"].endswith("IHC/train/00003_train_3+.png")


def test_errors_become_notifications(widget, qtbot, tmp_path):
    from napari.utils.notifications import notification_manager

    bad = tmp_path / "broken.svs"
    bad.write_text("not a slide")
    before = len(notification_manager.records)
    widget.open(bad)
    qtbot.waitUntil(lambda: len(notification_manager.records) > before, timeout=20000)
    msg = str(notification_manager.records[-1].message)
    assert "broken.svs" in msg
    assert "Error" in widget.info.text() and len(widget.viewer.layers) == 0
    widget.open("")
    assert "choose" in str(notification_manager.records[-1].message)


def test_viewer_open_uses_plugin_and_reports_bad_files(make_napari_viewer, data_dir, tmp_path, monkeypatch):
    from napari.errors import ReaderPluginError

    from napari_bci.errors import InputError

    v = make_napari_viewer()
    layers = v.open(str(data_dir / "CMU-1-Small-Region.pyramid.ome.tif"), plugin="napari-bci")
    assert [l.name for l in layers] == [HE] and layers[0].multiscale
    np.testing.assert_allclose(layers[0].scale, [0.499, 0.499])
    bad = tmp_path / "cut.ome.tif"
    bad.write_bytes((data_dir / "CMU-1-Small-Region.pyramid.ome.tif").read_bytes()[:100000])
    with pytest.raises(InputError, match="cut.ome.tif: truncated"):
        v.open(str(bad), plugin="napari-bci")
    # what File > Open and drag-and-drop call: napari wraps our error, its dialog shows the text
    from napari.settings import get_settings

    monkeypatch.setattr(get_settings().plugins, "extension2reader", {"*.ome.tif": "napari-bci"})
    with pytest.raises(ReaderPluginError) as ei:
        v._open_or_raise_error([str(bad)])
    assert isinstance(ei.value.original_error, InputError)
    assert "cut.ome.tif" in str(ei.value) and "truncated" in str(ei.value)
    assert len(v.layers) == 1


def test_drop_he_and_ihc_files_onto_widget(widget, qtbot, tmp_path, data_dir):
    from qtpy.QtCore import QMimeData, QPointF, Qt, QUrl
    from qtpy.QtGui import QDropEvent

    root = make_bci(tmp_path / "BCI", data_dir)
    he = root / "HE" / "train" / "00003_train_3+.png"
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(he))])
    event = QDropEvent(QPointF(5, 5), Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier)
    widget.dropEvent(event)
    _wait_layers(qtbot, widget.viewer, [HE, IHC_TRUTH])  # the partner came along
    assert widget.he_edit.text() == str(he)
    assert widget.viewer.layers[IHC_TRUTH].metadata["her2"] == "3+"


def test_save_layer_with_plugin_writer(make_napari_viewer, data_dir, tmp_path):
    from napari_bci.io.slide import open_slide

    v = make_napari_viewer()
    v.open(str(data_dir / "CMU-1-Small-Region.svs"), plugin="napari-bci")
    out = tmp_path / "saved.ome.tif"
    written = v.layers.save(str(out), selected=False, plugin="napari-bci")
    assert written == [str(out)]
    with open_slide(out) as s:
        assert s.format == "ome-tiff" and s.mpp == pytest.approx(0.499) and s.native_levels == 4


def test_pixel_size_for_a_patch_without_one(widget, qtbot, data_dir):
    """A PNG carries no mpp: the widget says so and lets the user set it, for every widget."""
    v = widget.viewer
    widget.open(data_dir / "he_carcinoma_1000.png")
    _wait_layers(qtbot, v, [HE])
    assert "mpp unknown" in widget.info.text() and "unknown for H&E" in widget.mpp_box.title()
    assert widget.mpp_layer.currentText() == HE
    widget.mpp_spin.setValue(0.25)
    widget.mpp_button.click()
    layer = v.layers[HE]
    assert layer.metadata["mpp"] == pytest.approx(0.25) and tuple(layer.scale) == (0.25, 0.25)
    assert "0.250 µm/px" in widget.info.text() and widget.mpp_box.title() == "Pixel size"
    assert float(widget.settings.value("mpp")) == pytest.approx(0.25)  # remembered for next time


def test_layers_opened_elsewhere_are_described(widget, data_dir):
    """File > Open (napari's reader) or a sample: the widget does not keep saying 'Nothing open'."""
    from napari_bci._npe2 import read_file

    v = widget.viewer
    assert "Nothing open yet" in widget.info.text()
    for data, attrs, _ in read_file(data_dir / "CMU-1-Small-Region.svs"):
        v.add_image(data, **attrs)
    assert "Nothing open" not in widget.info.text() and "svs" in widget.info.text()
