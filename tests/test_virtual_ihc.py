"""The Virtual IHC widget in a real napari viewer: follow the view, stale results dropped."""

from __future__ import annotations

import time

import numpy as np
import pytest

from napari_bci.models import registry
from napari_bci.models.base import FunctionGenerator
from napari_bci.io import layers as L

pytestmark = pytest.mark.gui


def _slow_invert(tiles):
    time.sleep(0.12)  # a slow model: views change faster than it computes
    return 255 - tiles


@pytest.fixture
def slow_model():
    registry.register("slow-invert", lambda device=None: FunctionGenerator(_slow_invert, name="slow-invert",
                                                                           tile=128, halo=0),
                      tile=128, halo=0, predicts_her2=False, replace=True)
    yield "slow-invert"
    registry.unregister("slow-invert")


@pytest.fixture
def he_viewer(make_napari_viewer, data_dir):
    from napari_bci.io.patches import read_patch

    viewer = make_napari_viewer()
    he = read_patch(data_dir / "he_carcinoma_1000.png")
    data, attrs, _ = L.image_layer(he, L.HE, mpp=0.5, role="he")
    viewer.add_image(data, **attrs)
    return viewer, he


def _look_at(viewer, y_px, x_px, mpp=0.5, view_px=300):
    """Centre the camera on H&E pixel (y, x) showing about ``view_px`` pixels."""
    cam = viewer.scene.camera
    cam.zoom = min(viewer.canvas.size) / (view_px * mpp)
    cam.center = (0, y_px * mpp, x_px * mpp)


def _make_widget(viewer, model, qtbot):
    from napari_bci.widgets.virtual_ihc import VirtualIHCWidget

    w = VirtualIHCWidget(viewer)
    qtbot.addWidget(w)
    assert w.he_combo.currentText() == L.HE
    w.model_combo.setCurrentText(model)
    w.tile_spin.setValue(128)
    return w


def test_fast_pans_write_only_final_view(he_viewer, slow_model, qtbot):
    viewer, he = he_viewer
    w = _make_widget(viewer, slow_model, qtbot)
    w.output_memory_bytes = 0  # block-sparse output levels, as for whole slides
    _look_at(viewer, 150, 150)
    w.start()
    name = L.generated_name(slow_model)
    assert name in viewer.layers and viewer.layers[name].metadata["role"] == "generated"
    qtbot.waitUntil(lambda: not w.is_running(), timeout=20000)
    first = set(w.written)
    assert first == set(w.visible_tiles())

    # pan several times quickly, each pan starting a job before the previous one finished
    jobs = w.jobs_started
    for y, x in ((850, 850), (150, 850), (850, 150), (560, 560)):
        _look_at(viewer, y, x)
        w.update_view()
        qtbot.wait(20)
    final = set(w.visible_tiles())
    qtbot.waitUntil(lambda: not w.is_running(), timeout=30000)
    assert final <= w.written
    assert w.written - first == final - first  # nothing from the intermediate views was written
    assert w.jobs_started - jobs >= 2  # outdated jobs really were started and then cancelled

    # written tiles hold the generator's output (opaque) at the right place; the rest is
    # transparent, so the H&E under a pending tile stays visible
    out = np.asarray(viewer.layers[name].data[0])
    assert out.shape[2] == 4
    mask = np.zeros(out.shape[:2], bool)
    for idx in w.written:
        y0, y1, x0, x1 = w.engine.grid.core(idx)
        mask[y0:y1, x0:x1] = True
        assert np.array_equal(out[y0:y1, x0:x1, :3], 255 - he[y0:y1, x0:x1])
    assert (out[mask, 3] == 255).all() and (out[~mask, 3] == 0).all()
    assert viewer.layers[name].scale[-1] == pytest.approx(0.5)

    # revisiting an earlier view computes nothing
    computed = w.engine.computed
    _look_at(viewer, 150, 150)
    w.update_view()
    qtbot.waitUntil(lambda: not w.is_running(), timeout=5000)
    assert w.engine.computed == computed


