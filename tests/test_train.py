"""Training: losses, PatchGAN key layout, the level-aware architecture, and end-to-end runs on
tiny synthetic data (loss decreases, exact resume, the exported config loads back)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_bci.train import losses
from napari_bci.models.level_aware import FiLM, LevelAwareGenerator, build
from napari_bci.train.patchgan import NLayerDiscriminator
from napari_bci.train.loop import (
    CropDataset,
    Pair,
    bci_psnr_ssim,
    synthetic_pairs,
    train,
    valid_box,
)

torch.set_num_threads(1)
TINY = {"channels": [8, 8, 16, 16], "n_blocks": 1, "head_channels": 8}


# -- losses -----------------------------------------------------------------------------------------
def test_gaussian_kernel_is_sigma1_3tap():
    k = losses.gaussian_kernel1d(3, 1.0).numpy()
    e = np.exp(-0.5)
    np.testing.assert_allclose(k, np.array([e, 1, e]) / (1 + 2 * e), rtol=1e-6)


def test_pyramid_l1_scales_and_weights():
    torch.manual_seed(0)
    a = torch.rand(2, 3, 64, 64) * 2 - 1
    total, terms = losses.PyramidL1()(a, a.clone())
    assert float(total) == 0.0 and len(terms) == 4
    b = a + 0.1  # a constant offset survives blurring and subsampling: 0.1 at every scale
    total, terms = losses.PyramidL1()(a, b)
    np.testing.assert_allclose([float(t) for t in terms], [0.1] * 4, rtol=1e-4)
    assert float(total) == pytest.approx(25 * 4 * 0.1, rel=1e-4)
    # fine detail is penalised at full scale but blurred away at 1/8
    noise = torch.randn(2, 3, 64, 64) * 0.2
    _, terms = losses.PyramidL1()(a, a + noise)
    assert float(terms[3]) < 0.3 * float(terms[0])
    assert losses.next_octave(a).shape[-2:] == (32, 32)


def test_ssim_matches_skimage_bci_setting():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    y = np.clip(x.astype(int) + rng.integers(-40, 40, x.shape), 0, 255).astype(np.uint8)
    _, ref = bci_psnr_ssim(x, y)

    def t(a):
        return torch.from_numpy(a).permute(2, 0, 1)[None].float() / 127.5 - 1

    assert float(losses.ssim(t(x), t(y))) == pytest.approx(ref, abs=2e-4)
    assert float(losses.ssim_loss(t(x), t(x))) == pytest.approx(0.0, abs=1e-6)


def test_focal_loss_reduces_to_cross_entropy_and_downweights_easy():
    logits = torch.tensor([[4.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.0, 0.0]])
    target = torch.tensor([0, 1])
    ce = torch.nn.functional.cross_entropy(logits, target)
    assert float(losses.focal_loss(logits, target, gamma=0)) == pytest.approx(float(ce), rel=1e-6)
    easy = losses.focal_loss(logits[:1], target[:1])
    hard = losses.focal_loss(logits[1:], target[1:])
    ce_easy = torch.nn.functional.cross_entropy(logits[:1], target[:1])
    assert float(easy) < 0.01 * float(ce_easy) and float(hard) > 0.1


def test_gan_loss_modes():
    pred = torch.zeros(1, 1, 4, 4)
    assert float(losses.GANLoss("vanilla")(pred, True)) == pytest.approx(np.log(2), rel=1e-6)
    assert float(losses.GANLoss("lsgan")(pred, True)) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        losses.GANLoss("wgan")


# -- PatchGAN ---------------------------------------------------------------------------------------
def test_patchgan_has_pix2pix_keys_and_70px_patches():
    d = NLayerDiscriminator(6, 64, 3, norm="batch")
    keys = set(d.state_dict())
    expected = {"model.0.weight", "model.0.bias", "model.2.weight", "model.3.running_mean",
                "model.5.weight", "model.6.weight", "model.8.weight", "model.9.num_batches_tracked",
                "model.11.weight", "model.11.bias"}
    assert expected <= keys
    assert "model.2.bias" not in keys  # no conv bias before BatchNorm, as in pix2pix
    assert d.state_dict()["model.8.weight"].shape == (512, 256, 4, 4)
    assert d(torch.zeros(1, 6, 256, 256)).shape == (1, 1, 30, 30)
    inst = NLayerDiscriminator(6, 64, 3, norm="instance").state_dict()
    assert "model.2.bias" in inst and "model.3.running_mean" not in inst
    assert set(NLayerDiscriminator(6, 8, 3, norm="none").state_dict()) == {
        "model.0.weight", "model.0.bias", "model.2.weight", "model.5.weight", "model.8.weight",
        "model.11.weight", "model.11.bias"}


# -- the level-aware architecture --------------------------------------------------------------------
def test_level_aware_shapes_any_size_and_registry():
    from napari_bci.models import architectures

    m = build(TINY).eval()
    with torch.no_grad():
        img, logits = m(torch.zeros(2, 3, 100, 120))
        assert img.shape == (2, 3, 100, 120) and logits.shape == (2, 4)
        assert float(img.abs().max()) <= 1.0
        _, dense = m.forward_dense(torch.zeros(1, 3, 64, 96))
        assert dense.shape == (1, 4, 4, 6)
    assert isinstance(architectures.build({"arch": "level_aware", **TINY}), LevelAwareGenerator)


def test_level_prediction_conditions_the_decoder():
    torch.manual_seed(0)
    film = FiLM(4, 8)
    torch.nn.init.normal_(film.proj.weight, std=0.5)
    h = torch.randn(1, 8, 16, 16)
    a = film(h, torch.tensor([1.0, 0, 0, 0]).view(1, 4, 1, 1))
    b = film(h, torch.tensor([0, 0, 0, 1.0]).view(1, 4, 1, 1))
    assert float((a - b).abs().mean()) > 0.1
    assert torch.equal(FiLM(4, 8)(h, torch.rand(1, 4, 2, 2)), h)  # zero-initialised: identity


def test_level_map_is_pooled_and_teacher_forcing_sets_the_decoder_level():
    torch.manual_seed(0)
    m = build({**TINY, "cond_pool": 3}).eval()
    for mod in m.modules():  # give the FiLM layers an effect (they start as identity)
        if isinstance(mod, FiLM):
            torch.nn.init.normal_(mod.proj.weight, std=0.5)
    dense = torch.zeros(1, 4, 5, 5)
    dense[0, 3, 2, 2] = 9.0  # one confident cell: pooling spreads it to its 3x3 neighbours only
    cond = m.condition(dense)
    assert cond[0, 3, 1, 1] > 0.4 and cond[0, 3, 0, 0] == pytest.approx(0.25)
    assert torch.allclose(cond.sum(1), torch.ones(1, 5, 5))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        lo, _ = m(x, torch.tensor([0, 0]))
        hi, logits = m(x, torch.tensor([3, 3]))
        mixed, _ = m(x, torch.tensor([3, 3]), torch.tensor([True, False]))
        free, logits_free = m(x)
    assert float((hi - lo).abs().mean()) > 1e-3  # the true level reaches the decoder
    torch.testing.assert_close(mixed[0], hi[0])
    torch.testing.assert_close(mixed[1], free[1])
    torch.testing.assert_close(logits, logits_free)  # the head never sees the label
    assert build(TINY).cond_pool == 1  # configs from before the option load unchanged


def test_level_map_sharpness_scales_the_logits_and_keeps_the_level_order():
    dense = torch.tensor([0.6, 0.3, 0.0, -0.2]).view(1, 4, 1, 1).expand(1, 4, 3, 3).clone()
    soft = build(TINY).condition(dense)
    sharp_model = build({**TINY, "cond_sharpness": 2.0})
    sharp = sharp_model.condition(dense)
    torch.testing.assert_close(sharp, torch.softmax(2.0 * dense, dim=1))
    assert float(soft[0, 0, 1, 1]) < 0.4 < float(sharp[0, 0, 1, 1])  # the leading level gains share
    assert torch.equal(soft.argmax(1), sharp.argmax(1))
    with torch.no_grad():  # the tile's level (mean logits) is the head's, whatever the sharpness
        x = torch.rand(1, 3, 64, 64) * 2 - 1
        ref = build(TINY).eval()
        sharp_model.load_state_dict(ref.state_dict())
        sharp_model.eval()
        torch.testing.assert_close(sharp_model(x)[1], ref(x)[1])
    assert build(TINY).cond_sharpness == 1.0  # configs from before the option load unchanged


def test_dab_gain_scales_stained_dab_only_and_follows_the_level_map():
    from napari_bci import stain
    from napari_bci.samples.synthetic import make_pair

    m = build({**TINY, "dab_gain": [1.0, 1.0, 1.0, 3.0]})
    ihc = make_pair("3+", 128, seed=12).ihc
    x = torch.from_numpy(ihc).permute(2, 0, 1)[None].float() / 127.5 - 1
    level = torch.zeros(1, 4, 8, 8)
    level[:, 0] = 1
    torch.testing.assert_close(m.scale_dab(x, level), x)  # level 0: gain 1, unchanged
    level = level.roll(3, dims=1)  # all 3+
    out = ((m.scale_dab(x, level) + 1) * 127.5).round().byte()[0].permute(1, 2, 0).numpy()
    d0, d1 = stain.dab(ihc), stain.dab(out)
    strong, faint = d0 > 0.2, d0 < 0.03
    assert np.median(d1[strong] / d0[strong]) == pytest.approx(3.0, rel=0.1)
    assert np.abs(d1[faint] - d0[faint]).max() < 0.01  # faint background DAB is left alone
    # hematoxylin is kept (except where tripled DAB saturates the 8-bit pixel)
    assert np.percentile(np.abs(stain.hematoxylin(out) - stain.hematoxylin(ihc)), 90) < 0.02


def test_dab_od_matches_colour_deconvolution():
    from napari_bci import stain
    from napari_bci.samples.synthetic import make_pair

    ihc = make_pair("3+", 128, seed=11).ihc
    x = torch.from_numpy(ihc).permute(2, 0, 1)[None].float() / 127.5 - 1
    np.testing.assert_allclose(losses.dab_od(x)[0, 0].numpy(), stain.dab(ihc), atol=1e-5)


def test_membrane_dab_loss_tolerates_a_shifted_membrane_and_punishes_a_missing_one():
    from napari_bci import stain

    def img(col=None, od=0.6):
        conc = np.zeros((1, 48, 48, 3), np.float32)
        if col is not None:
            conc[0, :, col : col + 2, 2] = od  # a 2 px wide vertical DAB membrane
        rgb = stain.render(conc, stain.HED_MATRIX)
        return torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 127.5 - 1

    loss = losses.MembraneDabLoss()
    truth = img(20)
    assert float(loss(truth, truth)) == pytest.approx(0.0, abs=1e-6)
    shifted, missing, pale = float(loss(img(21), truth)), float(loss(img(), truth)), float(loss(img(20, 0.2), truth))
    assert shifted < 0.6 * missing and shifted < pale
    # pixel L1 prefers the pale membrane to the full one a pixel off (what washes membranes out)
    l1 = torch.nn.functional.l1_loss
    assert float(l1(img(20, 0.2), truth)) < float(l1(img(21), truth))
    fake = img().requires_grad_(True)
    loss(fake, truth).backward()
    g = fake.grad.abs().sum((0, 1))
    assert float(g[:, 18:24].sum()) > 0.75 * float(g.sum())  # it pulls DAB mostly onto the membrane



def test_membrane_dab_loss_options_weigh_intense_membranes_and_stray_dab():
    """Stage 3's options: ``strength`` makes a pale intense membrane cost more than the same
    relative shortfall on a faint one, ``match`` and ``balance`` (means over the membranes and
    over the crop) add the shortfall of the whole crop, and ``balance`` also charges DAB drawn
    where the truth has none (a HER2 0 case); the defaults are the stage-2 loss."""
    from napari_bci import stain

    def img(col=None, od=0.6):
        conc = np.zeros((1, 48, 48, 3), np.float32)
        if col is not None:
            conc[0, :, col : col + 2, 2] = od
        rgb = stain.render(conc, stain.HED_MATRIX)
        return torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 127.5 - 1

    base = losses.MembraneDabLoss()
    assert float(base(img(20, 0.3), img(20))) == pytest.approx(
        float(losses.MembraneDabLoss(strength=0, pixel=1, match=0, balance=0)(img(20, 0.3), img(20))))
    strong = losses.MembraneDabLoss(strength=10.0)
    # half the DAB of an intense membrane vs half of a faint one: strength scales the intense shortfall up
    r_base = float(base(img(20, 0.4), img(20, 0.8))) / float(base(img(20, 0.05), img(20, 0.1)))
    r_strong = float(strong(img(20, 0.4), img(20, 0.8))) / float(strong(img(20, 0.05), img(20, 0.1)))
    assert r_strong > r_base
    for opt in ({"match": 1.0}, {"balance": 4.0}):
        more = losses.MembraneDabLoss(**opt)
        assert float(more(img(20, 0.2), img(20))) > float(base(img(20, 0.2), img(20)))
        assert float(more(img(20), img(20))) == pytest.approx(0.0, abs=1e-6)
    stray = img(20, 0.2)  # DAB on a truth without membranes
    assert float(losses.MembraneDabLoss(balance=4.0)(stray, img())) > float(base(stray, img()))
    assert float(losses.MembraneDabLoss(match=1.0)(stray, img())) == pytest.approx(float(base(stray, img())))


# -- data --------------------------------------------------------------------------------------------
def test_valid_box_and_crops_avoid_invalid_pixels():
    valid = np.ones((100, 120), bool)
    valid[:, :9] = False
    valid[90:, :] = False
    y0, y1, x0, x1 = valid_box(valid, valid.shape, 16)
    assert valid[y0:y1, x0:x1].all() and (y1 - y0) % 16 == 0 and (x1 - x0) % 16 == 0
    assert (y1 - y0) >= 80 and (x1 - x0) >= 96
    he = np.zeros((100, 120, 3), np.uint8)
    he[~valid] = 255
    ds = CropDataset([Pair(2, "p", he, he.copy(), valid)], crop=64, seed=1)
    for k in range(10):
        a, b, lv = ds[k]
        assert a.shape == (3, 64, 64) and int(lv) == 2
        assert float(a.max()) == -1.0  # never a pixel from the invalid (white) margin
    assert torch.equal(ds[3][0], ds[3][0])  # per-sample seeded: reproducible


@pytest.fixture(scope="module")
def tiny_pairs(tmp_path_factory):
    cache = tmp_path_factory.mktemp("syn")
    tr = synthetic_pairs(4, 128, seed=7, cache_dir=cache)
    va = synthetic_pairs(2, 128, seed=99)
    return tr, va


def test_synthetic_pairs_are_aligned_by_the_truth(tiny_pairs):
    from napari_bci import stain

    tr, _ = tiny_pairs
    assert [p.level for p in tr] == [0, 1, 2, 3]
    p = tr[0]
    box = valid_box(p.valid, p.ihc.shape[:2])
    h_he = stain.hematoxylin(p.he)[box[0]:box[1], box[2]:box[3]].ravel()
    h_ihc = stain.hematoxylin(p.ihc)[box[0]:box[1], box[2]:box[3]].ravel()
    # hematoxylin (nuclei) of the aligned H&E correlates with the IHC's counterstain
    assert np.corrcoef(h_he, h_ihc)[0, 1] > 0.5


def test_scored_evaluation_reports_the_share_of_stained_tumour_cells():
    from napari_bci.her2 import score
    from napari_bci.models.baseline import BaselineGenerator
    from napari_bci.train.loop import evaluate_pairs

    ps = synthetic_pairs(2, 384, seed=77, levels=("0", "3+"))
    res = evaluate_pairs(None, ps, generator=BaselineGenerator(), score=True)
    neg, pos = res["scored"]
    assert (neg["true"], pos["true"]) == ("0", "3+")
    assert neg["stained_real"] < 0.1 < 0.5 < pos["stained_real"]
    he, ihc, valid = ps[1].load()
    y0, y1, x0, x1 = valid_box(valid, ihc.shape[:2], 16)
    assert pos["stained_real"] == score(ihc[y0:y1, x0:x1], mpp=0.5).fractions["any"]
    assert 0.0 <= neg["stained_generated"] <= 1.0 and 0.0 <= pos["stained_generated"] <= 1.0


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_train_level_aware_decreases_loss_resumes_exactly_and_loads(tiny_pairs, tmp_path):
    from napari_bci.models.registry import load_generator

    tr, va = tiny_pairs
    kw = dict(arch="level_aware", steps=10, epochs=2, batch=2, crop=64, lr=2e-3, ssim_weight=1.0,
              gan_weight=0.0, seed=3, device="cpu", model_options=TINY, progress=False, log=lambda s: None)
    full = train(tr, va, tmp_path / "full", **kw)
    hist = full["history"]
    assert len(hist) == 2 and hist[1]["loss"] < hist[0]["loss"]
    assert 0 < hist[-1]["psnr"] < 60 and 0 < hist[-1]["ssim"] <= 1

    part = train(tr, va, tmp_path / "split", stop_at=4, **kw)
    assert part["stopped"] and part["steps"] == 4
    ck = json.loads((tmp_path / "split" / "checkpoint.json").read_text())
    assert ck["step"] == 4
    assert torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["G"]
    resumed = train(tr, va, tmp_path / "split", resume=True, **kw)
    assert resumed["steps"] == 10
    a, b = _weights(tmp_path / "full" / "model.safetensors"), _weights(tmp_path / "split" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)

    cfg = json.loads((tmp_path / "full" / "model.json").read_text())
    assert cfg["arch"] == "level_aware" and cfg["training"]["steps"] == 10 and "psnr" in cfg["metrics"]
    gen = load_generator(str(tmp_path / "full" / "model.safetensors"))
    assert gen.predicts_her2
    tiles = np.stack([tr[0].he[:64, :64], tr[3].he[:64, :64]])
    out = gen(tiles)
    assert out.shape == tiles.shape and out.dtype == np.uint8
    probs = gen.predict_her2(tiles)
    assert probs.shape == (2, 4) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_fine_tune_with_membrane_dab_loss_and_teacher_forcing(tiny_pairs, tmp_path):
    tr, va = tiny_pairs
    kw = dict(arch="level_aware", steps=4, epochs=1, batch=2, crop=64, lr=2e-3, ssim_weight=1.0, gan_weight=0.0,
              device="cpu", progress=False, log=lambda s: None)
    base = train(tr, va, tmp_path / "base", seed=3, model_options=TINY, **kw)
    tuned = train(tr, va, tmp_path / "tuned", seed=4, dab_weight=25.0, teacher_forcing=0.5,
                  dab_options={"strength": 10.0, "pixel": 0.5, "match": 1.0, "balance": 4.0},
                  init=base["weights"], model_options={**TINY, "cond_pool": 3}, **kw)
    cfg = json.loads((tmp_path / "tuned" / "model.json").read_text())
    assert cfg["cond_pool"] == 3 and cfg["training"]["loss"]["membrane_dab"] == 25.0
    assert cfg["training"]["loss"]["membrane_dab_options"]["strength"] == 10.0
    assert cfg["training"]["teacher_forcing"] == 0.5 and cfg["training"]["init"] == "model.safetensors"
    a, b = _weights(base["weights"]), _weights(tuned["weights"])
    assert any(not torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(Exception, match="cannot start from"):
        train(tr, va, tmp_path / "bad", init=base["weights"], model_options={**TINY, "channels": [8, 8, 16, 32]},
              **kw)


def test_train_pyramid_pix2pix_with_gan(tiny_pairs, tmp_path):
    from napari_bci.models.registry import load_generator

    tr, va = tiny_pairs
    rep = train(tr, va[:1], tmp_path / "p2p", arch="resnet_6blocks", steps=2, batch=2, crop=64,
                gan_weight=1.0, seed=0, device="cpu", model_options={"ngf": 8}, progress=False,
                log=lambda s: None)
    assert rep["steps"] == 2 and np.isfinite(rep["last_loss"])
    ck = torch.load(tmp_path / "p2p" / "checkpoint.pt", weights_only=True)
    assert "model.0.weight" in ck["D"] and "model.1.weight" in ck["G"]  # pix2pix key layouts
    gen = load_generator(str(tmp_path / "p2p" / "model.safetensors"))
    assert not gen.predicts_her2 and gen(tr[0].he[None, :64, :64]).shape == (1, 64, 64, 3)


def test_train_cli_bad_input(run_cli, tmp_path):
    code, out, err = run_cli("train", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert code == 2 and "missing" in err and out == ""
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli("train", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert code == 2 and "empty" in err
    code, _, err = run_cli("train", str(tmp_path / "empty"), "--synthetic", "4", "--out", str(tmp_path / "o"))
    assert code == 2 and "not both" in err
    code, _, err = run_cli("train", "synthetic", "--out", str(tmp_path / "o"), "--resume", "--synthetic", "1",
                           "--synthetic-size", "64", "--crop", "64", "--val", "0")
    assert code == 2 and "checkpoint" in err


def test_train_cli_json_on_a_bci_folder(run_cli, tmp_path, tiny_pairs):
    from PIL import Image

    tr, va = tiny_pairs
    for split, ps in (("train", tr), ("test", va)):
        for i, p in enumerate(ps):
            name = f"{i:05d}_{split}_{['0', '1+', '2+', '3+'][p.level]}.png"
            for stain_dir, img in (("HE", p.he), ("IHC", p.ihc)):
                d = tmp_path / "BCI" / stain_dir / split
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(d / name)
    code, out, err = run_cli("train", str(tmp_path / "BCI"), "--out", str(tmp_path / "run"), "--steps", "1",
                             "--batch", "1", "--crop", "64", "--gan-weight", "0", "--val", "1", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["steps"] == 1 and rep["metrics"]["n"] == 1 and rep["arch"] == "level_aware"
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_cell_reading_loss_reads_the_truth_as_the_scorer_and_counts_stained_cells():
    """With a hard threshold the loss's per-cell reading of a real-like IHC is the scorer's
    intensity on its tumour cells; an output with the membranes paled costs, the truth does not,
    and the gradient reaches the output."""
    import numpy as np

    from napari_bci.her2.scoring import analyse
    from napari_bci.train.losses import CellReadingLoss
    from napari_bci.train.loop import synthetic_pairs

    p = synthetic_pairs(1, 512, seed=424246, levels=("2+",))[0]
    _, ihc, _ = p.load()
    rings = CellReadingLoss.rings(ihc)
    _, _, _, intensity, tumour, _ = analyse(ihc, 0.5)
    real = torch.from_numpy(ihc).permute(2, 0, 1)[None].float() / 127.5 - 1
    hard = CellReadingLoss(tau=0.0)
    inten, comp = hard.read(hard.dab_map(real, rings), rings["key"], rings)
    read = np.asarray(tumour, bool) & (rings["counts"].numpy() > 0)  # a cell without ring pixels reads 0
    assert len(inten) == int(read.sum()) >= 200
    # equal up to the image border, which scipy's and torch's reflect padding treat differently
    assert np.allclose(inten.numpy(), np.asarray(intensity)[read], atol=5e-3)
    assert abs(float(inten.mean()) - float(np.asarray(intensity)[read].mean())) < 1e-4
    assert float((comp >= 0.4).float().mean()) > 0.3  # a 2+ case: most tumour cells stained
    loss = CellReadingLoss()
    assert float(loss(real, real, [rings["key"]], [rings])) == 0.0
    # pale the DAB: halve the optical density of every pixel
    pale = (255.0 * ((real + 1) / 2).clamp(min=1 / 255) ** 0.5 / 127.5 - 1).requires_grad_(True)
    cost = loss(pale, real, [rings["key"]], [rings])
    assert float(cost.detach()) > 1.0
    cost.backward()
    assert float(pale.grad.abs().sum()) > 0
