"""Layer helpers shared by the widgets."""

from __future__ import annotations


def rgb_layers(viewer) -> list:
    """The viewer's RGB image layers, in layer-list order."""
    from napari.layers import Image

    return [ly for ly in viewer.layers if isinstance(ly, Image) and ly.rgb]


def levels(layer) -> list:
    """An image layer's pyramid levels (level 0 first; one level for a plain image)."""
    return list(layer.data) if layer.multiscale else [layer.data]
