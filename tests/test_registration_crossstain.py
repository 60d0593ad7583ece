"""Automatic registration across stains: the stain-invariant global search (any rotation, flip,
scale), its refinement, the quality figures and the clear failure on unrelated tissue.

The pairs are made from real H&E in tests/data: the fixed image re-renders its hematoxylin and a
DAB membrane-like stain (no eosin) after a known warp, so colours differ as between H&E and IHC.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from skimage.io import imread

from napari_bci.registration import RegistrationFailed, register, register_auto
from napari_bci.registration.images import as_pyramid
from napari_bci.registration.intensity import global_search, invariant_channels
from napari_bci.registration.known_warp import make_known_pair, truth_points


@pytest.fixture(scope="module")
def he(data_dir):
    return imread(data_dir / "he_carcinoma_1000.png")[:512, :512, :3]


def _tre(t, pair, shape):
    pm, pf = truth_points(pair.transform, shape, pair.fixed.shape[:2], step=24)
    return float(np.median(np.linalg.norm(t.forward(pm) - pf, axis=1)))


def test_global_search_finds_rotation_flip_and_scale(he):
    pair = make_known_pair(he, seed=2, angle=160, flip=True, scale=0.85, field_amplitude=0)
    f, _ = as_pyramid(pair.fixed).image_at(96)
    m, _ = as_pyramid(pair.moving).image_at(96)
    best = global_search(invariant_channels(f), invariant_channels(m))[0]
    assert best.flipped
    # the true moving -> fixed rotation, read from the matrix (the flip is applied first)
    a = pair.transform.matrix[:2, :2] @ np.diag([-1.0, 1.0])
    true_angle = np.degrees(np.arctan2(a[1, 0], a[0, 0])) % 360
    assert abs((best.angle - true_angle + 180) % 360 - 180) <= 10, (best.angle, true_angle)
    assert abs(best.scale - 0.85) < 0.1
    # with a judge the best by correlation are ranked by correlation + judge: one that favours
    # unmirrored poses puts one first although the truth is mirrored
    unmirrored = global_search(invariant_channels(f), invariant_channels(m),
                               judge=lambda mat: 10.0 * (np.linalg.det(mat[:2, :2]) > 0))
    assert not unmirrored[0].flipped and unmirrored[0].score < best.score


@pytest.mark.parametrize("angle, flip, scale",
                         [(160.0, True, 0.85), (-100.0, False, 1.2), (135.0, True, 1.6)])
def test_auto_cross_stain_any_pose(he, angle, flip, scale):
    pair = make_known_pair(he, seed=4, angle=angle, flip=flip, scale=scale, field_amplitude=0)
    res = register_auto(pair.fixed, pair.moving, refine_side=512)
    assert res.flipped == flip and res.transform.meta["start"] == "intensity"
    assert _tre(res.transform, pair, he.shape[:2]) < 2.0


def test_deformable_cross_stain_and_quality_figures(he):
    pair = make_known_pair(he, seed=6, angle=120, flip=True, field_amplitude=5)
    res = register(pair.fixed, pair.moving, method="deformable", refine_side=512, deform_side=512)
    r = res.report
    assert r["deformable_kept"] and res.transform.field is not None
    assert _tre(res.transform, pair, he.shape[:2]) < 1.0
    assert r["auto_start"] == "intensity" and r["auto_score"] > 0.5
    assert r["ncc_after"] > r["ncc_before"] + 0.3 and r["mi_after"] > r["mi_before"]
    assert r["tissue_overlap_after"] > max(0.85, r["tissue_overlap_before"] + 0.1)
    assert r["folded_fraction"] == 0.0


def test_far_moving_field_is_dropped_without_landmarks(he, monkeypatch):
    """A dense field that moves tissue far beyond the automatic start (here 20 px everywhere, over
    1 % of the diagonal) is not trusted on its own: the projective is kept, with the reason."""
    import napari_bci.registration.api as api
    from napari_bci.transform import Transform

    def far_field(fixed, moving, t, **kw):
        return Transform(t.matrix, np.full((9, 9, 2), 20.0, np.float32), 64.0, dict(t.meta))

    monkeypatch.setattr(api, "register_deformable", far_field)
    pair = make_known_pair(he, seed=6, angle=40, field_amplitude=0)
    r = register(pair.fixed, pair.moving, method="deformable", refine_side=512, quality=False)
    assert not r.report["deformable_kept"] and "moves tissue" in r.report["deformable_rejected"]
    assert r.transform.field is None


def test_ambiguous_pose_is_refused(he):
    """The moving patch appears twice in the fixed image: two poses 256 px apart match equally
    well, so no choice between them is trustworthy, and none is returned."""
    from napari_bci.registration.known_warp import ihc_like

    patch = he[:256, :256]
    fixed = ihc_like(np.concatenate([patch, patch], 1), seed=3)
    msg = r"^registration failed: two alignments .*equally well.*\(try landmarks"
    with pytest.raises(RegistrationFailed, match=msg) as err:
        register_auto(fixed, patch)
    assert err.value.rule == "ambiguity"


def test_unrelated_tissue_fails_clearly_in_one_cli_line(he, data_dir, tmp_path, run_cli):
    """Unrelated tissue: ``registration failed: ... (try landmarks ...)``, exit 2, one line,
    no output file (the CLI prints the RegistrationFailed of register_auto as it is)."""
    import re

    from skimage.io import imsave

    other = imread(data_dir / "he_skin_10x.tif")[:512, :512, :3]
    pair = make_known_pair(he, seed=1, angle=30, field_amplitude=0)
    imsave(tmp_path / "ihc.png", pair.fixed)
    imsave(tmp_path / "he.png", other)
    code, out, err = run_cli("register", tmp_path / "ihc.png", tmp_path / "he.png", "--out",
                             tmp_path / "T.json", "--method", "auto")
    assert code == 2 and out == "" and err.strip().count("\n") == 0
    # the message as register_auto raises it, behind the CLI's "<prog>: error: " prefix
    assert re.match(r"napari-bci register: error: registration failed: .*\(try landmarks", err), err
    assert not (tmp_path / "T.json").exists()


def test_cli_names_the_file_that_shows_no_tissue(he, tmp_path, run_cli):
    """A moving image of bare glass (the wrong region exported, say): exit 2, one line that
    starts with that file's path and says it shows no tissue; no output file."""
    from skimage.io import imsave

    glass = np.random.default_rng(0).integers(247, 254, (512, 512, 3)).astype(np.uint8)
    imsave(tmp_path / "ihc.png", he)
    imsave(tmp_path / "glass.png", glass)
    code, out, err = run_cli("register", tmp_path / "ihc.png", tmp_path / "glass.png", "--out",
                             tmp_path / "T.json", "--method", "auto")
    assert code == 2 and out == "" and err.strip().count("\n") == 0, err
    assert f"error: {tmp_path / 'glass.png'}: registration failed: the moving image (H&E) shows no tissue" in err, err
    assert not (tmp_path / "T.json").exists()


