"""The embedded default (`napari-bci demo`), headless: the H&E comes registered to the IHC, and
the view opens on a tumour nest where the IHC shows membranes."""

from __future__ import annotations

import numpy as np

from napari_bci import stain
from napari_bci.io.layers import HE, HE_REGISTERED, IHC_TRUTH
from napari_bci.widgets.app import demo_layers


def _ncc(a, b) -> float:
    a, b = a.astype(float).ravel(), b.astype(float).ravel()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def test_demo_registers_the_he_to_the_ihc_and_opens_on_tumour():
    tuples, pair = demo_layers(size=4096, seed=0, her2="2+")
    names = [attrs["name"] for _, attrs, _ in tuples]
    assert names == [HE, HE_REGISTERED, IHC_TRUTH]
    (he, he_attrs, _), (reg, reg_attrs, _), (ihc, _, _) = tuples
    assert he_attrs["visible"] is False and reg_attrs["metadata"]["role"] == "he"
    assert [lv.shape for lv in reg] == [lv.shape for lv in ihc]

    cy, cx = (int(v) for v in pair.tumour_centre())
    y0, x0 = cy - 128, cx - 128
    shown = np.asarray(reg[0][y0:y0 + 256, x0:x0 + 256])
    # the same as warping the scanned H&E by the known transform, as a registration does
    from napari_bci.registration.warp import warp_levels

    warped = np.asarray(warp_levels(he[:1], pair.transform, [ihc[0].shape[:2]], chunk=512)[0][y0:y0 + 256,
                                                                                               x0:x0 + 256])
    raw = np.asarray(he[0][y0:y0 + 256, x0:x0 + 256])
    h = [stain.hematoxylin(a) for a in (shown, warped, raw)]
    assert _ncc(h[0], h[1]) > 0.7  # measured 0.81 (interpolation and JPEG blocks differ)
    assert _ncc(h[0], h[1]) > _ncc(h[2], h[1]) + 0.3  # unregistered, the cells do not line up

    # at the start view the real IHC is a tumour nest with DAB on membranes
    view = np.asarray(ihc[0][y0:y0 + 256, x0:x0 + 256])
    dab = stain.dab(view)
    assert (dab > 0.15).mean() > 0.05  # measured 0.13
    tissue = (view.min(-1) < 220).mean()
    assert tissue > 0.7
