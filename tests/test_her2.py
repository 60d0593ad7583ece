"""HER2 scorer: stain separation, cell detection, ASCO/CAP accuracy on held-out synthetic truth,
the real IHC image of scikit-image, tile maps, regions, the learned-level helpers and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.spatial import cKDTree

from napari_bci.her2 import LEVELS, HER2Result, score, score_map, score_polygon
from napari_bci.her2.stains import macenko_vectors, separate_hdab
from napari_bci.stain import DAB, HEMATOXYLIN, render, stain_matrix

synthetic = pytest.importorskip("napari_bci.samples.synthetic")

#: Seeds never used for calibration (thresholds were tuned on seeds 0-2, see docs/her2.md).
HELD_OUT = (31, 32)
#: Image size: 640 px holds the 100 tumour cells a level needs (some 512 px images hold 99) and
#: keeps the module within its time budget (docs/her2.md has the 1024 px benchmark run).
SIZE = 640


@pytest.fixture(scope="module")
def pairs():
    return {(lv, s): synthetic.make_pair(her2=lv, size=SIZE, seed=s) for lv in LEVELS for s in HELD_OUT}


@pytest.fixture(scope="module")
def scored(pairs):
    return {k: score(p.ihc, mpp=p.truth.mpp) for k, p in pairs.items()}


@pytest.fixture(scope="module")
def real_ihc():
    from skimage.data import immunohistochemistry

    return immunohistochemistry()


def test_estimated_stain_vectors_keep_the_level(pairs):
    for lv in ("0", "3+"):
        p = pairs[(lv, HELD_OUT[1])]
        assert score(p.ihc, 0.5, estimate_stains=True).her2 == lv


def test_level_accuracy_on_held_out_synthetic_truth(scored):
    wrong = []
    for (lv, s), r in scored.items():
        assert r.cells > 50, (lv, s, r.explanation)
        if r.her2 != lv:
            wrong.append((lv, s, r.explanation))
    # >= 95% over the eight images means all of them
    assert not wrong, wrong


def test_cells_match_truth(pairs, scored):
    """Tumour-cell detection and membrane classes against the per-cell truth, pooled over the
    held-out images (a detection matches a true cell within 6 um, about a nucleus radius)."""
    tp = n_sel = n_true = n_found = agree = n_match = 0
    comp_by_class = {k: [] for k in range(4)}
    for key, p in pairs.items():
        r = scored[key]
        t = p.truth.cells
        true_tum = t["tumour"] & t["in_ihc"]
        dist, idx = cKDTree(t["centroid_ihc"]).query(r.centroid, distance_upper_bound=12)
        hit = np.isfinite(dist)
        tt = np.zeros(len(hit), bool)
        tt[hit] = true_tum[idx[hit]]
        found = np.zeros(len(true_tum), bool)
        found[idx[hit & r.tumour]] = True
        tp, n_sel = tp + (r.tumour & tt).sum(), n_sel + r.tumour.sum()
        n_found, n_true = n_found + (found & true_tum).sum(), n_true + true_tum.sum()
        m = r.tumour & tt
        truth_cls = t["membrane_class"][idx[m]]
        agree, n_match = agree + (truth_cls == r.cell_class[m]).sum(), n_match + m.sum()
        for k in range(4):
            comp_by_class[k] += list(r.completeness[m][truth_cls == k])
    recall, precision = n_found / n_true, tp / n_sel
    assert recall > 0.8 and precision > 0.65, (recall, precision)
    assert agree / n_match > 0.6  # chance: 0.25
    # measured completeness follows the truth: none < faint (incomplete) < weak-moderate, intense
    med = [np.median(comp_by_class[k]) for k in range(4)]
    assert med[0] < med[1] < med[2] and med[1] < med[3], med


def test_real_ihc_scores_high_with_sane_cell_count(real_ihc):
    r = score(real_ihc, mpp=0.5)
    assert r.her2 in ("2+", "3+"), r.explanation
    # crop x 260-380, y 320-400: 20 nuclei counted by eye (docs/her2.md)
    x, y = r.centroid.T
    in_crop = (x >= 260) & (x < 380) & (y >= 320) & (y < 400)
    assert 14 <= in_crop.sum() <= 26, in_crop.sum()
    assert 150 <= len(r.centroid) <= 500
    assert r.explanation.startswith(r.her2 + ":") and f"{r.cells} tumour cells" in r.explanation


def test_he_input_is_not_assessable(data_dir, real_ihc, pairs):
    from skimage.io import imread

    he = imread(data_dir / "he_tile_240.png")[..., :3]
    r = score(he, 0.5)
    assert r.her2 is None and r.reason_code == "not_ihc" and "H&E" in r.to_dict()["reason"]
    assert score(real_ihc, 0.5).reason is None
    gray = np.repeat(real_ihc[..., :1], 3, axis=2)
    assert score(gray, 0.5).reason_code == "grayscale"
    outside = score_polygon(real_ihc, np.array([[900, 900], [990, 900], [990, 990]]), 0.5)
    assert outside.cells == 0 and outside.her2 is None and "outside" in outside.reason
    assert score(pairs[("1+", HELD_OUT[0])].ihc, 0.5).warnings == []


def test_unstained_tissue_scores_zero(pairs):
    p = pairs[("3+", HELD_OUT[0])]
    h, _ = separate_hdab(p.ihc)
    counterstain_only = render(np.stack([h, np.zeros_like(h)], -1), stain_matrix(HEMATOXYLIN, DAB)[:2])
    r = score(counterstain_only, 0.5)
    assert r.her2 == "0" and r.fractions["any"] < 0.05 and r.cells > 50


def test_macenko_recovers_perturbed_vectors():
    rng = np.random.default_rng(0)
    hv, dv = np.array([0.60, 0.74, 0.30]), np.array([0.22, 0.55, 0.80])
    conc = np.zeros((128, 128, 2), np.float32)
    conc[..., 0] = rng.gamma(2.0, 0.15, (128, 128)) * (rng.random((128, 128)) < 0.5)
    conc[..., 1] = rng.gamma(2.0, 0.25, (128, 128)) * (rng.random((128, 128)) < 0.5)
    rgb = render(conc, stain_matrix(hv, dv)[:2])
    est = macenko_vectors(rgb)
    for e, v in zip(est, (hv, dv)):
        assert e @ (v / np.linalg.norm(v)) > 0.99
    r1, r2 = score(rgb, 0.5), score(rgb, 0.5, estimate_stains=True)
    assert isinstance(r1, HER2Result) and isinstance(r2, HER2Result)


def test_mask_subset_and_merge(pairs):
    p = pairs[("2+", HELD_OUT[1])]
    full = score(p.ihc, 0.5)
    mask = np.zeros(p.ihc.shape[:2], bool)
    mask[:, : SIZE // 2] = True
    left = score(p.ihc, 0.5, mask=mask)
    assert 0 < left.cells < full.cells
    assert np.all(left.centroid[:, 0] < SIZE // 2 + 0.5)
    right = score(p.ihc, 0.5, mask=~mask)
    merged = HER2Result.merge([left, right])
    assert abs(merged.cells - full.cells) <= 0.05 * full.cells
    assert merged.her2 == full.her2
    d = merged.to_dict(per_cell=True)
    json.dumps(d)
    assert len(d["per_cell"]["class"]) == len(merged.centroid)
    # polygon = the same left half
    h = SIZE // 2 - 1
    poly = score_polygon(p.ihc, np.array([[0, 0], [h, 0], [h, SIZE - 1], [0, SIZE - 1]]), 0.5)
    assert abs(poly.cells - left.cells) <= 0.05 * left.cells + 2


def test_score_map_on_a_pyramid(pairs):
    p = pairs[("3+", HELD_OUT[0])]
    levels = [p.ihc, p.ihc[::2, ::2], p.ihc[::4, ::4]]
    seen = []
    m = score_map(levels, 0.5, tile_um=128, progress=lambda d, t: seen.append((d, t)))
    n = -(-SIZE // 256)  # 128 um tiles = 256 px
    assert m.labels.shape == (n, n) and seen[-1] == (n * n, n * n)
    assert m.analysis_mpp == 1.0  # the coarsest level with enough resolution for cells
    # 128 um tiles hold fewer tumour cells than the minimum: not assessable (5), yet pooled 3+
    for t in (t for t in m.tiles if t.result is not None):
        want = 5 if t.result.cells < t.result.params.min_tumour_cells else 4
        assert m.labels[t.row, t.col] == want, t.result.explanation
    assert m.overall.her2 == "3+" and m.overall.cells >= 100
    assert m.overall.centroid[:, 0].max() > 0.7 * SIZE  # level-0 coordinates
    json.dumps(m.to_dict())


def test_score_map_cancel(pairs):
    from napari_bci.errors import Cancelled

    p = pairs[("0", HELD_OUT[0])]
    with pytest.raises(Cancelled):
        score_map(p.ihc, 0.5, tile_um=128, cancelled=lambda: True)


def test_bad_input():
    from napari_bci.errors import InputError

    with pytest.raises(InputError):
        score(np.zeros((10, 10)), 0.5)
    with pytest.raises(InputError):
        score(np.zeros((10, 10, 3), np.uint8), -1)
    with pytest.raises(InputError):
        score(np.zeros((10, 10, 3), np.uint8), 0.5, mask=np.ones((5, 5), bool))
    blank = score(np.full((64, 64, 3), 250, np.uint8), 0.5)
    assert blank.her2 is None and blank.cells == 0 and blank.reason_code == "no_tissue"
    assert blank.display().startswith("not assessable (no tissue")
    tiny = score(np.full((1, 1, 3), 120, np.uint8), 0.5)  # all tissue, but one pixel
    assert tiny.her2 is None and tiny.reason_code == "no_tissue"
    assert tiny.reason == "too little tissue to score (1 px of 1x1; at least 100 px needed)"


# -- learned level ------------------------------------------------------------------------------
class _MeanDabHead:
    """A generator-interface object whose HER2 head maps DAB-like brownness to a level
    (stands in for a third-party model; the built-in one is tested when its weights exist)."""

    name, tile, mpp, predicts_her2 = "dab-head", 128, 0.5, True

    def predict_her2(self, tiles):
        from napari_bci.stain import dab

        m = np.array([dab(t).mean() for t in tiles])
        k = np.clip((m / 0.02).astype(int), 0, 3)
        return np.eye(4)[k] * 0.9 + 0.025


def test_learned_map_and_disagreement(pairs):
    from napari_bci.her2.learned import compare, disagreement, predict_map, predict_polygon

    p = pairs[("3+", HELD_OUT[0])]
    lm = predict_map(p.ihc, 0.5, _MeanDabHead(), tile_um=128)
    n = -(-SIZE // 256)
    assert lm.probs.shape == (n, n, 4) and np.allclose(np.nansum(lm.probs, -1)[lm.labels > 0], 1)
    rule = score_map(p.ihc, 0.5, tile_um=128)
    dis = disagreement(rule.labels, lm.labels)
    assert dis.shape == rule.labels.shape
    c = compare(rule.overall, lm.region())
    assert c["rule"] == "3+" and c["learned"] in LEVELS and c["agree"] == (c["learned"] == "3+")
    assert "rule-based 3+" in c["text"]
    na = score(p.ihc[:60, :60], 0.5)  # a few cells: not assessable, shown with its reason
    assert "rule-based not assessable (too few tumour cells" in compare(na, lm.region())["text"]
    pp = predict_polygon(p.ihc, np.array([[0, 0], [600, 0], [600, 600], [0, 600]]), 0.5, _MeanDabHead())
    assert pp.shape == (4,) and abs(pp.sum() - 1) < 1e-6
    assert compare("2+", None)["learned"] is None


def test_level_aware_torch_head_per_tile_and_region(pairs):
    """The real level-aware architecture (untrained, small) through the generator interface."""
    torch = pytest.importorskip("torch")
    from napari_bci.models.base import TorchGenerator
    from napari_bci.models.level_aware import build
    from napari_bci.her2.learned import compare, predict_map, predict_polygon

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = TorchGenerator(build({"channels": [8, 8, 16, 16], "n_blocks": 1, "head_channels": 8}),
                           name="tiny-level-aware", tile=128, halo=0, mpp=1.0, multiple=16)
    assert model.predicts_her2
    p = pairs[("2+", HELD_OUT[0])]
    lm = predict_map(p.he[:256, :512], 0.5, model, tile_um=128)  # windows resampled from 0.5 to 1.0 um/px
    ok = lm.labels > 0
    assert ok.any() and np.allclose(lm.probs[ok].sum(-1), 1, atol=1e-5)
    assert lm.labels.shape == (1, 2)
    pp = predict_polygon(p.he, np.array([[0, 0], [255, 0], [255, 255], [0, 255]]), 0.5, model)
    assert pp.shape == (4,) and abs(pp.sum() - 1) < 1e-5
    assert compare("2+", pp)["agree"] in (True, False)


def test_builtin_level_model_when_installed(pairs):
    from napari_bci.her2.learned import level_model, predict_tiles

    model = level_model("builtin")
    if model is None:
        pytest.skip("built-in model with a HER2 head not installed")
    p = pairs[("2+", HELD_OUT[0])]
    t = int(model.tile)
    probs = predict_tiles(p.he[None, :t, :t], model)
    assert probs.shape == (1, 4) and abs(probs.sum() - 1) < 1e-5


def test_level_model_absent_is_none():
    from napari_bci.her2.learned import level_model

    assert level_model("no-such-model") is None


# -- CLI ----------------------------------------------------------------------------------------
def test_cli_score(tmp_path, run_cli, pairs):
    from skimage.io import imsave

    p = pairs[("2+", HELD_OUT[0])]
    f = tmp_path / "ihc.png"
    imsave(f, p.ihc[:512, :512], check_contrast=False)
    gj = tmp_path / "regions.geojson"
    gj.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"name": "left"},
         "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [255, 0], [255, 511], [0, 511], [0, 0]]]}},
        {"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
         "geometry": {"type": "Polygon",
                      "coordinates": [[[256, 0], [511, 0], [511, 511], [256, 511], [256, 0]]]}},
    ]}))
    code, out, err = run_cli("score", f, "--regions", gj, "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["her2"] in LEVELS and d["cells"] > 20 and d["assessable"] and d["reason"] is None
    assert isinstance(d["warnings"], list) and d["pattern"]["pattern"] == "membranous"
    assert all("assessable" in r and "warnings" in r for r in d["regions"])
    assert set(d["fractions"]) >= {"none", "faint", "weak_moderate", "intense"}
    assert d["explanation"].startswith(d["her2"])
    assert [r["name"] for r in d["regions"]] == ["left", "Tumor"]
    assert sum(r["cells"] for r in d["regions"]) == pytest.approx(d["cells"], rel=0.1, abs=3)
    code, out2, _ = run_cli("score", f, "--mpp", "0.5", "--estimate-stains")
    assert code == 0 and "her2:" in out2


def test_cli_score_bad_input(tmp_path, run_cli):
    code, out, err = run_cli("score", tmp_path / "missing.png", "--json")
    assert code == 2 and out == "" and "missing.png" in err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    code, out, err = run_cli("score", bad, "--json")
    assert code == 2 and "bad.png" in err
    gj = tmp_path / "r.geojson"
    gj.write_text("{}")
    from skimage.io import imsave

    img = tmp_path / "ok.png"
    imsave(img, np.full((64, 64, 3), 240, np.uint8), check_contrast=False)
    code, out, err = run_cli("score", img, "--regions", gj, "--json")
    assert code == 2 and "r.geojson" in err
    code, out, err = run_cli("score", img, "--mpp", "-1", "--json")
    assert code == 2
