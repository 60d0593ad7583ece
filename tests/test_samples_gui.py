"""The sample-data menu in a real napari window (Xvfb + Mesa GL)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui


def _coloured_fraction(shot: np.ndarray) -> float:
    rgb = shot[..., :3].astype(float)
    return float(((rgb.max(-1) > 80) & (rgb.max(-1) - rgb.min(-1) > 25)).mean())


def test_wsi_pair_and_cmu_open_from_the_sample_menu(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-bci", "wsi-pair")
    he, ihc = viewer.layers["H&E"], viewer.layers["IHC (ground truth)"]
    assert he.multiscale and len(he.data) >= 6 and he.data[0].shape[:2] == (16384, 16384)
    assert he.metadata["role"] == "he" and ihc.metadata["role"] == "ihc"
    assert he.metadata["format"] == "synthetic" and ihc.metadata["her2"] == "2+"
    assert tuple(he.scale) == (0.5, 0.5)
    ihc.visible = False
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert 0.05 < _coloured_fraction(shot) < 0.9  # tissue on white glass

    viewer.layers.clear()
    viewer.open_sample("napari-bci", "cmu-small")
    [layer] = viewer.layers
    assert layer.name == "H&E" and abs(layer.metadata["mpp"] - 0.499) < 0.01
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert _coloured_fraction(shot) > 0.03