def test_orientation_agreement_tells_the_true_pose_from_its_mirror(he):
    """The tissue's local orientation agrees under the true pose and not under the mirrored one
    (whose tissue and nucleus maps can fit about as well on symmetric tissue)."""
    from napari_bci.registration.intensity import orientation_agreement
    from napari_bci.stain import rgb_to_od

    pair = make_known_pair(he, seed=5, angle=70, field_amplitude=0)
    od_f, od_m = (rgb_to_od(a).sum(-1).astype(np.float32) for a in (pair.fixed, pair.moving))
    m = pair.transform.matrix
    c = (he.shape[1] - 1) / 2
    mirror = m @ np.array([[-1.0, 0, 2 * c], [0, 1, 0], [0, 0, 1]])  # flip the H&E about its centre first
    right, wrong = orientation_agreement(od_f, od_m, m), orientation_agreement(od_f, od_m, mirror)
    assert right > 0.5 and wrong < right - 0.3, (right, wrong)
    shifted = np.array([[1.0, 0, 40], [0, 1, 0], [0, 0, 1]]) @ m  # 40 px off
    assert orientation_agreement(od_f, od_m, shifted) < right - 0.2


def test_report_has_the_decision_score(he):
    from napari_bci.registration.features import MIN_DECISION

    pair = make_known_pair(he, seed=7, angle=-35, field_amplitude=0)
    r = register(pair.fixed, pair.moving, method="auto", refine_side=512).report
    assert r["auto_decision"] == pytest.approx(r["auto_score"] + r["auto_orientation"], abs=2e-4)
    assert r["auto_decision"] > MIN_DECISION and r["auto_orientation"] > 0.3
    # and the local agreement: the re-stained tissue's blocks match on the alignment
    assert r["local_blocks"] >= 16 and r["local_shift"] < 0.2 and r["local_shift_px"] < 5


