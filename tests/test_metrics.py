"""Metrics: equality with scikit-image, tolerant-metric behaviour, the evaluate/ssim CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from skimage import data
from skimage.io import imread
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from napari_bci.metrics import compare_pair, psnr, ssim, ssim_map, ssim_mean, tolerant_metrics
from napari_bci.metrics.ssim import window


@pytest.fixture(scope="module")
def he(data_dir):
    return np.ascontiguousarray(imread(data_dir / "he_carcinoma_1000.png")[:384, :448, :3])


def _perturbed(img, seed=0, noise=18, shift=2):
    rng = np.random.default_rng(seed)
    out = np.clip(img.astype(np.int16) + rng.normal(0, noise, img.shape), 0, 255).astype(np.uint8)
    return np.roll(out, shift, axis=1)


def _pairs(he):
    ihc = data.immunohistochemistry()[:300, :320]
    rng = np.random.default_rng(1)
    synth_a = rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)
    synth_b = np.clip(synth_a.astype(int) // 2 + 60, 0, 255).astype(np.uint8)
    return {
        "real H&E": (he, _perturbed(he)),
        "real IHC": (ihc, _perturbed(ihc, 2, 30, 5)),
        "synthetic odd size": (synth_a, synth_b),
    }


@pytest.mark.parametrize("name", ["real H&E", "real IHC", "synthetic odd size"])
def test_bci_psnr_ssim_equal_skimage(he, name):
    a, b = _pairs(he)[name]
    # BCI's evaluate.py: peak_signal_noise_ratio(fake, real) and SSIM on colour uint8 (7x7).
    assert psnr(a, b) == pytest.approx(peak_signal_noise_ratio(b, a, data_range=255), abs=1e-12)
    ref = structural_similarity(a, b, channel_axis=-1, data_range=255)
    assert ssim(a, b, fast=False) == pytest.approx(ref, abs=1e-12)
    assert ssim(a, b) == pytest.approx(ref, abs=1e-6)


def test_psnr_identical_is_inf(he):
    assert psnr(he, he) == float("inf")


@pytest.mark.parametrize("kind", ["uniform", "gaussian"])
def test_local_ssim_map_equals_skimage(he, kind):
    a, b = _pairs(he)["real H&E"]
    kw = {} if kind == "uniform" else dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    mean, full = structural_similarity(a, b, channel_axis=-1, data_range=255, full=True, **kw)
    ours = ssim_map(a, b, kind=kind, reduce_channels=False)
    assert ours.shape == full.shape and ours.dtype == np.float32
    r = window(kind).pad
    assert window(kind).size == (7 if kind == "uniform" else 11)
    inner = (slice(r, -r), slice(r, -r))
    assert np.abs(ours[inner] - full[inner]).max() < 1e-4
    # skimage's border handling (ndimage "reflect") is reproduced too.
    assert np.abs(ours - full).max() < 1e-4
    assert ssim_mean(ours.mean(-1), kind) == pytest.approx(mean, abs=1e-6)


def test_local_ssim_map_grey_and_errors(he):
    g1 = he[..., 0].copy()
    g2 = _perturbed(he)[..., 0].copy()
    ref = structural_similarity(g1, g2, data_range=255, full=True)[1]
    assert np.abs(ssim_map(g1, g2) - ref).max() < 1e-4
    # float images in [0, 1] (the non-integer path), as skimage with data_range=1
    f1, f2 = he[:200, :240] / 255.0, _perturbed(he)[:200, :240] / 255.0
    ref = structural_similarity(f1, f2, channel_axis=-1, data_range=1.0, full=True)[1]
    assert np.abs(ssim_map(f1, f2, data_range=1.0, reduce_channels=False) - ref).max() < 1e-4
    with pytest.raises(ValueError, match="shape"):
        ssim_map(he, he[:100])
    with pytest.raises(ValueError, match="data_range"):
        ssim_map(he.astype(np.float32), he.astype(np.float32))
    with pytest.raises(ValueError, match="window"):
        ssim_map(he[:5, :5], he[:5, :5])


def _remove_dab(ihc):
    """The same section without DAB: colour deconvolution, DAB set to zero, re-rendered."""
    from napari_bci.stain import HED_MATRIX, render, separate

    conc = np.maximum(separate(ihc, HED_MATRIX), 0)
    full = render(conc, HED_MATRIX)
    conc[..., 2] = 0
    return render(conc, HED_MATRIX), full


@pytest.mark.parametrize("shift", [4, 8])
def test_tolerant_metrics_stable_under_shift_of_real_ihc(shift):
    ihc = data.immunohistochemistry()  # real DAB-stained section, 512x512
    moved = np.roll(ihc, (shift, shift // 2), axis=(0, 1))
    assert ssim(moved, ihc) < 0.4  # pixel metrics collapse ...
    assert psnr(moved, ihc) < 22
    t = tolerant_metrics(moved, ihc, mpp=0.5)
    assert t["dab_corr"] > 0.95  # ... the cell-scale DAB map does not
    assert t["dab_mae"] < 0.15 * t["dab_gt"]
    assert abs(t["dab_bias"]) < 0.02 * t["dab_gt"]
    assert t["delta_e"] < 3.0  # about one just-noticeable colour difference


def test_tolerant_metrics_separate_dab_levels_on_real_ihc():
    ihc = data.immunohistochemistry()
    no_dab, with_dab = _remove_dab(ihc)
    shifted = np.roll(with_dab, 6, axis=0)
    # SSIM prefers the aligned but DAB-free image over the shifted, correctly stained one.
    assert ssim(no_dab, with_dab) > ssim(shifted, with_dab)
    good = tolerant_metrics(shifted, with_dab)
    bad = tolerant_metrics(no_dab, with_dab)
    assert good["dab_mae"] * 5 < bad["dab_mae"]
    assert bad["dab_bias"] < -0.5 * bad["dab_gt"]
    assert good["delta_e"] * 3 < bad["delta_e"]


@pytest.fixture(scope="module")
def synthetic_pairs():
    from napari_bci.samples.synthetic import make_pair

    return {lv: make_pair(her2=lv, size=512, seed=11).ihc for lv in ("0", "3+")}


def test_tolerant_metrics_separate_3plus_from_0_where_ssim_does_not(synthetic_pairs):
    gt = synthetic_pairs["3+"]
    right_level = np.roll(gt, (5, 7), axis=(0, 1))  # a 3+ prediction, 5-7 px off
    wrong_level = synthetic_pairs["0"]  # a 0 prediction
    s_right, s_wrong = ssim(right_level, gt), ssim(wrong_level, gt)
    assert s_right < s_wrong + 0.05  # SSIM does not prefer the right HER2 level
    right = compare_pair(right_level, gt, mpp=0.5)
    wrong = compare_pair(wrong_level, gt, mpp=0.5)
    assert right["dab_mae"] * 4 < wrong["dab_mae"]
    assert right["dab_corr"] > 0.9 > wrong["dab_corr"] + 0.3
    assert wrong["dab_bias"] < -0.5 * wrong["dab_gt"]
    assert right["delta_e"] * 2 < wrong["delta_e"]
    # and the stain level itself: a 3+ section carries far more DAB than a 0 section
    assert wrong["dab_pred"] * 3 < right["dab_pred"]


def test_compare_pair_with_mask(he):
    a, b = _pairs(he)["real H&E"]
    mask = np.zeros(a.shape[:2], bool)
    mask[50:200, 60:300] = True
    m, smap = compare_pair(a, b, mask=mask, return_map=True)
    assert m["ssim_local"] == pytest.approx(float(smap[mask].mean()), abs=1e-6)
    sub = compare_pair(a[50:200, 60:300], b[50:200, 60:300])
    assert m["dab_pred"] == pytest.approx(sub["dab_pred"], rel=0.05)
    with pytest.raises(ValueError, match="mask"):
        compare_pair(a, b, mask=mask[:10])


# ---------------------------------------------------------------- CLI


def _write_folder(tmp_path, pairs):
    from imageio.v3 import imwrite

    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    for name, (p, g) in pairs.items():
        imwrite(pred / name, p)
        imwrite(gt / name, g)
    return pred, gt


@pytest.fixture
def bci_folder(tmp_path, he):
    ihc = data.immunohistochemistry()[:128, :160]
    no_dab, full = _remove_dab(ihc)
    h = he[:128, :160]
    pairs = {
        "00001_test_0.png": (_perturbed(h, 1), h),
        "00002_test_0.png": (_perturbed(h, 2, 5, 1), h),
        "00003_test_3+.png": (np.roll(full, 4, 0), full),
        "00004_train_3+.png": (no_dab, full),
        "00005_test_2+.png": (_perturbed(full, 3), full),
    }
    return _write_folder(tmp_path, pairs), pairs


def test_evaluate_cli_json_and_per_level(run_cli, bci_folder, tmp_path):
    (pred, gt), pairs = bci_folder
    csv_path = tmp_path / "rows.csv"
    code, out, err = run_cli("evaluate", "--pred", pred, "--gt", gt, "--json", "--csv", csv_path)
    assert code == 0, err
    rep = json.loads(out)
    assert rep["n"] == 5
    ps = [peak_signal_noise_ratio(g, p, data_range=255) for p, g in pairs.values()]
    ss = [structural_similarity(p, g, channel_axis=-1, data_range=255) for p, g in pairs.values()]
    assert rep["psnr"] == pytest.approx(sum(ps) / len(ps), abs=1e-9)
    assert rep["ssim"] == pytest.approx(sum(ss) / len(ss), abs=1e-6)
    assert rep["psnr_std"] == pytest.approx(np.std(ps), abs=1e-9)
    for key in ("dab_mae", "dab_corr", "delta_e", "delta_e_std"):
        assert isinstance(rep[key], float)
    assert list(rep["per_level"]) == ["0", "2+", "3+"]
    assert [rep["per_level"][k]["n"] for k in ("0", "2+", "3+")] == [2, 1, 2]
    assert rep["per_level"]["0"]["psnr"] == pytest.approx((ps[0] + ps[1]) / 2, abs=1e-9)
    assert rep["per_level"]["3+"]["ssim"] == pytest.approx((ss[2] + ss[3]) / 2, abs=1e-6)
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("name,her2,psnr,ssim")
    assert len(lines) == 6 and lines[3].startswith("00003_test_3+.png,3+,")


def test_evaluate_cli_bci_only_human(run_cli, bci_folder):
    (pred, gt), _ = bci_folder
    code, out, err = run_cli("evaluate", "--pred", pred, "--gt", gt, "--bci-only")
    assert code == 0, err
    assert "psnr:" in out and "per_level:" in out and "dab_mae" not in out


def test_evaluate_cli_errors(run_cli, bci_folder, tmp_path):
    (pred, gt), _ = bci_folder
    code, out, err = run_cli("evaluate", "--pred", tmp_path / "nope", "--gt", gt, "--json")
    assert code == 2 and out == "" and "nope: no such directory" in err
    (pred / "00009_test_1+.png").write_bytes((gt / "00001_test_0.png").read_bytes())
    code, out, err = run_cli("evaluate", "--pred", pred, "--gt", gt, "--json")
    assert code == 2 and "00009_test_1+.png" in err and "without ground truth" in err
    (pred / "00009_test_1+.png").unlink()
    kept = (pred / "00001_test_0.png").read_bytes()
    (pred / "00001_test_0.png").unlink()
    code, out, err = run_cli("evaluate", "--pred", pred, "--gt", gt, "--json")
    assert code == 2 and "without a prediction" in err and "00001_test_0.png" in err
    (pred / "00001_test_0.png").write_bytes(kept)
    from imageio.v3 import imwrite

    imwrite(gt / "00001_test_0.png", np.zeros((64, 64, 3), np.uint8))
    code, out, err = run_cli("evaluate", "--pred", pred, "--gt", gt, "--json")
    assert code == 2 and "00001_test_0.png" in err and "differs" in err
    (gt / "00001_test_0.png").write_bytes(b"not a png")
    code, out, err = run_cli("evaluate", "--pred", pred, "--gt", gt, "--json")
    assert code == 2 and "00001_test_0.png" in err
    assert len(err.strip().splitlines()) == 1


def test_evaluate_matches_png_predictions_to_jpeg_truth(run_cli, bci_folder, tmp_path):
    """``generate`` writes PNG; a dataset's truth may be JPEG (MIST): the stems pair them. Two
    files of one stem in a folder fall back to whole names (and so to a clear error)."""
    from imageio.v3 import imread, imwrite

    (pred, gt), _ = bci_folder
    jpg = tmp_path / "gt_jpg"
    jpg.mkdir()
    for p in gt.iterdir():
        imwrite(jpg / (p.stem + ".jpg"), imread(p), quality=95)
    code, out, err = run_cli("evaluate", "--pred", pred, "--gt", jpg, "--json", "--csv", tmp_path / "r.csv")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["n"] == 5 and [rep["per_level"][k]["n"] for k in ("0", "2+", "3+")] == [2, 1, 2]
    assert (tmp_path / "r.csv").read_text().splitlines()[1].startswith("00001_test_0.png,0,")
    from napari_bci.metrics.evaluate import match_folders

    rows = {n: b for n, _, b in match_folders(pred, jpg)}
    assert rows["00005_test_2+.png"].name == "00005_test_2+.jpg"
    (jpg / "00005_test_2+.png").write_bytes((gt / "00005_test_2+.png").read_bytes())
    code, out, err = run_cli("evaluate", "--pred", pred, "--gt", jpg, "--json")
    assert code == 2 and "without ground truth" in err and "00001_test_0.png" in err


def test_ssim_cli_writes_float32_map(run_cli, tmp_path, he):
    from imageio.v3 import imwrite

    a, b = he, _perturbed(he)
    imwrite(tmp_path / "a.png", a)
    imwrite(tmp_path / "b.png", b)
    out = tmp_path / "map.tif"
    code, stdout, err = run_cli("ssim", tmp_path / "a.png", tmp_path / "b.png", "--out", out, "--json")
    assert code == 0, err
    rep = json.loads(stdout)
    ref_mean, ref = structural_similarity(a, b, channel_axis=-1, data_range=255, full=True)
    assert rep["mean"] == pytest.approx(ref_mean, abs=1e-6)
    m = tifffile.imread(out)
    assert m.dtype == np.float32 and m.shape == a.shape[:2]
    assert np.abs(m - ref.mean(-1)).max() < 1e-4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    code, stdout, err = run_cli("ssim", tmp_path / "a.png", tmp_path / "b.png", "--out", out, "--window", "gaussian", "--json")
    assert code == 0
    g_mean = structural_similarity(a, b, channel_axis=-1, data_range=255, gaussian_weights=True, sigma=1.5,
                                   use_sample_covariance=False)
    assert json.loads(stdout)["mean"] == pytest.approx(g_mean, abs=1e-6)


def test_ssim_cli_errors(run_cli, tmp_path, he):
    from imageio.v3 import imwrite

    imwrite(tmp_path / "a.png", he)
    imwrite(tmp_path / "small.png", he[:100, :100])
    code, out, err = run_cli("ssim", tmp_path / "a.png", tmp_path / "small.png", "--out", tmp_path / "m.tif", "--json")
    assert code == 2 and out == "" and "small.png" in err and "differs" in err
    assert not (tmp_path / "m.tif").exists()
    code, out, err = run_cli("ssim", tmp_path / "a.png", tmp_path / "missing.png", "--out", tmp_path / "m.tif")
    assert code == 2 and "missing.png" in err
    code, out, err = run_cli("ssim", tmp_path / "a.png", tmp_path / "a.png", "--out", tmp_path / "no" / "m.tif")
    assert code == 2 and "does not exist" in err


@pytest.mark.parametrize("kind", ["uniform", "gaussian"])
def test_filter_paths_agree(kind):
    """The shift-add filter (used off-CPU, where cuDNN might use TF32) equals the convolution."""
    import importlib

    import torch

    S = importlib.import_module("napari_bci.metrics.ssim")
    st = torch.randint(0, 65026, (15, 40, 53)).float()
    taps = np.ones(7) if kind == "uniform" else window("gaussian").taps
    conv = S._filter(st, taps, conv=True)
    shift = S._filter(st, taps, conv=False)
    assert conv.shape == shift.shape == (1, 15, 40 - len(taps) + 1, 53 - len(taps) + 1)
    if kind == "uniform":  # integer sums below 2**24: both exact
        assert torch.equal(conv, shift)
    else:
        assert (conv - shift).abs().max() < 1e-2  # float32 rounding of values up to 65025


@pytest.mark.parametrize("kind", ["uniform", "gaussian"])
def test_ssim_bands_equal_the_whole_map(he, kind):
    """Band by band and piece by piece (any size, short last ones included) equals the whole map."""
    from napari_bci.metrics.ssim import ssim_map_bands

    a, b = he[:203, :150], _perturbed(he)[:203, :150]
    full = ssim_map(a, b, kind=kind)
    for rows, cols in ((window(kind).size, 150), (64, 40), (100, 149), (203, window(kind).size)):
        parts = list(ssim_map_bands(lambda y0, y1, x0, x1: a[y0:y1, x0:x1], lambda y0, y1, x0, x1: b[y0:y1, x0:x1],
                                    a.shape[:2], kind=kind, band_rows=rows, band_cols=cols))
        assert [y0 for y0, _ in parts] == list(range(0, 203, rows))
        # exact for the integer box window; the Gaussian's float32 centring is per band
        assert np.abs(np.concatenate([m for _, m in parts]) - full).max() < (0 if kind == "uniform" else 1e-4) + 1e-9


def test_ssim_file_of_a_large_strip_tiff_is_tiled_and_exact(tmp_path, he):
    """A one-strip TIFF above 2048 px is read in bands and the map written tiled; map and mean
    equal the in-memory computation."""
    from napari_bci.metrics.ssim import ssim_map_file

    a = np.tile(he, (8, 8, 1))[:2600, :2100]
    b = np.tile(_perturbed(he), (8, 8, 1))[:2600, :2100]
    assert a.shape == (2600, 2100, 3)
    tifffile.imwrite(tmp_path / "a.tif", a, photometric="rgb")  # one strip
    tifffile.imwrite(tmp_path / "b.tif", b, photometric="rgb", tile=(256, 256))
    rep = ssim_map_file(tmp_path / "a.tif", tmp_path / "b.tif", tmp_path / "m.tif", band_rows=512)
    full = ssim_map(a, b)
    with tifffile.TiffFile(tmp_path / "m.tif") as tf:
        assert tf.pages[0].is_tiled and tf.pages[0].shape == (2600, 2100)
        m = tf.asarray()
    assert np.abs(m - full).max() < 1e-6
    assert rep["mean"] == pytest.approx(ssim_mean(full), abs=1e-9)
    assert rep["shape"] == [2600, 2100]


def test_ssim_file_stops_cleanly_on_a_corrupt_tile(tmp_path, he):
    """A tile that does not decode half-way through: an error naming the file, no output left."""
    from napari_bci.errors import InputError
    from napari_bci.metrics.ssim import ssim_map_file

    a = np.tile(he[:512, :512], (6, 6, 1))
    tifffile.imwrite(tmp_path / "a.tif", a, photometric="rgb", tile=(256, 256), compression="zlib")
    raw = bytearray((tmp_path / "a.tif").read_bytes())
    with tifffile.TiffFile(tmp_path / "a.tif") as tf:
        page = tf.pages[0]
        off, n = page.dataoffsets[len(page.dataoffsets) * 3 // 4], page.databytecounts[len(page.dataoffsets) * 3 // 4]
    raw[off:off + n] = b"\x00" * n
    (tmp_path / "bad.tif").write_bytes(bytes(raw))
    out = tmp_path / "m.tif"
    with pytest.raises(InputError, match="bad.tif"):
        ssim_map_file(tmp_path / "a.tif", tmp_path / "bad.tif", out, band_rows=256)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif", "bad.tif"]
