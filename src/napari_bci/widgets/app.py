"""Launch napari with napari-bci's layers and widgets (used by ``napari-bci demo/view``)."""

from __future__ import annotations

from typing import Iterable

from ..io.layers import SSIM
from ._layers import levels

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


def demo_layers(size: int = 16384, seed: int = 0, her2: str = "2+") -> list[tuple]:
    """The embedded default data: the synthetic whole-slide H&E / IHC pair as layer tuples."""
    from .._npe2 import wsi_pair

    return wsi_pair(size=size, seed=seed, her2=her2)


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
    her2: str = "2+",
    model: str | None = None,
    generate: bool = True,
    screenshot: str | None = None,
):
    import napari

    viewer = napari.Viewer(title="napari-bci demo")
    viewer.window.resize(1600, 1000)
    for data, attrs, _ in demo_layers(size=size, seed=seed, her2=her2):
        viewer.add_image(data, **attrs)
    widgets = dock_widgets(viewer)
    vihc = widgets["Virtual IHC"]
    if model:
        vihc.set_model(model)
    # side by side (one viewbox per layer, one shared camera): H&E, generated IHC, real IHC, SSIM,
    # each panel titled with its layer's name
    for layer in viewer.layers:
        layer.name_overlay.visible = True
    viewer.layers.events.inserted.connect(lambda e: setattr(e.value.name_overlay, "visible", True))
    widgets["Compare"].side_radio.setChecked(True)
    # start in the tissue at about 1 um/px, where nests and cells are visible
    he = viewer.layers["H&E"]
    h, w = levels(he)[0].shape[:2]
    sy, sx = he.scale[:2]
    viewer.scene.camera.center = (h * sy * 0.5, w * sx * 0.45)
    viewer.scene.camera.zoom = 0.5 / sy
    if generate:
        vihc.start_following()
    def ready() -> bool:  # the view's virtual IHC is done and the SSIM heatmap is there
        names = [layer.name for layer in viewer.layers]
        started = any(n.startswith("IHC (generated") for n in names) or not generate
        return started and vihc.is_idle() and (SSIM in names or not generate)

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
