"""The Register dock widget on a real napari viewer."""

from __future__ import annotations

import re

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
    w.view_combo.setCurrentText("Difference")
    qtbot.waitUntil(lambda: CHECK in viewer.layers and not viewer.layers[CHECK].rgb, timeout=20000)
    assert not viewer.layers[WARPED].visible
    w.view_combo.setCurrentText("Overlay")
    assert CHECK not in viewer.layers and viewer.layers[WARPED].visible
    w.mix_slider.setValue(80)  # the blend: the registered H&E's opacity
    assert viewer.layers[WARPED].opacity == pytest.approx(0.8)


def _check(qtbot, w, viewer, view):
    w.check_result = None
    w.view_combo.setCurrentText(view) if w.view_combo.currentText() != view else w.update_check(force=True)
    qtbot.waitUntil(lambda: w.check_result is not None, timeout=20000)
    return w.check_result


def _registered(w, pair, tmp_path, qtbot):
    pair.transform.save(tmp_path / "t.json")
    assert w.load_transform(tmp_path / "t.json") is not None
    _wait(qtbot, w)


def test_checkerboard_in_micrometres_and_swipe_follow_the_view(setup, qtbot, tmp_path):
    viewer, w, pair = setup
    _registered(w, pair, tmp_path, qtbot)
    fixed, warped = np.asarray(viewer.layers[L.IHC_TRUTH].data), np.asarray(viewer.layers[WARPED].data)
    viewer.reset_view()
    w.cell_spin.setValue(25.0)  # 25 um at 0.5 um/px: squares of 50 level-0 px
    viewer.add_shapes(name="Notes")  # the user's drawing stays visible over the check view
    res = _check(qtbot, w, viewer, "Checkerboard")
    assert res.cell_px == pytest.approx(50.0) and "25 µm" in w.status.text()
    names = [ly.name for ly in viewer.layers]
    assert names.index(CHECK) == names.index("Notes") - 1 and names.index(CHECK) > names.index(WARPED)
    img, win = res.image, res.window
    assert win.level == 0 and win.step == 1 and img.shape[:2] == win.shape
    ys, xs = np.arange(win.y0, win.y1), np.arange(win.x0, win.x1)
    board = ((ys[:, None] // 50) + (xs[None, :] // 50)) % 2 == 1
    f, m = fixed[win.y0:win.y1, win.x0:win.x1], warped[win.y0:win.y1, win.x0:win.x1]
    assert np.array_equal(img[board], m[board]) and np.array_equal(img[~board], f[~board])
    layer = viewer.layers[CHECK]
    assert layer.rgb and np.allclose(layer.translate, viewer.layers[L.IHC_TRUTH].translate)
    # zoomed in on a corner, the view is recomputed there; the squares stay anchored to the slide
    cam = viewer.camera
    cam.center = (60.0, 60.0)
    cam.zoom = cam.zoom * 4
    qtbot.waitUntil(lambda: w.check_result is not None and w.check_result.window != win, timeout=20000)
    res2 = w.check_result
    assert res2.window.y0 < 60 < res2.window.y1 and res2.window.y1 - res2.window.y0 < 384
    y, x = res2.window.y0, res2.window.x0
    assert np.array_equal(res2.image[0, 0], (m if ((y // 50 + x // 50) % 2) else f)[y - win.y0, x - win.x0])
    # Swipe: registered H&E left of the cut, IHC right of it
    viewer.reset_view()
    w.mix_slider.setValue(25)
    res = _check(qtbot, w, viewer, "Swipe")
    win = res.window
    cut = np.argmax((res.image == (255, 220, 0)).all(-1).any(0))
    assert 0.15 * win.shape[1] < cut < 0.35 * win.shape[1]
    f, m = fixed[win.y0:win.y1, win.x0:win.x1], warped[win.y0:win.y1, win.x0:win.x1]
    assert np.array_equal(res.image[:, : cut - 2], m[:, : cut - 2])
    assert np.array_equal(res.image[:, cut + 4:], f[:, cut + 4:])
    w.mix_slider.setValue(75)
    qtbot.waitUntil(lambda: np.argmax((w.check_result.image == (255, 220, 0)).all(-1).any(0)) > 0.6 * win.shape[1],
                    timeout=20000)


def test_shapes_drawn_on_the_he_are_carried_to_the_ihc_and_back(setup, qtbot, tmp_path):
    viewer, w, pair = setup
    _registered(w, pair, tmp_path, qtbot)
    square = np.array([[40.0, 40], [40, 90], [90, 90], [90, 40]])  # world (row, col) on the H&E
    k = viewer.layers[L.HE].scale[-1]  # world units per level-0 pixel (0.5 um)
    assert np.allclose(viewer.layers[L.IHC_TRUTH].scale, k) and not np.any(viewer.layers[L.HE].translate)
    viewer.add_shapes([square], shape_type="rectangle", name="Tumour", edge_color="cyan",
                      features={"name": ["nest 1"]})
    w.transfer_combo.setCurrentText("Tumour")
    on_ihc = w.transfer_shapes(to_ihc=True)
    assert on_ihc.name == "Tumour → IHC" and list(on_ihc.features["name"]) == ["nest 1"]
    verts = on_ihc.data[0]
    assert on_ihc.shape_type == ["polygon"] and len(verts) > 4  # edges cut so the map bends them
    # every corner lands where the known transform sends it
    want = pair.transform.forward(square[:, ::-1] / k)[:, ::-1] * k
    for c in want:
        assert np.min(np.linalg.norm(verts - c, axis=1)) < 1e-3  # napari keeps float32
    w.transfer_combo.setCurrentText("Tumour → IHC")
    back = w.transfer_shapes(to_ihc=False)
    assert back.name == "Tumour → IHC → H&E"
    for c in square:
        assert np.min(np.linalg.norm(back.data[0] - c, axis=1)) < 1e-3
    # an ellipse becomes its outline; with nothing registered there is a message, not a crash
    viewer.add_shapes([square], shape_type="ellipse", name="Ellipse")
    w.transfer_combo.setCurrentText("Ellipse")
    ell = w.transfer_shapes(to_ihc=True)
    assert ell.shape_type == ["polygon"] and len(ell.data[0]) >= 64
    w.transform = None
    assert w.transfer_shapes(to_ihc=True) is None and "register" in w.status.text()


def test_automatic_and_save_load(setup, qtbot, tmp_path):
    viewer, w, pair = setup
    w.run("auto")
    _wait(qtbot, w)
    assert w.transform is not None, w.status.text()
    pm, pf = truth_points(pair.transform, (384, 384), (384, 384), step=32)
    assert np.median(np.linalg.norm(w.transform.forward(pm) - pf, axis=1)) < 1.5
    # the figures that tell whether to trust it: the automatic score, the local agreement (the
    # same re-stained tissue: its blocks' best matches lie on the alignment) and the tissue overlap
    text = w.quality.text()
    assert "Automatic start: intensity" in text and "Tissue overlap (Dice)" in text
    assert re.search(r"Local agreement: the best matches of \d+ tissue blocks lie a median [0-2] px from", text), text
    w.save_transform(tmp_path / "t.json")
    viewer.layers.remove(WARPED)
    w.load_transform(tmp_path / "t.json")  # warped and measured in a worker
    _wait(qtbot, w)
    assert WARPED in viewer.layers and "NCC" in w.quality.text()


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


def test_a_refused_automatic_registration_says_what_to_do_next(make_napari_viewer, data_dir, qtbot):
    """Unrelated tissue (an IHC-like skin patch against a carcinoma H&E): the automatic step
    refuses, nothing is warped, and the status names the way on: landmarks."""
    from napari_bci.registration import RegistrationFailed
    from napari_bci.registration.known_warp import ihc_like

    viewer = make_napari_viewer()
    skin = ihc_like(imread(data_dir / "he_skin_10x.tif")[:512, :512, :3], seed=3)
    he = imread(data_dir / "he_carcinoma_1000.png")[:512, :512, :3]
    for img, name in ((skin, L.IHC_TRUTH), (he, L.HE)):
        data, attrs, _ = L.image_layer(img, name, mpp=0.5)
        viewer.add_image(data, **attrs)
    w = RegisterWidget(viewer)
    qtbot.addWidget(w)
    w.run("auto")
    _wait(qtbot, w)
    text = w.status.text()
    assert w.transform is None and WARPED not in viewer.layers
    assert text.startswith("Error: registration failed: ") and "Next: press 'Add landmark layers'" in text, text
    w.add_landmark_layers()  # with the layers there, the next step is to place the points
    w._on_error(RegistrationFailed("registration failed: test", rule="decision"))
    assert "Add landmark layers" not in w.status.text() and "press 'Landmarks'" in w.status.text()
    w._on_error(RegistrationFailed("registration failed: the fixed image (IHC) shows no tissue", rule="tissue",
                                   image="fixed"))
    assert "Next:" not in w.status.text()  # no landmarks help an empty image


def test_quality_text_says_whether_the_dense_field_was_kept():
    from napari_bci.widgets.register import format_quality

    kept = format_quality({"deformable_kept": True, "deformable_follows": "tissue structure",
                           "structure_polish_px": 6.04})
    assert "Dense field kept (follows tissue structure)" in kept
    assert "Pose fitted to the tissue structure: moved 6.0 px" in kept
    dropped = format_quality({"deformable_kept": False,
                              "deformable_rejected": "the field lowered the tissue's orientation agreement"})
    assert "Dense field dropped, projective kept: the field lowered the tissue's orientation" in dropped
    assert "Dense field" not in format_quality({"method": "landmarks", "landmark_residuals": [1.0]})