def test_follow_the_view_debounced(he_viewer, slow_model, qtbot):
    viewer, _ = he_viewer
    w = _make_widget(viewer, slow_model, qtbot)
    _look_at(viewer, 150, 150)
    w.start()
    qtbot.waitUntil(lambda: not w.is_running(), timeout=20000)
    _look_at(viewer, 800, 800)  # camera events -> debounce -> job
    target = set(w.visible_tiles())
    assert not target <= w.written
    qtbot.waitUntil(lambda: target <= w.written and not w.is_running(), timeout=20000)
    w.stop()
    _look_at(viewer, 150, 800)
    qtbot.wait(w.debounce_ms + 100)
    assert not w.is_running()  # stopped: no longer following


def test_this_view_only_and_hide_stops(he_viewer, slow_model, qtbot):
    from napari_bci.widgets.virtual_ihc import THIS_VIEW

    viewer, _ = he_viewer
    w = _make_widget(viewer, slow_model, qtbot)
    w.mode_combo.setCurrentText(THIS_VIEW)
    _look_at(viewer, 500, 500, view_px=900)
    w.start()
    assert w.is_running()
    w.show()
    w.hide()  # hiding the dock widget stops the work
    qtbot.waitUntil(lambda: not w.is_running(), timeout=5000)
    assert not w._following
    n = len(w.written)
    _look_at(viewer, 100, 100)
    qtbot.wait(w.debounce_ms + 100)
    assert len(w.written) == n


def test_errors_become_notifications(he_viewer, qtbot):
    from napari.utils.notifications import notification_manager

    def broken(tiles):
        raise RuntimeError("weights are garbage")

    registry.register("broken-test", lambda device=None: FunctionGenerator(broken, name="broken-test", tile=128),
                      tile=128, halo=0, predicts_her2=False, replace=True)
    try:
        viewer, _ = he_viewer
        w = _make_widget(viewer, "broken-test", qtbot)
        _look_at(viewer, 300, 300)
        before = len(notification_manager.records)
        w.start()
        qtbot.waitUntil(lambda: not w.is_running(), timeout=10000)
        msgs = [str(r.message) for r in notification_manager.records[before:]]
        assert any("weights are garbage" in m for m in msgs)
        assert "Error" in w.status.text()
    finally:
        registry.unregister("broken-test")


def test_checkpoint_file_generator(he_viewer, qtbot, tmp_path):
    import torch

    from napari_bci.models.architectures import resnet_generator

    viewer, he = he_viewer
    exp = tmp_path / "user_model"
    exp.mkdir()
    torch.manual_seed(0)
    torch.save(resnet_generator(ngf=4, n_blocks=1).state_dict(), exp / "latest_net_G.pth")
    w = _make_widget(viewer, "baseline", qtbot)
    w.set_model(str(exp / "latest_net_G.pth"))
    assert w.model_combo.currentText() == "file: latest_net_G.pth"
    _look_at(viewer, 200, 200, view_px=200)
    w.start()
    qtbot.waitUntil(lambda: w.is_idle() and bool(w.written) and set(w.visible_tiles()) <= w.written, timeout=30000)
    layer = viewer.layers[L.generated_name("user_model")]
    meta = layer.metadata
    assert meta["model"] == str(exp / "latest_net_G.pth") and meta["tiles_done"] == w.written
    y0, y1, x0, x1 = w.engine.grid.core(next(iter(w.written)))
    assert np.asarray(layer.data[y0:y1, x0:x1] if not layer.multiscale else layer.data[0][y0:y1, x0:x1]).std() > 0