def test_structure_flow_refines_without_following_cells(he):
    """The deformable step used for consecutive sections (half resolution, cells blurred) still
    recovers a smooth field on top of the projective start."""
    from napari_bci.registration import register_deformable
    from napari_bci.registration.deformable import STRUCTURE_FLOW, STRUCTURE_SIGMA
    from napari_bci.transform import Transform

    pair = make_known_pair(he, seed=6, angle=20, field_amplitude=5)
    start = Transform(pair.transform.matrix)
    before = _tre(start, pair, he.shape[:2])
    from napari_bci.registration.images import downscale

    levels = [[a, downscale(a, 2)] for a in (pair.fixed, pair.moving)]  # half resolution, as for real pairs
    t = register_deformable(*levels, start, max_side=256, structure=STRUCTURE_SIGMA, **STRUCTURE_FLOW)
    after = _tre(t, pair, he.shape[:2])
    assert t.meta["deformable_downsample"] == 2.0
    assert after < 0.6 * before, (before, after)


def test_structure_flow_is_not_pulled_into_a_tear_only_one_section_has(he):
    """Where the moving section has a tear (glass) that the fixed one lacks, the structure flow has
    nothing to follow; the shared-tissue weight (zero there, checked below) and the contrasts'
    agreement keep the tear's rim out of the field, which errs under 1 px around it (a flow with
    neither erred 2.0 px there, with the weight alone 1.25 px)."""
    from napari_bci.registration import deformable as D
    from napari_bci.registration.images import downscale
    from napari_bci.transform import Transform

    pair = make_known_pair(he, seed=7, angle=20, field_amplitude=5)
    moving = pair.moving.copy()
    yy, xx = np.mgrid[: moving.shape[0], : moving.shape[1]]
    moving[(yy - 260) ** 2 + (xx - 250) ** 2 < 60**2] = 240
    pm, pf = truth_points(pair.transform, he.shape[:2], pair.fixed.shape[:2], step=12)
    d = np.hypot(pm[:, 1] - 260, pm[:, 0] - 250)
    rim = (d > 60) & (d < 110)
    levels = [[a, downscale(a, 2)] for a in (pair.fixed, moving)]

    def rim_error():
        t = D.register_deformable(*levels, Transform(pair.transform.matrix), max_side=256,
                                  structure=D.STRUCTURE_SIGMA, **D.STRUCTURE_FLOW)
        return float(np.median(np.linalg.norm(t.forward(pm[rim]) - pf[rim], axis=1)))

    assert rim_error() < 1.0

    fixed = np.full((64, 64, 3), 150, np.uint8)
    warped = fixed.copy()
    warped[:, 40:] = 240  # glass in the moving section only
    valid = np.ones((64, 64), bool)
    valid[:8] = False  # mirrored data beyond the moving image
    w = D.shared_tissue_weight(fixed, warped, valid, 1.0, 4)
    assert w[30, 10] == 1 and w[30, 30] == 1 and w[13, 10] == 1  # both have tissue, data
    assert w[30, 40] == 0 and w[30, 50] == 0 and w[10, 10] == 0  # the tear, the mirrored rows


def test_structure_flow_fuses_its_contrasts_where_each_has_structure(he):
    """The structure flow follows two contrasts: where both show the same shift it finds it; where
    one is flat (no structure to follow) the fused flow is the other's, not pulled halfway towards
    zero, and where one does not agree between the images it does not pull the other's flow."""
    from scipy import ndimage as ndi

    from napari_bci.registration.deformable import STRUCTURE_FLOW, STRUCTURE_SIGMA, flow_ilk
    from napari_bci.registration.intensity import ranked_density, ranked_hematoxylin

    img = he[200:456, 200:456]
    shift = np.array([1.5, -2.0])  # rows, cols: moving(p) = fixed(p - shift)
    chans = [ndi.gaussian_filter(c(img), STRUCTURE_SIGMA) for c in (ranked_hematoxylin, ranked_density)]
    fixed = np.stack(chans)
    moving = np.stack([ndi.shift(c, shift, mode="nearest") for c in chans])
    flat = np.full_like(chans[0], 0.5)
    inner = (slice(None), slice(40, -40), slice(40, -40))

    def error(f, m):
        v = flow_ilk(f, m, **STRUCTURE_FLOW)[inner].reshape(2, -1)
        return float(np.median(np.linalg.norm(v - shift[:, None], axis=0)))

    assert error(fixed, moving) < 0.3
    one_flat = error(np.stack([fixed[0], flat]), np.stack([moving[0], flat]))
    assert one_flat < 0.3 and abs(one_flat - error(fixed[0], moving[0])) < 0.1
    # a second contrast that differs between the images (here: another region's structure)
    other = ndi.shift(chans[1], (37, -53), mode="wrap")
    assert error(np.stack([fixed[0], chans[1]]), np.stack([moving[0], other])) < 0.5


