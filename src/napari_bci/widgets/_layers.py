"""Layer helpers shared by the widgets."""

from __future__ import annotations


def update_layer(layer, **attrs) -> None:
    """Set only the attributes that change (``scale``/``translate`` compared on the last two axes):
    napari refreshes a layer, its overlays and every layer's transform on each such assignment,
    changed or not, which costs tens of ms per setter on a busy canvas."""
    import numpy as np

    for name, value in attrs.items():
        old = getattr(layer, name)
        if name in ("scale", "translate"):
            if np.allclose(np.asarray(old, float)[-2:], np.asarray(value, float)[-2:]):
                continue
        elif old == value:
            continue
        setattr(layer, name, value)


def rgb_layers(viewer) -> list:
    """The viewer's RGB image layers, in layer-list order."""
    from napari.layers import Image

    return [ly for ly in viewer.layers if isinstance(ly, Image) and ly.rgb]


def levels(layer) -> list:
    """An image layer's pyramid levels (level 0 first; one level for a plain image)."""
    return list(layer.data) if layer.multiscale else [layer.data]


def layer_geom(layer):
    """What the workers need from an image layer (:class:`~napari_bci.metrics.compare.LayerGeom`),
    captured on the main thread."""
    from ..metrics.compare import LayerGeom

    if layer.multiscale:
        ds = [tuple(float(v) for v in f[-2:]) for f in layer.downsample_factors]
    else:
        ds = [(1.0, 1.0)]
    meta = layer.metadata or {}
    mpp = meta.get("mpp")
    return LayerGeom(name=layer.name, levels=levels(layer), scale=tuple(float(v) for v in layer.scale[-2:]),
                     translate=tuple(float(v) for v in layer.translate[-2:]), downsamples=ds,
                     mpp=float(mpp) if mpp else None, her2=meta.get("her2"))


def visible_box(viewer) -> tuple[float, float, float, float]:
    """World box ``(y0, y1, x0, x1)`` the camera shows in one view: one panel's, not the whole
    canvas's, when napari shows the layers side by side (grid mode)."""
    from ..pyramid import view_box

    cam = viewer.scene.camera
    return view_box(cam.center, cam.zoom, viewer.canvas.viewbox_size(viewer.layers))


def view_window(viewer, geom, max_side: int):
    """``(window, world box)`` of the region the camera shows, on ``geom``'s grid at the level
    napari displays (the coarsest whose pixels are no bigger than a screen pixel), coarser
    still when a side would exceed ``max_side``."""
    from ..metrics.compare import fit_window

    cam = viewer.scene.camera
    box = visible_box(viewer)
    screen_px_world = 1.0 / cam.zoom
    start = 0
    for i in range(len(geom.levels)):
        if geom.pixel_world_size(i) <= screen_px_world * 1.0001:
            start = i
    return fit_window(geom, box, start=start, max_side=max_side), box
