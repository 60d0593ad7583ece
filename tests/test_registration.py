"""Registration: landmarks, automatic (rotation/flip), deformable, whole slide, quality, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from skimage.io import imread, imsave

from napari_bci.errors import InputError
from napari_bci.registration import (
    fit_landmarks, folded_fraction, map_shapes, mutual_information, ncc, register, register_auto,
    warp_lazy, warp_region,
)
from napari_bci.registration.known_warp import make_known_pair, truth_points
from napari_bci.registration.quality import jacobian_determinant, tre
from napari_bci.transform import Transform


@pytest.fixture(scope="module")
def he_crop(data_dir):
    return imread(data_dir / "he_carcinoma_1000.png")[:512, :512, :3]


def _random_matrix(seed):
    rng = np.random.default_rng(seed)
    m = np.eye(3)
    m[:2, :2] += rng.normal(0, 0.1, (2, 2))
    m[:2, 2] = rng.uniform(-50, 50, 2)
    m[2, :2] = rng.normal(0, 2e-4, 2)
    return m


# --------------------------------------------------------------------------- landmarks
def test_landmarks_recover_projective_and_residuals():
    m = _random_matrix(1)
    rng = np.random.default_rng(0)
    mov = rng.uniform(0, 1000, (8, 2))
    fix = Transform(m).forward(mov)
    fit = fit_landmarks(mov, fix)
    assert np.allclose(fit.transform.matrix, m / m[2, 2], atol=1e-6)
    assert fit.residuals.shape == (8,) and fit.residuals.max() < 1e-6
    # noisy pairs: residuals equal the distances after the fit
    noisy = fix + rng.normal(0, 2, fix.shape)
    fit = fit_landmarks(mov, noisy)
    assert np.allclose(fit.residuals, np.linalg.norm(fit.transform.forward(mov) - noisy, axis=1))
    assert 0.3 < np.median(fit.residuals) < 5


@pytest.mark.parametrize("model", ["rigid", "similarity", "affine"])
def test_landmarks_lower_models(model):
    t = np.radians(30)
    s = 1.0 if model == "rigid" else 1.2
    m = np.array([[s * np.cos(t), -s * np.sin(t), 10], [s * np.sin(t), s * np.cos(t), -5], [0, 0, 1]])
    mov = np.array([[0, 0], [100, 0], [0, 100], [100, 120], [40, 70.0]])
    fit = fit_landmarks(mov, Transform(m).forward(mov), model=model)
    assert fit.residuals.max() < 1e-6


def test_landmarks_ransac_drops_an_outlier():
    m = _random_matrix(2)
    rng = np.random.default_rng(1)
    mov = rng.uniform(0, 1000, (12, 2))
    fix = Transform(m).forward(mov)
    fix[3] += 80
    plain = fit_landmarks(mov, fix)
    robust = fit_landmarks(mov, fix, ransac=True, threshold=3)
    assert not robust.inliers[3] and robust.inliers.sum() == 11
    assert np.delete(robust.residuals, 3).max() < 1e-3 < np.delete(plain.residuals, 3).max()


@pytest.mark.parametrize(
    "mov, fix, words",
    [
        ([[0, 0], [10, 0], [0, 10]], [[0, 0], [10, 0], [0, 10]], "at least 4"),
        ([[0, 0], [10, 0], [0, 10], [0, 10]], [[0, 0], [10, 0], [0, 10], [5, 5]], "same point"),
        ([[0, 0], [10, 10], [20, 20], [30, 30]], [[0, 0], [10, 0], [0, 10], [5, 5]], "collinear"),
        ([[0, 0], [10, 0], [0, 10], [7, 7]], [[0, 0], [10, 0], [0, 10]], "pair by order"),
    ],
)
def test_landmarks_bad_input(mov, fix, words):
    with pytest.raises(InputError, match=words):
        fit_landmarks(mov, fix)


# --------------------------------------------------------------------------- automatic
@pytest.mark.parametrize("angle, flip", [(-137.0, True)])
def test_auto_finds_any_rotation_and_flip(he_crop, angle, flip):
    pair = make_known_pair(he_crop, seed=3, angle=angle, flip=flip, field_amplitude=0)
    res = register_auto(pair.fixed, pair.moving, refine_side=512)
    assert res.flipped == flip
    pm, pf = truth_points(pair.transform, he_crop.shape[:2], pair.fixed.shape[:2], step=24)
    e = np.linalg.norm(res.transform.forward(pm) - pf, axis=1)
    assert np.median(e) < 1.5, np.median(e)


def test_auto_fails_clearly_on_blank_images():
    from napari_bci.registration import RegistrationFailed

    blank = np.full((256, 256, 3), 250, np.uint8)
    with pytest.raises(RegistrationFailed, match=r"the fixed image \(IHC\) shows no tissue") as err:
        register_auto(blank, blank)
    assert (err.value.rule, err.value.image) == ("tissue", "fixed")
    # tissue-free glass is named as the problem before anything is searched for
    with pytest.raises(RegistrationFailed, match=r"the moving image \(H&E\) shows no tissue") as err:
        register_auto(np.full((256, 256, 3), 120, np.uint8), blank)
    assert (err.value.rule, err.value.image) == ("tissue", "moving")


# --------------------------------------------------------------------------- deformable
def test_deformable_on_synthetic_pair_reaches_2px():
    from napari_bci.samples.synthetic import make_pair

    p = make_pair("2+", size=1024, seed=3)
    pm = p.truth.cells["centroid_he"]
    pf = p.truth.transform.forward(pm)
    ok = ((pm > 16) & (pm < 1008)).all(1) & ((pf > 16) & (pf < 1008)).all(1)
    pm, pf = pm[ok], pf[ok]
    assert len(pm) > 100
    res = register(p.ihc, p.he, method="deformable", refine_side=512, deform_side=512)
    before = tre(None, pm, pf)["median"]
    after = tre(res.transform, pm, pf)["median"]
    assert after <= 2.0 < before, (before, after)
    r = res.report
    assert r["ncc_after"] > r["ncc_before"] + 0.2 and r["mi_after"] > r["mi_before"]
    assert r["folded_fraction"] == 0.0
    # the field is kept at low resolution
    assert res.transform.field.shape[0] < 1024 // 2


def test_deformable_on_real_he_with_known_warp(data_dir):
    he = imread(data_dir / "he_skin_10x.tif")[:768, :768, :3]
    pair = make_known_pair(he, seed=7, angle=25, field_amplitude=6)
    pm, pf = truth_points(pair.transform, he.shape[:2], pair.fixed.shape[:2], step=24)
    res = register(pair.fixed, pair.moving, method="deformable", refine_side=512, quality=False)
    init = Transform(res.transform.matrix)  # the automatic (projective) step alone
    e_init = np.median(np.linalg.norm(init.forward(pm) - pf, axis=1))
    e = np.median(np.linalg.norm(res.transform.forward(pm) - pf, axis=1))
    # a 10x pair shares too few cells at 512 px for the cell flow: the structure field is fitted
    # by the automatic step (from an ECC pose 9 px off) and kept by the deformable one; the
    # pseudo-IHC shares the H&E's hematoxylin pixel for pixel but not its total density, the
    # flow's second contrast, which costs the fitted pose about 1 px here (docs/registration.md)
    assert res.report["deformable_follows"] == "tissue structure" and res.report["deformable_kept"]
    assert res.report["structure_polish_px"] > 4
    assert e <= 2.0 and e_init <= 2.5, (e_init, e)


@pytest.mark.slow
def test_whole_slide_in_parts_and_lazy_warp():
    from napari_bci.registration.images import tissue_mask
    from napari_bci.samples.wsi import make_wsi_pair

    w = make_wsi_pair(size=4096, seed=1)
    res = register(w.ihc_levels, w.he_levels, method="deformable", deform_side=1024, part=512, overlap=64,
                   refine_side=512, quality=False)
    assert res.transform.meta["parts"] == 4
    # grid points on tissue (H&E level 3 mask)
    lv = np.asarray(w.he_levels[3])
    ys, xs = np.mgrid[8:lv.shape[0] - 8:8, 8:lv.shape[1] - 8:8]
    keep = tissue_mask(lv)[ys, xs]
    pm = np.stack([xs[keep], ys[keep]], 1) * 8.0 + 3.5
    pf = w.transform.forward(pm)
    inside = ((pf > 64) & (pf < 4096 - 64)).all(1)
    e = np.linalg.norm(res.transform.forward(pm[inside]) - pf[inside], axis=1)
    assert inside.sum() > 200 and np.median(e) <= 4.0, np.median(e)
    # lazy level-0 warp: one output tile, compared with the true fixed image there
    lazy = warp_lazy(w.he_levels[0], res.transform, (4096, 4096), chunk=512)
    assert lazy.shape == (4096, 4096, 3) and lazy.chunksize[:2] == (512, 512)
    tile = np.asarray(lazy[1536:2048, 1536:2048])
    ref = np.asarray(w.ihc_levels[0][1536:2048, 1536:2048])
    from napari_bci.registration.images import od_channel

    assert ncc(od_channel(tile), od_channel(ref)) > 0.6


class _CountingArray:
    """An array that records the regions read from it."""

    def __init__(self, a):
        self.a, self.shape, self.dtype, self.ndim, self.reads = a, a.shape, a.dtype, a.ndim, []

    def __getitem__(self, key):
        self.reads.append(key)
        return self.a[key]


def test_lazy_warp_reads_only_needed_region_and_fills_borders(he_crop):
    t = Transform(np.array([[1, 0, 40.0], [0, 1, -30.0], [0, 0, 1]]))  # shift right 40, up 30
    src = _CountingArray(he_crop)
    lazy = warp_lazy(src, t, (512, 512), chunk=128)
    block = np.asarray(lazy[256:384, 256:384])
    assert np.array_equal(block, he_crop[286:414, 216:344])
    rows, cols = src.reads[-1]
    assert (rows.stop - rows.start) <= 128 + 8 and (cols.stop - cols.start) <= 128 + 8
    # borders the warp leaves empty are filled from tissue (mirror), or white with constant fill
    full = warp_region(he_crop, t, (0, 0), (512, 512))
    white = warp_region(he_crop, t, (0, 0), (512, 512), fill="constant")
    assert (white[:, :40] == 255).all() and (white[-30:] == 255).all()
    assert full[:, :40].std() > 10 and (full[:, :40] < 250).mean() > 0.5
    assert np.array_equal(full[:-31, 41:], white[:-31, 41:])


# --------------------------------------------------------------------------- quality
def test_quality_measures():
    rng = np.random.default_rng(0)
    a = rng.random((64, 64))
    assert ncc(a, a) == pytest.approx(1.0) and ncc(a, -a) == pytest.approx(-1.0)
    assert mutual_information(a, a) > 5 * mutual_information(a, rng.random((64, 64)))
    assert folded_fraction(Transform()) == 0.0
    ys, xs = np.mgrid[0:20, 0:20].astype(np.float32)
    ok = np.zeros((20, 20, 2), np.float32)
    assert np.allclose(jacobian_determinant(Transform(np.eye(3), ok, 4.0)), 1)
    fold = np.stack([-2.5 * xs * 4 * (xs > 10), 0 * ys], -1)  # d(dx)/dx = -2.5 -> det < 0
    assert 0.3 < folded_fraction(Transform(np.eye(3), fold, 4.0)) < 0.7
    r = tre(Transform(np.array([[1, 0, 3.0], [0, 1, 4], [0, 0, 1]])), [[0, 0], [10, 10]], [[3, 4], [13, 14]])
    assert r["median"] == pytest.approx(0) and tre(None, [[0, 0]], [[3, 4]])["median"] == pytest.approx(5)


def test_shapes_and_points_round_trip(tmp_path):
    m = _random_matrix(4)
    t = Transform(m, np.random.default_rng(0).normal(0, 1, (9, 9, 2)).astype(np.float32), 64.0)
    t.save(tmp_path / "t.json")
    t2 = Transform.load(tmp_path / "t.json")
    shapes = [np.array([[10.0, 20], [100, 20], [100, 200]]), np.array([[300.0, 300], [310, 330]])]
    fwd = map_shapes(t2, shapes)
    back = map_shapes(t2, fwd, inverse=True)
    for s, b in zip(shapes, back):
        assert np.allclose(s, b, atol=1e-3)
    assert np.allclose(fwd[0][:, ::-1], t.forward(shapes[0][:, ::-1]))


def test_elastix_engine_if_installed():
    pytest.importorskip("itk")
    from napari_bci.registration.deformable import flow_elastix

    rng = np.random.default_rng(0)
    from scipy import ndimage as ndi

    a = ndi.gaussian_filter(rng.random((256, 256)), 3).astype(np.float32)
    b = np.roll(a, 3, axis=1)  # fixed(p) = b(p + 3 in x)
    v = flow_elastix(a, b, grid_spacing=32)
    assert abs(np.median(v[1][32:-32, 32:-32]) - 3) < 0.5 and abs(np.median(v[0][32:-32, 32:-32])) < 0.5


# --------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def cli_pair(tmp_path_factory, he_crop):
    d = tmp_path_factory.mktemp("reg")
    pair = make_known_pair(he_crop, seed=2, angle=40, field_amplitude=0)
    imsave(d / "ihc.png", pair.fixed)
    imsave(d / "he.png", pair.moving)
    return d, pair


def _write_csv(path, rows, header="moving_x,moving_y,fixed_x,fixed_y"):
    path.write_text(header + "\n" + "\n".join(",".join(f"{v:.4f}" for v in r) for r in rows) + "\n")
    return path


def test_cli_register_default_and_transform(cli_pair, run_cli):
    d, pair = cli_pair
    pm, pf = truth_points(pair.transform, (512, 512), (512, 512), step=64)
    lm = _write_csv(d / "lm.csv", np.c_[pm, pf])
    # the default method (deformable): the landmarks give the start, then a dense field
    code, out, err = run_cli("register", d / "ihc.png", d / "he.png", "--out", d / "T.json",
                             "--landmarks", lm, "--warp-out", d / "warped.png", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["method"] == "deformable" and rep["field_shape"] and (d / "T.npz").exists()
    assert rep["tre_after"]["median"] < 1.5 < rep["tre_before"]["median"]
    assert rep["ncc_after"] > rep["ncc_before"] and rep["folded_fraction"] == 0.0
    warped = imread(d / "warped.png")
    assert warped.shape == pair.fixed.shape and not list(d.glob(".tmp-*"))
    code, out, err = run_cli("transform", d / "T.json", lm, "--json")
    assert code == 0, err
    pts = np.array(json.loads(out)["points"])
    assert np.median(np.linalg.norm(pts - pf, axis=1)) < 1.5
    code, out, err = run_cli("transform", d / "T.json", lm, "--inverse", "--json")
    back = np.array(json.loads(out)["points"])
    assert np.median(np.linalg.norm(back - pm, axis=1)) < 1.5


def test_cli_landmarks_method_and_errors(cli_pair, run_cli, tmp_path):
    d, pair = cli_pair
    pm, pf = truth_points(pair.transform, (512, 512), (512, 512), step=96)
    lm = _write_csv(tmp_path / "lm.csv", np.c_[pm, pf])
    code, out, err = run_cli("register", d / "ihc.png", d / "he.png", "--out", tmp_path / "L.json",
                             "--method", "landmarks", "--landmarks", lm, "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["field_shape"] is None and max(rep["landmark_residuals"]) < 0.05
    assert np.allclose(Transform.load(tmp_path / "L.json").matrix, pair.transform.matrix, atol=1e-3)
    # bad input: exit 2, one line naming the file, and no output file
    code, out, err = run_cli("register", d / "ihc.png", d / "he.png", "--out", tmp_path / "X.json",
                             "--method", "landmarks")
    assert code == 2 and "--landmarks" in err and out == ""
    few = _write_csv(tmp_path / "few.csv", np.c_[pm, pf][:3])
    code, out, err = run_cli("register", d / "ihc.png", d / "he.png", "--out", tmp_path / "X.json",
                             "--method", "landmarks", "--landmarks", few)
    assert code == 2 and "at least 4" in err
    bad = _write_csv(tmp_path / "bad.csv", [[1, 2]], header="x,y")
    code, out, err = run_cli("register", d / "ihc.png", d / "he.png", "--out", tmp_path / "X.json",
                             "--landmarks", bad)
    assert code == 2 and "bad.csv" in err and "moving_x" in err
    code, out, err = run_cli("register", d / "nope.png", d / "he.png", "--out", tmp_path / "X.json")
    assert code == 2 and "nope.png" in err
    assert not (tmp_path / "X.json").exists()
    code, out, err = run_cli("transform", tmp_path / "missing.json", lm)
    assert code == 2 and "missing.json" in err


def test_patch_file_gets_the_same_levels_as_an_array(data_dir, tmp_path):
    """A patch read lazily from a file is registered at the same levels as the same image given as
    an array (the consecutive-section flow works at half resolution on both)."""
    from napari_bci.registration.images import as_pyramid, read_pyramid

    he = imread(data_dir / "he_carcinoma_1000.png")[..., :3]
    imsave(tmp_path / "he.png", he)
    from_file, from_array = read_pyramid(tmp_path / "he.png"), as_pyramid(he)
    assert [lv.shape for lv in from_file.levels] == [lv.shape for lv in from_array.levels]
    assert len(from_file.levels) >= 2 and from_file.downsamples[1] == pytest.approx(2.0, abs=0.01)
    np.testing.assert_array_equal(np.asarray(from_file.levels[1]), from_array.levels[1])


def test_unfold_removes_a_long_deep_fold_and_leaves_the_rest():
    """A field in which the tissue right of a line is pulled 160 px over the tissue left of it
    (20 field samples: deeper than any local smoothing removes in a few passes) comes out with
    no folded sample, and unchanged far from the line."""
    from napari_bci.registration.deformable import unfold
    from napari_bci.registration.quality import folded_fraction, jacobian_determinant
    from napari_bci.transform import Transform

    xs = np.mgrid[0:129, 0:129][1].astype(float)
    u = np.stack([-160.0 * (xs > 64), np.zeros_like(xs)], -1).astype(np.float32)
    folded = Transform(np.eye(3), u, 8.0)
    assert folded_fraction(folded) > 0.01
    out = unfold(Transform(np.eye(3), u.copy(), 8.0))
    assert folded_fraction(out) == 0 and jacobian_determinant(out).min() > 0
    assert np.array_equal(out.field[:, :8], u[:, :8]) and np.array_equal(out.field[:, -8:], u[:, -8:])