def test_field_on_sections_without_shared_cells_is_judged_by_orientation(he, monkeypatch):
    """Where the sections share no cells, the structure-following field is kept unless it lowers
    the tissue's orientation agreement, and then dropped with the reason."""
    import napari_bci.registration.api as api
    from napari_bci.transform import Transform

    monkeypatch.setattr(api, "SHARED_CELLS_NCC", 1.01)  # treat the pair as consecutive sections
    pair = make_known_pair(he, seed=6, angle=25, field_amplitude=10)
    good = register(pair.fixed, pair.moving, method="deformable", refine_side=512, deform_side=512)
    r = good.report
    assert r["deformable_follows"] == "tissue structure" and r["deformable_kept"], r.get("deformable_rejected")
    assert r["orientation_after"] > 0.5
    assert _tre(good.transform, pair, he.shape[:2]) < 1.0

    real = api.register_deformable

    def drifting(fixed, moving, t, **kw):  # a smooth 8 px swirl unrelated to the tissue
        out = real(fixed, moving, t, **kw)
        gh, gw = out.field.shape[:2]
        yy, xx = np.mgrid[0:gh, 0:gw] / max(gh, gw) * 2 * np.pi
        out.field = np.stack([8 * np.sin(2 * yy), 8 * np.cos(2 * xx)], -1).astype(np.float32)
        return out

    monkeypatch.setattr(api, "register_deformable", drifting)
    bad = register(pair.fixed, pair.moving, method="deformable", refine_side=512, deform_side=512, quality=False)
    assert not bad.report["deformable_kept"] and "orientation" in bad.report["deformable_rejected"]
    assert bad.transform.field is None


def test_ecc_judge_picks_the_iterate_the_decision_prefers(he):
    """With a judge, ecc_refine returns the judged iterate with the best correlation + judge,
    with that iterate's own correlation; a judge that forbids moving keeps the start."""
    from napari_bci.registration.intensity import SearchChannels, ecc_refine, orientation_agreement
    from napari_bci.stain import rgb_to_od
    from napari_bci.transform import apply_matrix

    pair = make_known_pair(he, seed=3, angle=25, field_amplitude=0)
    pf, pm = as_pyramid(pair.fixed), as_pyramid(pair.moving)
    cf, _ = SearchChannels(pf, 256).at(1, 2.0)
    cm, _ = SearchChannels(pm, 256).at(1, 2.0)
    ds = max(he.shape) / 256
    lv = np.diag([1 / ds, 1 / ds, 1.0])
    truth = lv @ pair.transform.matrix @ np.linalg.inv(lv)
    start = np.array([[1.0, 0, 6], [0, 1, -5], [0, 0, 1]]) @ truth  # about 8 px (32 level-0 px) off
    free, s_free = ecc_refine(cf, cm, start, "affine")

    def stay(m):
        return -100.0 * float(np.abs(m - start).sum())

    kept, s_kept = ecc_refine(cf, cm, start, "affine", judge=stay)
    assert np.allclose(kept, start, atol=1e-6) and s_kept < s_free
    od_f, od_m = (rgb_to_od(p.image_at(256)[0]).sum(-1).astype(np.float32) for p in (pf, pm))

    def orient(m):
        return orientation_agreement(od_f, od_m, m)

    judged, s_judged = ecc_refine(cf, cm, start, "affine", judge=orient)
    assert s_judged + orient(judged) >= s_free + orient(free) - 1e-9
    assert s_judged + orient(judged) > ecc_refine(cf, cm, start, "affine", iterations=1)[1] + orient(start)
    # the score returned is the chosen iterate's own
    assert abs(ecc_refine(cf, cm, judged, "affine", iterations=1)[1] - s_judged) < 1e-6
    corners = np.array([[0, 0], [255, 0], [0, 255], [255, 255]], float)
    assert np.median(np.linalg.norm(apply_matrix(judged, corners) - apply_matrix(truth, corners), axis=1)) < 2.0


