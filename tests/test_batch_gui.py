"""In napari: generate part of a slide in the Virtual IHC widget, then save the generated layer with
the plugin's OME-TIFF writer; the missing tiles are computed and the file equals the CLI's."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from napari_bci.generate.batch import generate_slide, save_generated_layer
from napari_bci.io.writers import write_pyramid

pytestmark = pytest.mark.gui
TILE = 256


def _bytes_without_uuid(path) -> bytes:
    return re.sub(rb"urn:uuid:[0-9a-f-]{36}", b"urn:uuid:" + b"0" * 36, Path(path).read_bytes())


def test_save_generated_layer_from_the_viewer(make_napari_viewer, qtbot, data_dir, tmp_path):
    from napari_bci.io.patches import read_patch
    from napari_bci.widgets.virtual_ihc import THIS_VIEW, VirtualIHCWidget

    canvas = np.full((1024, 1536, 3), 255, np.uint8)
    canvas[12:1012, 400:1400] = np.asarray(read_patch(data_dir / "he_carcinoma_1000.png"))[:1000, :1000, :3]
    slide = tmp_path / "he.ome.tif"
    write_pyramid(slide, canvas, mpp=0.5, tile=TILE, compression="zlib")
    ref = tmp_path / "ref.ome.tif"
    generate_slide(slide, "baseline", ref, tile=TILE, show_progress=False)

    viewer = make_napari_viewer()
    viewer.open(str(slide), plugin="napari-bci")
    w = VirtualIHCWidget(viewer)
    qtbot.addWidget(w)
    w.set_model("baseline")
    w.tile_spin.setValue(TILE)
    w.mode_combo.setCurrentText(THIS_VIEW)
    cam = viewer.scene.camera  # look at the middle of the tissue, a few tiles wide
    cam.zoom = min(viewer.canvas.size) / (400 * 0.5)
    cam.center = (0, 512 * 0.5, 900 * 0.5)
    w.start()
    qtbot.waitUntil(lambda: bool(w.written) and not w.is_running(), timeout=30000)
    layer = w.output_layer
    n_viewer = len(w.written)
    assert 0 < n_viewer < 24

    out = tmp_path / "saved.ome.tif"
    viewer.layers.selection = {layer}
    saved = viewer.layers.save(str(out), selected=True, plugin="napari-bci")
    assert saved == [str(out)]
    rep = save_generated_layer.last_report
    assert rep["reused"] == n_viewer and rep["computed"] == rep["tissue_tiles"] - n_viewer
    assert _bytes_without_uuid(out) == _bytes_without_uuid(ref)
    from napari_bci.io import provenance  # the same record as the CLI's: what made it, from what

    assert provenance.read(out)["model"] == "baseline" and provenance.read(out)["source"] == str(slide)
