"""The Register dock widget on a real napari viewer."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.io import imread

from napari_bci.io import layers as L
from napari_bci.registration.images import od_channel
from napari_bci.registration.known_warp import make_known_pair, truth_points
from napari_bci.registration.quality import ncc
from napari_bci.widgets.register import CHECK, WARPED, RegisterWidget


@pytest.fixture
def setup(make_napari_viewer, data_dir):
    he = imread(data_dir / "he_carcinoma_1000.png")[:384, :384, :3]
    pair = make_known_pair(he, seed=4, angle=30, field_amplitude=0)
    viewer = make_napari_viewer()
    for img, name in ((pair.fixed, L.IHC_TRUTH), (pair.moving, L.HE)):
        data, attrs, _ = L.image_layer(img, name, mpp=0.5)
        viewer.add_image(data, **attrs)
    w = RegisterWidget(viewer)
    return viewer, w, pair


def _wait(qtbot, w, timeout=60000):
    qtbot.waitUntil(w.is_idle, timeout=timeout)


def test_landmarks_register_and_views(setup, qtbot):
    viewer, w, pair = setup
    assert w.fixed_combo.currentText() == L.IHC_TRUTH and w.moving_combo.currentText() == L.HE
    w.add_landmark_layers()
    pm, pf = truth_points(pair.transform, (384, 384), (384, 384), step=110)
    he_pts, ihc_pts = viewer.layers[L.LANDMARKS_HE], viewer.layers[L.LANDMARKS_IHC]
    he_pts.data = pm[:, ::-1]  # napari (row, col) data, pixel units of the image
    ihc_pts.data = pf[:, ::-1]
    # paired by order: same colour and number in both layers
    assert np.allclose(he_pts.face_color, ihc_pts.face_color)
    assert list(he_pts.features["n"]) == list(range(1, len(pm) + 1))
    assert [str(t) for t in ihc_pts.text.values] == [str(i) for i in range(1, len(pm) + 1)]
    m, f = w.landmark_pairs()
    assert np.allclose(m, pm) and np.allclose(f, pf)
    w.run("landmarks")
    _wait(qtbot, w)
    assert WARPED in viewer.layers
    warped = np.asarray(viewer.layers[WARPED].data)
    assert warped.shape == pair.fixed.shape
    c = slice(64, -64)  # corners outside the rotated H&E are filled by mirroring
    assert ncc(od_channel(warped[c, c]), od_channel(pair.fixed[c, c])) > 0.9
    assert np.allclose(viewer.layers[WARPED].scale, viewer.layers[L.IHC_TRUTH].scale)
    assert "NCC" in w.quality.text() and "TRE" in w.quality.text()
    w.view_combo.setCurrentText("Checkerboard")
    assert CHECK in viewer.layers and viewer.layers[CHECK].rgb
    w.view_combo.setCurrentText("Difference")
    assert CHECK in viewer.layers and not viewer.layers[CHECK].rgb
    w.view_combo.setCurrentText("Overlay")
    assert CHECK not in viewer.layers and viewer.layers[WARPED].visible


def test_automatic_and_save_load(setup, qtbot, tmp_path):
    viewer, w, pair = setup
    w.run("auto")
    _wait(qtbot, w)
    assert w.transform is not None, w.status.text()
    pm, pf = truth_points(pair.transform, (384, 384), (384, 384), step=32)
    assert np.median(np.linalg.norm(w.transform.forward(pm) - pf, axis=1)) < 1.5
    # the figures that tell whether to trust it: the automatic score and the tissue overlap
    text = w.quality.text()
    assert "Automatic start: intensity" in text and "Tissue overlap (Dice)" in text
    w.save_transform(tmp_path / "t.json")
    viewer.layers.remove(WARPED)
    w.load_transform(tmp_path / "t.json")
    assert WARPED in viewer.layers


def test_bad_input_is_a_message_not_a_crash(setup, qtbot):
    viewer, w, pair = setup
    w.add_landmark_layers()
    viewer.layers[L.LANDMARKS_HE].data = np.array([[10.0, 10], [50, 80], [90, 20]])
    viewer.layers[L.LANDMARKS_IHC].data = np.array([[12.0, 10], [52, 80], [92, 20]])
    assert w.run("landmarks") is None
    assert "at least 4" in w.status.text()
    # collinear landmarks: the core's InputError arrives as a notification through the worker
    line = np.array([[10.0, 10], [20, 20], [30, 30], [40, 40]])
    viewer.layers[L.LANDMARKS_HE].data = line
    viewer.layers[L.LANDMARKS_IHC].data = line + 1
    w.run("landmarks")
    _wait(qtbot, w)
    assert "collinear" in w.status.text() and w.transform is None
    w.load_transform("/nonexistent/t.json")
    assert "no such file" in w.status.text()
