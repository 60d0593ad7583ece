"""The real plugin in a real window (Xvfb + Mesa GL): screenshots whose content is checked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from skimage import color

pytestmark = pytest.mark.gui


def _tissue_fraction(rgb: np.ndarray) -> float:
    """Fraction of pixels that look like stained tissue: not the dark canvas, not white glass,
    clearly coloured (hue away from grey)."""
    rgb = np.asarray(rgb)[..., :3]
    v = rgb.max(-1).astype(float)
    s = color.rgb2hsv(rgb)[..., 1]
    return float(((v > 80) & (v < 250) & (s > 0.12)).mean())


def test_sample_pair_renders_tissue_in_a_window(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-bci", "bci-2+")
    assert [layer.name for layer in viewer.layers] == ["H&E", "IHC (ground truth)"]
    viewer.layers["IHC (ground truth)"].visible = False
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot.shape[-1] == 4 and shot.shape[0] > 100
    assert _tissue_fraction(shot) > 0.3, "the canvas does not show H&E tissue"
    # H&E: pink/purple hues dominate the tissue pixels
    hsv = color.rgb2hsv(shot[..., :3])
    tissue = (hsv[..., 1] > 0.12) & (shot[..., :3].max(-1) > 80)
    hue = hsv[..., 0][tissue]
    assert np.mean((hue > 0.65) | (hue < 0.05)) > 0.6

    viewer.layers["H&E"].visible = False
    viewer.layers["IHC (ground truth)"].visible = True
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert _tissue_fraction(shot) > 0.1, "the canvas does not show IHC tissue"


@pytest.mark.slow
def test_demo_command_screenshot(tmp_path):
    """`napari-bci demo` opens the synthetic slide pair with all widgets docked, in its own
    process and window; its screenshot shows tissue and the docked widgets."""
    out = tmp_path / "demo.png"
    exe = Path(sys.executable).with_name("napari-bci")
    env = dict(os.environ)
    res = subprocess.run(
        [str(exe), "demo", "--size", "4096", "--screenshot", str(out)],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    from skimage import io

    shot = io.imread(out)
    assert shot.shape[0] >= 600 and shot.shape[1] >= 1000
    assert _tissue_fraction(shot) > 0.15
