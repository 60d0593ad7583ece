"""Launch napari with napari-bci's layers and widgets (used by ``napari-bci demo/view``)."""

from __future__ import annotations

from typing import Iterable

from ..io.layers import HE_REGISTERED, IHC_TRUTH, SSIM

#: The plugin's dock widgets, in the order they are docked (names as in napari.yaml).
WIDGETS = ("Slides", "Virtual IHC", "Compare", "Register", "HER2")


def dock_widgets(viewer, names: Iterable[str] = WIDGETS) -> dict:
    """Dock the plugin's widgets (tabbed on the right) and return them by name."""
    docked, docks = {}, {}
    for i, name in enumerate(names):
        docks[name], docked[name] = viewer.window.add_plugin_dock_widget("napari-bci", name, tabify=i > 0)
    if "Virtual IHC" in docks:
        docks["Virtual IHC"].raise_()  # the tab a newcomer starts from
    return docked


def demo_layers(size: int = 16384, seed: int = 0, her2: str = "3+") -> tuple[list[tuple], object]:
    """The embedded default data: the synthetic whole-slide H&E / IHC pair as layer tuples, plus
    the H&E registered to the IHC by the pair's known transform (rendered in the IHC's frame), so
    that generated and real IHC show the same cells. Returns ``(tuples, pair)``."""
    from .._npe2 import wsi_pair
    from ..io.layers import HE, HE_REGISTERED, image_layer

    tuples = wsi_pair(size=size, seed=seed, her2=her2)
    (he, he_attrs, _), (ihc, ihc_attrs, _) = tuples
    pair = he_attrs["metadata"]["truth"]
    reg = image_layer(pair.registered_he_levels(), HE_REGISTERED, mpp=pair.mpp, role="he", fmt="synthetic", her2=pair.her2,
                      extra_metadata={"registered_to": ihc_attrs["name"], "transform": pair.transform.to_dict(),
                                      "registration": "the synthetic pair's known transform"})
    he_attrs = {**he_attrs, "visible": False, "name": HE}
    return [(he, he_attrs, "image"), reg, (ihc, ihc_attrs, "image")], pair


def _finish(viewer, widgets, screenshot: str | None, wait_s: float, ready=None) -> None:
    """Run napari; with ``screenshot``, save the window once ``ready()`` is true (or after
    ``wait_s``) and quit."""
    import napari
    from qtpy.QtCore import QTimer

    if not screenshot:
        napari.run()
        return
    import time

    start = time.monotonic()
    timer = QTimer()

    def poll():
        if (ready is None or not ready()) and time.monotonic() - start < wait_s:
            return
        timer.stop()
        viewer.screenshot(screenshot, canvas_only=False, flash=False)
        for w in widgets:
            w.close()  # stop their workers and timers before napari tears the layers down
        viewer.close()

    timer.timeout.connect(poll)
    timer.start(250)
    napari.run()


def launch_demo(
    size: int = 16384,
    seed: int = 0,
    her2: str = "3+",
    model: str | None = None,
    generate: bool = True,
    screenshot: str | None = None,
    zoom: float = 0.5,
):
    """The demo: the synthetic pair side by side on a tumour nest, the built-in model following
    the view (``zoom``: screen px per level-0 px; 2 to see membranes up close)."""
    import napari

    viewer = napari.Viewer(title="napari-bci demo")
    viewer.window.resize(1600, 1000)
    tuples, pair = demo_layers(size=size, seed=seed, her2=her2)
    for data, attrs, _ in tuples:
        viewer.add_image(data, **attrs)
    widgets = dock_widgets(viewer)
    vihc = widgets["Virtual IHC"]
    vihc.he_combo.setCurrentText(HE_REGISTERED)  # generate in the IHC's frame
    if model:
        vihc.set_model(model)
    # side by side (one viewbox per layer, one shared camera): registered H&E, generated IHC,
    # real IHC, SSIM, each panel titled with its layer's name
    for layer in viewer.layers:
        layer.name_overlay.visible = True
    viewer.layers.events.inserted.connect(lambda e: setattr(e.value.name_overlay, "visible", True))
    widgets["Compare"].side_radio.setChecked(True)
    # start on a tumour nest at about 1 um/px, where the real IHC shows membranes
    ihc = viewer.layers[IHC_TRUTH]
    sy = ihc.scale[0]
    cy, cx = pair.tumour_centre()
    viewer.scene.camera.center = (cy * sy, cx * sy)
    viewer.scene.camera.zoom = zoom / sy
    if generate:
        vihc.start_following()
    compare = widgets["Compare"]

    def ready() -> bool:
        """The view's virtual IHC is done and the SSIM heatmap shown was read after its last tile."""
        if not generate:
            return True
        return (bool(vihc.jobs_started) and vihc.is_idle() and bool(vihc.written) and not compare._heat.busy
                and compare.heatmap_read_at > vihc.last_tile_at)

    _finish(viewer, widgets.values(), screenshot, wait_s=180, ready=ready)
    return viewer


def launch_view(layers, samples=(), model: str | None = None, screenshot: str | None = None):
    """Open napari with ``layers`` (layer-data tuples from the reader) and ``samples``."""
    import napari

    viewer = napari.Viewer(title="napari-bci")
    viewer.window.resize(1600, 1000)
    for data, attrs, kind in layers:
        getattr(viewer, f"add_{kind}")(data, **attrs)
    for s in samples:
        viewer.open_sample("napari-bci", s)
    widgets = dock_widgets(viewer)
    if model:
        widgets["Virtual IHC"].set_model(model)
    _finish(viewer, widgets.values(), screenshot, wait_s=5)
    return viewer


def launch_real_demo(model: str | None = None, generate: bool = True, screenshot: str | None = None):
    """The real CMU-1-Small-Region H&E slide with the chosen (default: built-in) model following
    the view: on real tissue the built-in model is out of its domain, and the Virtual IHC widget
    says so."""
    import napari

    from .._npe2 import cmu_small

    viewer = napari.Viewer(title="napari-bci: real H&E (CMU-1-Small-Region)")
    viewer.window.resize(1600, 1000)
    for data, attrs, _ in cmu_small():
        viewer.add_image(data, **attrs)
    widgets = dock_widgets(viewer)
    vihc = widgets["Virtual IHC"]
    if model:
        vihc.set_model(model)
    if generate:
        vihc.start_following()

    def ready() -> bool:
        names = [layer.name for layer in viewer.layers]
        return (not generate or any(n.startswith("IHC (generated") for n in names)) and vihc.is_idle()

    _finish(viewer, widgets.values(), screenshot, wait_s=120, ready=ready)
    return viewer