def test_consecutive_sections_auto_pose_is_fitted_to_the_structure_field(he, monkeypatch):
    """Where the sections share no cells, the automatic pose is the projective fit to the
    tissue-structure field (closer to the truth than the ECC pose it starts from, which a fit
    allowed no movement keeps), and the deformable step reuses that field on top of it, averaged
    with a fresh one from the fitted pose (one field where the pose did not move)."""
    import napari_bci.registration.api as api
    import napari_bci.registration.features as features

    for mod in (api, features):  # treat the re-stained pair as consecutive sections
        monkeypatch.setattr(mod, "SHARED_CELLS_NCC", 1.01)
    pair = make_known_pair(he, seed=6, angle=25, field_amplitude=0)
    auto = register(pair.fixed, pair.moving, method="auto", refine_side=512, quality=False)
    assert 0 < auto.report["structure_polish_px"] < 0.03 * np.hypot(*he.shape[:2])
    deformable = register(pair.fixed, pair.moving, method="deformable", refine_side=512, quality=False)
    assert np.allclose(deformable.transform.matrix, auto.transform.matrix)
    assert deformable.report["deformable_kept"] and _tre(deformable.transform, pair, he.shape[:2]) < 1.0
    assert deformable.transform.meta["deformable_fields"] == deformable.report["deformable_fields"] == 2

    monkeypatch.setattr(features, "MAX_POLISH_SHIFT", 0.0)
    ecc = register(pair.fixed, pair.moving, method="auto", refine_side=512, quality=False)
    assert "structure_polish_rejected" in ecc.report and "structure_polish_px" not in ecc.report
    assert _tre(auto.transform, pair, he.shape[:2]) < 0.8 * _tre(ecc.transform, pair, he.shape[:2])
    one = register(pair.fixed, pair.moving, method="deformable", refine_side=512, quality=False)
    assert "deformable_fields" not in one.transform.meta and "deformable_fields" not in one.report and _tre(one.transform, pair, he.shape[:2]) < 1.5


def test_structure_fit_leaves_out_points_near_either_frames_edge():
    """The fit to the structure field uses the point pairs away from both frames' edges, where
    the field has the most to go on; near-edge pairs come back only when too few would remain."""
    from napari_bci.registration.features import POLISH_EDGE, away_from_edges

    rng = np.random.default_rng(3)
    fixed = rng.uniform(0, 511, (2000, 2))
    moving = fixed + [7.0, -4.0]  # a pure shift of the moving frame (512 px too)
    ok = np.ones(len(fixed), bool)
    keep = away_from_edges(ok, fixed, (512, 512), moving, (512, 512))
    near = lambda xy: (np.minimum(xy, 511 - xy) < POLISH_EDGE).any(1)  # noqa: E731
    assert not keep[near(fixed) | near(moving)].any() and keep[~(near(fixed) | near(moving))].all()
    # a frame almost all edge: everything stays
    small = away_from_edges(ok[:100], fixed[:100] / 8, (64, 64), moving[:100] / 8, (64, 64))
    assert small.all()


def test_mean_field_averages_two_fields_on_one_grid():
    from napari_bci.registration.deformable import mean_field
    from napari_bci.transform import Transform

    m = np.array([[1.0, 0.1, 5], [0, 1, -3], [0, 0, 1]])
    u = np.random.default_rng(0).normal(0, 0.3, (20, 30, 2)).astype(np.float32)
    avg = mean_field(Transform(m, u + 2, 16.0, {"k": 1}), Transform(m, -u, 16.0))
    assert np.allclose(avg.field, 1.0, atol=1e-6) and np.allclose(avg.matrix, m) and avg.meta == {"k": 1}
    with pytest.raises(ValueError, match="same matrix and grid"):
        mean_field(Transform(m, u, 16.0), Transform(m, u, 8.0))
    with pytest.raises(ValueError, match="same matrix and grid"):
        mean_field(Transform(m, u, 16.0), Transform(np.eye(3), u, 16.0))


