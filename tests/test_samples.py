"""Synthetic paired tissue: determinism, exact warp truth, HER2 membrane pattern per level."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_bci import stain
from napari_bci.samples.synthetic import HER2_LEVELS, make_pair


@pytest.fixture(scope="module")
def pairs():
    """One 384 px pair per HER2 level (same seed)."""
    return {lvl: make_pair(her2=lvl, size=384, seed=5) for lvl in HER2_LEVELS}


def _nuclei(rgb, thr):
    """Centroids (x, y) and areas of isolated hematoxylin blobs (a simple nucleus detector)."""
    h = ndi.gaussian_filter(stain.hematoxylin(rgb), 1.0)
    lab, n = ndi.label(h > thr)
    idx = np.arange(1, n + 1)
    area = ndi.sum(np.ones_like(h), lab, idx)
    cy, cx = np.array(ndi.center_of_mass(np.ones_like(h), lab, idx)).T if n else (np.zeros(0), np.zeros(0))
    return np.stack([cx, cy], 1), area


def test_shapes_types_and_json():
    p = make_pair(her2="1", size=(200, 264), seed=1, mpp=0.46)
    assert p.he.shape == (200, 264, 3) and p.ihc.shape == (200, 264, 3)
    assert p.he.dtype == np.uint8 and p.ihc.dtype == np.uint8
    t = p.truth
    assert t.her2 == "1+" and t.mpp == 0.46
    assert t.tumour_mask.shape == (200, 264) and t.tumour_mask.dtype == bool
    n = len(t.cells["centroid_he"])
    assert n > 10
    for key in ("centroid_he", "centroid_ihc", "tumour", "membrane_class", "completeness", "membrane_od",
                "nucleus_radius"):
        assert len(t.cells[key]) == n, key
    assert t.cells["membrane_class"].dtype == np.int8
    d = json.loads(json.dumps(t.to_json()))
    assert d["her2"] == "1+" and d["mpp"] == 0.46 and d["cells"]["total"] == n
    assert d["transform"]["direction"] == "moving->fixed"
    # the two sections differ (another section, another frame) but show the same kind of tissue
    assert not np.array_equal(p.he, p.ihc)
    with pytest.raises(ValueError):
        make_pair(her2="4+", size=64)


def test_deterministic_per_seed():
    a = make_pair(her2="2+", size=192, seed=11)
    b = make_pair(her2="2+", size=192, seed=11)
    c = make_pair(her2="2+", size=192, seed=12)
    assert a.he.tobytes() == b.he.tobytes() and a.ihc.tobytes() == b.ihc.tobytes()
    np.testing.assert_array_equal(a.truth.transform.matrix, b.truth.transform.matrix)
    assert a.he.tobytes() != c.he.tobytes() and a.ihc.tobytes() != c.ihc.tobytes()
    assert not np.allclose(a.truth.transform.matrix, c.truth.transform.matrix)


def test_truth_transform_maps_detected_he_nuclei_onto_ihc_nuclei(pairs):
    p = pairs["2+"]
    t = p.truth.transform
    he_c, he_a = _nuclei(p.he, 0.35)
    ihc_c, ihc_a = _nuclei(p.ihc, 0.2)
    # nucleus-sized isolated blobs away from the border
    def ok(c, a):
        return (a > 40) & (a < 600) & np.all((c > 20) & (c < 364), axis=1)
    he_c, ihc_c = he_c[ok(he_c, he_a)], ihc_c[ok(ihc_c, ihc_a)]
    assert len(he_c) > 30 and len(ihc_c) > 30
    mapped = t.forward(he_c)
    err = np.sqrt(((mapped[:, None] - ihc_c[None]) ** 2).sum(-1)).min(1)
    err_identity = np.sqrt(((he_c[:, None] - ihc_c[None]) ** 2).sum(-1)).min(1)
    matched = err < 6
    assert matched.mean() > 0.6
    assert np.median(err[matched]) < 1.5
    # without the warp the same blobs do not line up
    assert np.median(err_identity) > 3 * np.median(err[matched])


def test_truth_cell_centroids_match_pixels(pairs):
    """The truth centroids sit on nuclei in both images (H&E frame and IHC frame)."""
    p = pairs["3+"]
    c = p.truth.cells
    both = c["in_he"] & c["in_ihc"] & np.all((c["centroid_he"] > 10) & (c["centroid_he"] < 374), axis=1)
    both &= np.all((c["centroid_ihc"] > 10) & (c["centroid_ihc"] < 374), axis=1)
    he_h = stain.hematoxylin(p.he)
    ihc_h = stain.hematoxylin(p.ihc)
    he_at = ndi.map_coordinates(he_h, c["centroid_he"][both][:, ::-1].T, order=1)
    ihc_at = ndi.map_coordinates(ihc_h, c["centroid_ihc"][both][:, ::-1].T, order=1)
    # nuclei are darker in hematoxylin than the image's typical pixel, in both sections
    assert np.median(he_at) > 2 * np.median(he_h)
    assert np.median(ihc_at) > 2 * np.median(ihc_h)
    # the IHC nuclei are found where the transform puts the H&E nuclei
    fwd = p.truth.transform.forward(c["centroid_he"][both])
    assert np.median(np.linalg.norm(fwd - c["centroid_ihc"][both], axis=1)) < 0.05


def test_warp_aligns_he_onto_ihc(pairs):
    p = pairs["1+"]
    t = p.truth.transform
    warped = t.warp_image(p.he, p.ihc.shape[:2])
    a = stain.hematoxylin(p.ihc)[24:-24, 24:-24].ravel()
    b = stain.hematoxylin(warped)[24:-24, 24:-24].ravel()
    c = stain.hematoxylin(p.he)[24:-24, 24:-24].ravel()
    r_warp = np.corrcoef(a, b)[0, 1]
    r_none = np.corrcoef(a, c)[0, 1]
    assert r_warp > 0.6
    assert r_warp > r_none + 0.2


def test_dab_over_tumour_increases_with_her2_level(pairs):
    means = []
    for lvl in HER2_LEVELS:
        p = pairs[lvl]
        mask = p.truth.transform.warp_image(p.truth.tumour_mask.astype(np.uint8), p.ihc.shape[:2], order=0, cval=0)
        assert mask.sum() > 1000
        means.append(float(stain.dab(p.ihc)[mask > 0].mean()))
    assert all(a < b for a, b in zip(means, means[1:])), means
    assert means[-1] > 3 * means[0]


def test_membrane_truth_follows_asco_cap(pairs):
    def frac(p, cls, complete=None):
        c = p.truth.cells
        t = c["tumour"]
        sel = c["membrane_class"][t] == cls
        if complete is not None:
            sel &= (c["completeness"][t] >= 0.9) == complete
        return sel.mean()

    p0, p1, p2, p3 = (pairs[lvl] for lvl in HER2_LEVELS)
    assert (p0.truth.cells["membrane_class"][p0.truth.cells["tumour"]] > 0).mean() <= 0.10
    assert frac(p0, 1, complete=True) == 0
    assert frac(p1, 1, complete=False) > 0.10 and frac(p1, 2, True) + frac(p1, 3, True) <= 0.10
    assert frac(p2, 2, complete=True) > 0.10 and frac(p2, 3) <= 0.10
    assert frac(p3, 3, complete=True) > 0.5
    od = {lvl: pairs[lvl].truth.cells["membrane_od"] for lvl in HER2_LEVELS}
    cls = {lvl: pairs[lvl].truth.cells["membrane_class"] for lvl in HER2_LEVELS}
    # intense membranes are darker than weak-moderate ones, which are darker than faint ones
    assert od["3+"][cls["3+"] == 3].min() > od["2+"][cls["2+"] == 2].max() > od["1+"][cls["1+"] == 1].max()


def test_he_carries_a_weak_cue_of_the_level(pairs):
    r = {lvl: np.median(pairs[lvl].truth.cells["nucleus_radius"][pairs[lvl].truth.cells["tumour"]])
         for lvl in HER2_LEVELS}
    assert r["0"] < r["3+"]
    # and it shows in the pixels, on average over cases (per case it is imperfect, as in real tissue):
    # more hematoxylin over the tumour at 3+ than at 0
    h = {}
    for lvl in ("0", "3+"):
        ps = [make_pair(her2=lvl, size=192, seed=s) for s in (21, 22, 23)]
        h[lvl] = np.mean([stain.hematoxylin(p.he)[p.truth.tumour_mask].mean() for p in ps])
    assert h["3+"] > h["0"]


def test_looks_like_tissue():
    """Colour statistics in the range of the real H&E in tests/data (not vector art)."""
    p = make_pair(her2="2+", size=256, seed=3)
    od = stain.rgb_to_od(p.he).reshape(-1, 3)
    tissue = od.sum(1) > 0.2
    assert 0.5 < tissue.mean() <= 1.0
    mean = od[tissue].mean(0)
    # real H&E (CMU-1, carcinoma tile): green OD highest, red lowest
    assert mean[1] > mean[2] > mean[0] * 0.8
    # no flat regions: plenty of distinct colours and local texture
    assert len(np.unique(p.he.reshape(-1, 3), axis=0)) > 5000
    assert np.std(np.diff(p.he[..., 1].astype(float), axis=1)) > 3
