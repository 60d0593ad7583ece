"""Synthetic whole-slide pair: lazy, seamless tiles, levels rendered directly but consistent."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_bci import stain
from napari_bci.samples import wsi as wsi_mod
from napari_bci.samples.wsi import make_wsi_pair


@pytest.fixture(scope="module")
def slide():
    return make_wsi_pair(size=4096, seed=3, her2="3+", tile=256)


def _gray(a):
    return a.astype(np.float32).mean(-1)


def test_pyramid_shapes_chunks_and_metadata(slide):
    shapes = [a.shape for a in slide.he_levels]
    assert shapes[0] == (4096, 4096, 3)
    for a, b in zip(shapes, shapes[1:]):
        assert b[0] == -(-a[0] // 2) and b[1] == -(-a[1] // 2)
    assert max(shapes[-1][:2]) <= 256
    assert [a.shape for a in slide.ihc_levels] == shapes
    for a in slide.he_levels + slide.ihc_levels:
        assert a.dtype == np.uint8 and a.chunksize[:2] == (min(256, a.shape[0]), min(256, a.shape[1]))
    assert slide.mpp == 0.5 and slide.her2 == "3+"
    assert slide.transform.field is not None


def test_building_computes_nothing_and_a_slice_renders_only_its_tiles(monkeypatch):
    calls = []
    real = wsi_mod.render_window

    def spy(*args, **kwargs):
        calls.append(args[4:8])
        return real(*args, **kwargs)

    monkeypatch.setattr(wsi_mod, "render_window", spy)
    w = make_wsi_pair(size=32768, seed=1, tile=512)  # 32k x 32k: would be 3 GiB per section if materialised
    assert w.he_levels[0].shape[:2] == (32768, 32768)
    assert calls == []
    tile = np.asarray(w.he_levels[0][10240:10240 + 300, 20480:20480 + 300])
    assert tile.shape == (300, 300, 3)
    assert len(calls) == 1  # one 512 tile rendered, nothing else
    np.asarray(w.ihc_levels[-1])
    assert len(calls) == 2  # the thumbnail is one tile of its own level


def test_tiles_are_seamless(slide):
    """A window across four tiles, assembled from dask chunks, equals one direct render."""
    for section, levels in (("he", slide.he_levels), ("ihc", slide.ihc_levels)):
        for k in (0, 1):
            y = x = (levels[k].shape[0] // 2) // 256 * 256 - 128
            tiles = np.asarray(levels[k][y:y + 256, x:x + 256]).astype(int)
            whole = slide.render(section, k, y, x, 256, 256).astype(int)
            diff = np.abs(tiles - whole)
            assert (diff > 3).mean() < 0.002, (section, k)
            # no step at the tile borders (row/column 128 of the window)
            g = np.abs(np.diff(_gray(tiles), axis=1))
            assert g[:, 127].mean() < 2.5 * g.mean() + 1


def test_coarse_levels_resemble_downsampled_fine_levels(slide):
    """Levels are rendered independently but show the same tissue (loosely)."""
    he = slide.he_levels
    y0, x0, n = 1024, 1024, 2048  # a level-0 region with tissue
    fine = np.asarray(he[1][y0 // 2:(y0 + n) // 2, x0 // 2:(x0 + n) // 2]).astype(np.float32)
    for k in (2, 3, 4):
        f = 2 ** (k - 1)
        coarse = np.asarray(he[k][y0 // 2**k:(y0 + n) // 2**k, x0 // 2**k:(x0 + n) // 2**k]).astype(np.float32)
        down = fine.reshape(coarse.shape[0], f, coarse.shape[1], f, 3).mean((1, 3))
        a = ndi.gaussian_filter(_gray(down), 4)
        b = ndi.gaussian_filter(_gray(coarse), 4)
        assert abs(a.mean() - b.mean()) < 20, k
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.6, k


def test_slide_has_background_and_heterogeneity(slide):
    thumb = np.asarray(slide.he_levels[-1])
    od = stain.rgb_to_od(thumb).sum(-1)
    background = od < 0.15
    assert 0.25 < background.mean() < 0.85  # plenty of glass, plenty of tissue
    tissue_rgb = thumb[~background].astype(float)
    assert tissue_rgb.std(0).mean() > 8  # not one uniform colour


def test_ihc_tiles_follow_the_transform(slide):
    """Level-0 IHC nuclei sit where the transform puts the H&E nuclei (away from the centre,
    where the offset between the sections is largest)."""
    t = slide.transform
    n = 256
    best = None
    for y, x in ((768, 768), (768, 3072), (3072, 768), (3072, 3072), (1024, 2048), (2048, 1024), (3072, 2048)):
        ihc = np.asarray(slide.ihc_levels[0][y:y + n, x:x + n])
        score = stain.hematoxylin(ihc).std()
        if best is None or score > best[0]:
            best = (score, y, x, ihc)
    _, y, x, ihc = best
    # the H&E region that maps there (with a margin), warped through the truth
    corners = t.backward(np.array([[x, y], [x + n, y], [x, y + n], [x + n, y + n]], float))
    hx0, hy0 = np.floor(corners.min(0)).astype(int) - 16
    hx1, hy1 = np.ceil(corners.max(0)).astype(int) + 16
    he = slide.render("he", 0, hy0, hx0, hy1 - hy0, hx1 - hx0)
    grid = t.backward_grid(y, x, n, n)
    warped = np.stack([ndi.map_coordinates(he[..., c].astype(np.float32),
                                           [grid[..., 1] - hy0, grid[..., 0] - hx0], order=1)
                       for c in range(3)], -1).clip(0, 255).astype(np.uint8)
    a = stain.hematoxylin(ihc).ravel()
    b = stain.hematoxylin(warped).ravel()
    c = stain.hematoxylin(slide.render("he", 0, y, x, n, n)).ravel()
    r_warp, r_none = np.corrcoef(a, b)[0, 1], np.corrcoef(a, c)[0, 1]
    assert r_warp > 0.5, (r_warp, r_none)
    assert r_warp > r_none + 0.15, (r_warp, r_none)