def test_whole_slide_auto_pose_is_fitted_to_the_structure_field(data_dir, monkeypatch):
    """The same fit on an image past the whole-slide mark (2048 px: coarse levels, the field in
    parts at half the working level): a real 2967 x 2220 px slide region under a known warp."""
    import napari_bci.registration.api as api
    import napari_bci.registration.features as features
    from napari_bci.io.slide import open_slide
    from napari_bci.transform import Transform

    with open_slide(data_dir / "CMU-1-Small-Region.svs") as s:
        he = np.asarray(s.levels[0])[..., :3]
    assert max(he.shape) > 2048
    for mod in (api, features):
        monkeypatch.setattr(mod, "SHARED_CELLS_NCC", 1.01)
    pair = make_known_pair(he, seed=4, angle=-30, field_amplitude=0)
    res = register(pair.fixed, pair.moving, method="deformable", quality=False)
    assert res.report["structure_polish_px"] > 0 and res.report["deformable_kept"]
    # the fitted pose (the ECC pose before it: 1.1 px), then the reused field on top of it
    assert _tre(Transform(res.transform.matrix), pair, he.shape[:2]) < 0.5
    assert _tre(res.transform, pair, he.shape[:2]) < 3.0


def test_tissue_that_only_looks_alike_as_a_whole_is_refused_locally(he, data_dir):
    """An IHC-like skin patch and a breast carcinoma H&E: their tissue layouts correlate well
    enough to pass the decision score (0.98 here; on real patches of different tissue 7 of 56
    did), but block by block the best local matches scatter over the search window, so the
    alignment is refused (the decision check comes first: reaching this message means it passed)."""
    import napari_bci.registration.features as features
    from napari_bci.registration.known_warp import ihc_like

    skin = ihc_like(imread(data_dir / "he_skin_10x.tif")[:512, :512, :3], seed=3)
    with pytest.raises(RegistrationFailed, match=r"^registration failed: the alignment does not hold locally: "
                                                 r".*same tissue\? \(try landmarks") as err:
        register_auto(skin, he)
    assert err.value.rule == "local" and err.value.figures["local_shift"] > features.MAX_LOCAL_SHIFT
    assert err.value.figures["decision"] >= 0.65  # it passed the decision score
    # a refusal raised in a worker process (the distributed runner) reaches the caller intact
    back = pickle.loads(pickle.dumps(err.value))
    assert (type(back), str(back), back.rule, back.figures) == (RegistrationFailed, str(err.value), "local",
                                                                err.value.figures)


def test_local_check_judges_the_fit_to_all_the_tissue(data_dir):
    """The returned pose is the structure fit away from the frames' edges; the local check judges
    the fit to all the points, as it was calibrated. Two crops of the real slide's tumour, 1.5 mm
    apart (an IHC-like re-staining of one): the edge-margin pose alone reads 0.66, under the
    limit, and would be accepted; the fit to all the tissue reads over it, and the pair is refused."""
    import napari_bci.registration.features as features
    from napari_bci.io.slide import open_slide
    from napari_bci.registration.images import tissue_mask
    from napari_bci.registration.known_warp import ihc_like

    with open_slide(data_dir / "CMU-1-Small-Region.svs") as s:
        slide = np.asarray(s.levels[0])[..., :3]
    crops = [(y, x) for y in range(0, slide.shape[0] - 511, 512) for x in range(0, slide.shape[1] - 511, 512)
             if tissue_mask(slide[y:y + 512, x:x + 512]).mean() > 0.3]
    i = crops.index((0, 1024))  # the re-staining's seed, as in the held-out benchmark
    fixed = ihc_like(slide[:512, 1024:1536], seed=i)
    with pytest.raises(RegistrationFailed, match="does not hold locally") as err:
        register_auto(fixed, slide[2048:2560, 1536:2048])
    assert err.value.figures["local_shift"] > features.MAX_LOCAL_SHIFT


def test_local_agreement_measures_how_far_the_blocks_best_matches_lie(he):
    """On a re-stained pair the blocks' best matches lie on the true alignment; moved 20 px off
    it, they lie about 20 px away, and the figure says so in level-0 px (the search reaches 32 px
    on a 512 px image: 16 px of its 256 px view)."""
    from napari_bci.registration.quality import local_agreement
    from napari_bci.transform import Transform

    pair = make_known_pair(he, seed=2, angle=20, field_amplitude=0)
    true = local_agreement(pair.fixed, pair.moving, pair.transform)
    assert true["local_blocks"] >= 16 and true["local_shift"] < 0.15
    off = Transform(np.array([[1.0, 0, 20], [0, 1, 0], [0, 0, 1]]) @ pair.transform.matrix)
    moved = local_agreement(pair.fixed, pair.moving, off)
    assert 15 < moved["local_shift_px"] < 25 and 0.45 < moved["local_shift"] < 0.8