def test_a_second_generate_reuses_the_layer_and_its_tiles(he_viewer, slow_model, qtbot):
    """The engine is keyed by the layer's napari unique_id, not id() of the proxy a plugin gets."""
    viewer, _ = he_viewer
    w = _make_widget(viewer, slow_model, qtbot)
    _look_at(viewer, 200, 200)
    w.start()
    qtbot.waitUntil(lambda: w.is_idle() and bool(w.written), timeout=20000)
    layer, engine, done = w.output_layer, w.engine, set(w.written)
    computed = engine.computed
    w.start()  # press Generate again
    qtbot.waitUntil(w.is_idle, timeout=20000)
    assert w.output_layer is layer and w.engine is engine and engine.computed == computed
    assert set(w.written) == done and len([ly for ly in viewer.layers if ly.name.startswith("IHC (gen")]) == 1
    # another generator: a new layer beside the old one, which keeps its pixels
    old = np.asarray(layer.data).copy()
    w.set_model("baseline")
    w.start()
    qtbot.waitUntil(lambda: w.is_idle() and bool(w.written), timeout=30000)
    assert w.output_layer is not layer and layer in viewer.layers
    assert np.array_equal(np.asarray(layer.data), old)


def test_pending_tiles_are_transparent_in_a_real_window(he_viewer, slow_model, qtbot):
    """While tiles are pending, the screen shows the H&E under the output layer, not white."""
    viewer, he = he_viewer
    w = _make_widget(viewer, slow_model, qtbot)
    viewer.window._qt_window.show()
    _look_at(viewer, 500, 500, view_px=900)
    w.mode_combo.setCurrentText("This view only")
    w.start()
    assert w.is_running() and w.output_layer is viewer.layers[-1]
    shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    w.stop()
    tissue = shot[(shot.max(-1) - shot.min(-1)) > 40]  # coloured pixels: stained tissue on screen
    assert len(tissue) > 0.2 * shot.shape[0] * shot.shape[1]
    # the H&E's pink/purple (red and blue above green), not the inverted output (green above both)
    assert np.median(tissue[:, 0] - tissue[:, 1]) > 20


def test_a_view_larger_than_one_job_fills_evenly_with_an_estimate(he_viewer, slow_model, qtbot):
    from napari_bci.widgets.virtual_ihc import coarse_to_fine

    viewer, _ = he_viewer
    w = _make_widget(viewer, slow_model, qtbot)
    w.max_tiles = 4
    _look_at(viewer, 500, 500, view_px=1000)
    w.start()
    visible = set(w.visible_tiles())
    assert len(visible) > 8 and "to generate" in w.note.text() and "per job" in w.note.text()
    qtbot.waitUntil(lambda: len(w.written) >= 4, timeout=20000)
    first = sorted(w.written)[:4]
    assert max(r for r, _ in first) - min(r for r, _ in first) >= 1  # spread out, not one corner
    qtbot.waitUntil(lambda: visible <= w.written, timeout=60000)  # the next jobs go on by themselves
    assert "about" in w.note.text() or w.note.text() == ""
    order = coarse_to_fine([(r, c) for r in range(9) for c in range(9)])
    assert order[:4] == [(0, 0), (0, 8), (8, 0), (8, 8)]


@pytest.mark.parametrize("what", ["he", "output", "viewer"])
def test_removing_layers_or_closing_while_generating_is_clean(make_napari_viewer, data_dir, slow_model, qtbot, what):
    """Used to raise 'Internal C++ object (QLabel) already deleted' and leave the worker running."""
    from napari_bci.io.patches import read_patch

    viewer = make_napari_viewer()
    data, attrs, _ = L.image_layer(read_patch(data_dir / "he_carcinoma_1000.png"), L.HE, mpp=0.5, role="he")
    viewer.add_image(data, **attrs)
    from napari_bci.widgets.virtual_ihc import VirtualIHCWidget

    w = VirtualIHCWidget(viewer)  # docked: the window owns (and deletes) it
    w.model_combo.setCurrentText(slow_model)
    viewer.window.add_dock_widget(w)
    _look_at(viewer, 500, 500, view_px=900)
    w.start()
    assert w.is_running()
    worker = w._worker
    if what == "he":
        viewer.layers.remove(L.HE)
    elif what == "output":
        viewer.layers.remove(w.output_layer)
    else:
        viewer.close()
    qtbot.waitUntil(lambda: not worker.is_running, timeout=10000)
    if what != "viewer":
        qtbot.waitUntil(lambda: not w.is_running(), timeout=5000)
        assert not w._following


def test_a_loader_failing_in_its_own_way_is_a_notification(he_viewer, qtbot):
    from napari.utils.notifications import notification_manager

    def factory(device=None):
        raise KeyError(101)  # what a malformed checkpoint made the loader raise

    registry.register("odd-failure", factory, tile=128, halo=0, predicts_her2=False, replace=True)
    try:
        viewer, _ = he_viewer
        w = _make_widget(viewer, "odd-failure", qtbot)
        before = len(notification_manager.records)
        w.start()
        msgs = [str(r.message) for r in notification_manager.records[before:]]
        assert any("KeyError: 101" in m and "odd-failure" in m for m in msgs)
        assert not w.is_running()
    finally:
        registry.unregister("odd-failure")


def test_choices_are_remembered_between_sessions(he_viewer, qtbot):
    from napari_bci.widgets.virtual_ihc import THIS_VIEW, VirtualIHCWidget

    viewer, _ = he_viewer
    w = _make_widget(viewer, "baseline", qtbot)
    w.mode_combo.setCurrentText(THIS_VIEW)
    w.tile_spin.setValue(256)
    w.tta_check.setChecked(True)
    again = VirtualIHCWidget(viewer)
    qtbot.addWidget(again)
    assert again.model_combo.currentText() == "baseline" and again.mode_combo.currentText() == THIS_VIEW
    assert again.tile_spin.value() == 256 and again.tta_check.isChecked()


def test_side_by_side_queues_only_one_panel_of_tiles(he_viewer, slow_model, qtbot):
    """In grid mode each panel shows a fraction of the canvas: the tiles queued are that
    panel's view, not the whole canvas's (which would generate tiles no panel shows)."""
    from napari_bci.widgets._layers import visible_box

    viewer, he = he_viewer
    w = _make_widget(viewer, slow_model, qtbot)
    viewer.window._qt_window.resize(1200, 800)
    _look_at(viewer, 500, 500, view_px=260)
    w.start()
    qtbot.waitUntil(lambda: not w.is_running(), timeout=20000)
    single = set(w.visible_tiles())
    data, attrs, _ = L.image_layer(he, "H&E copy", mpp=0.5, role="he")
    viewer.add_image(data, **attrs)
    viewer.canvas.grid.enabled = True  # two panels side by side
    vb = viewer.canvas.viewbox_size(viewer.layers)
    assert vb[1] < 0.6 * viewer.canvas.size[1]
    both = set(w.visible_tiles())
    assert both and both < single
    by0, by1, bx0, bx1 = visible_box(viewer)
    cam = viewer.scene.camera
    assert (bx1 - bx0) == pytest.approx(vb[1] / cam.zoom) and (by1 - by0) == pytest.approx(vb[0] / cam.zoom)


def test_each_checkpoint_item_keeps_its_own_file(he_viewer, qtbot, tmp_path):
    """Two checkpoint files chosen one after the other: going back to the first item uses the
    first file (the path travels with its item, not in one 'last file' slot)."""
    from napari_bci.widgets._models import model_spec

    viewer, _ = he_viewer
    w = _make_widget(viewer, "baseline", qtbot)
    a, b = tmp_path / "a" / "latest_net_G.pth", tmp_path / "b" / "model.pth"
    for p in (a, b):
        p.parent.mkdir()
        p.write_bytes(b"")
    w.set_model(str(a))
    w.set_model(str(b))
    w.model_combo.setCurrentText("file: latest_net_G.pth")
    assert model_spec(w.model_combo) == str(a)
    w.set_model(str(a))  # the same file again: the same item, not a second one
    texts = [w.model_combo.itemText(i) for i in range(w.model_combo.count())]
    assert texts.count("file: latest_net_G.pth") == 1 and texts[-1] == "Checkpoint file…"
    assert model_spec(w.model_combo) == str(a)
