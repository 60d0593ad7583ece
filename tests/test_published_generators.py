"""Published BCI generators: BCIStainer and the CUT family load from their upstream file formats
and compute what the upstream code computes.

Fixtures (facts recorded from the upstream code, see tests/data/ATTRIBUTION.md):
``upstream_generator_keys.json`` (key names and shapes of the released configurations) and
``upstream_tiny/`` (tiny random-init checkpoints saved by the upstream code, with the upstream
outputs on a 64 px crop of a real H&E image, with and without TTA).
"""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_bci.cli import main
from napari_bci.errors import InputError, ModelError
from napari_bci.generate.engine import TileEngine
from napari_bci.models import bcistainer, cut
from napari_bci.models.base import FunctionGenerator, with_tta
from napari_bci.models.checkpoints import MAX_PARAMETERS, families, load_checkpoint

DATA = Path(__file__).parent / "data"
TINY = DATA / "upstream_tiny"
KEYS = json.loads((DATA / "upstream_generator_keys.json").read_text())
REF = np.load(TINY / "upstream_outputs.npz")


def _shapes(module) -> dict:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


# -- key layout -------------------------------------------------------------------------------------
@pytest.mark.parametrize("exp", ["stainer_basic_cmp/exp3", "stainer_basic_cmp/exp2", "cahr_defaults_attention"])
def test_bcistainer_layout_matches_upstream(exp):
    fact = KEYS["bcistainer"][exp]
    g = fact["config"]
    with torch.device("meta"):
        module = bcistainer.build({"name": g["name"], **g["params"]})
    assert _shapes(module) == fact["ema_model"]
    if "top_level" in fact:  # the released file: an ema_pytorch.EMA state dict
        assert fact["top_level"] == ["ema_model", "initted", "online_model", "step"]
        cfg = bcistainer.infer_config({k: torch.empty(s, device="meta") for k, s in fact["ema_model"].items()})
        for k in ("init_channels", "encoder1_blocks", "style_type", "style_blocks", "full_size", "levels"):
            assert cfg[k] == g["params"][k], k


@pytest.mark.parametrize("name", ["asp_bci_her2", "cut_default", "cut_batch_noaa"])
def test_cut_layout_matches_upstream(name):
    fact = KEYS["cut"][name]
    o = fact["options"]
    cfg = cut.config_from_opt(o)
    with torch.device("meta"):
        module = cut.build(cfg)
    assert _shapes(module) == fact["state_dict"]
    sd = {k: torch.empty(s, device="meta") for k, s in fact["state_dict"].items()}
    inferred = cut.infer_config(sd)
    for k in ("n_blocks", "ngf", "norm", "no_antialias", "no_antialias_up", "weight_norm"):
        assert inferred[k] == cfg[k], k


# -- numerics against the upstream outputs ------------------------------------------------------------
def test_bcistainer_ema_checkpoint_equals_upstream():
    gen = load_checkpoint(TINY / "bcistainer_tiny.pth")  # the YAML beside it supplies attention
    assert gen.family == "bcistainer" and gen.predicts_her2 and gen.window_dependent and gen.window == 64
    he = REF["he"]
    img, probs = gen.run(he[None])
    d = np.abs(img[0].astype(int) - REF["bcistainer_plain"].astype(int))
    assert d.max() <= 2 and d.mean() <= 0.25
    ref_p = torch.softmax(torch.from_numpy(REF["bcistainer_level"]).float(), 0).numpy()
    np.testing.assert_allclose(probs[0], ref_p, atol=1e-5)
    timg, _ = gen.run(he[None], tta=True)
    d = np.abs(timg[0].astype(int) - REF["bcistainer_tta"].astype(int))
    assert d.max() <= 2 and d.mean() <= 0.25
    # the EMA weights run, not the online ones (they differ in the file)
    sd = torch.load(TINY / "bcistainer_tiny.pth", weights_only=True)
    online = {k[len("online_model."):]: v for k, v in sd.items() if k.startswith("online_model.")}
    gen.module.load_state_dict(online)
    other, _ = gen.run(he[None])
    assert np.abs(other.astype(int) - REF["bcistainer_plain"].astype(int)).mean() > 1


def test_cut_checkpoint_with_train_opt_equals_upstream():
    gen = load_checkpoint(TINY / "cut_tiny")  # folder: latest_net_G.pth + train_opt.txt
    assert gen.family == "cut" and gen.config["weight_norm"] == "spectral" and gen.window_dependent
    he = REF["he"]
    d = np.abs(gen(he[None])[0].astype(int) - REF["cut_plain"].astype(int))
    assert d.max() <= 2 and d.mean() <= 0.25
    d = np.abs(with_tta(gen)(he[None])[0].astype(int) - REF["cut_tta"].astype(int))
    assert d.max() <= 2 and d.mean() <= 0.25


def test_spectral_norm_is_torch_eval_mode():
    """Our stored-vector spectral norm equals ``nn.utils.spectral_norm`` in eval mode."""
    torch.manual_seed(0)
    makers = (lambda: torch.nn.Conv2d(5, 7, 3, padding=1),
              lambda: torch.nn.ConvTranspose2d(5, 7, 3, stride=2, padding=1, output_padding=1))
    for make in makers:
        ref = torch.nn.utils.spectral_norm(make())
        x = torch.randn(2, 5, 9, 9)
        with torch.no_grad():
            for _ in range(3):
                ref(x)  # train-mode power iterations move u and v
        ref.eval()
        ours = cut.SpectralNormConv(make())
        ours.load_state_dict(ref.state_dict())
        assert set(ours.state_dict()) == {"weight_orig", "bias", "weight_u", "weight_v"}
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x))


def test_modconv_demodulates_per_sample():
    """ModConv2d equals a per-sample conv with the modulated, demodulated weight written out."""
    torch.manual_seed(1)
    m = bcistainer.ModConv2d(4, 6, 3, bias=True)
    with torch.no_grad():
        m.bias.normal_()
    x, style = torch.randn(3, 4, 8, 8), torch.randn(3, 4)
    with torch.no_grad():
        out = m((x, style))
        for i in range(3):
            w = m.weight.data / np.sqrt(4 * 9) * (style[i][None, :, None, None] + 1)
            w = w / torch.sqrt((w ** 2).sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
            ref = torch.nn.functional.conv2d(torch.nn.functional.pad(x[i:i + 1], (1,) * 4, mode="reflect"), w) + m.bias[None, :, None, None]
            torch.testing.assert_close(out[i:i + 1], ref, atol=1e-5, rtol=1e-5)


# -- engine: native window and blending ----------------------------------------------------------------
def test_engine_native_window_is_one_pass_and_larger_images_blend():
    gen = load_checkpoint(TINY / "bcistainer_tiny.pth")
    he = REF["he"]
    eng = TileEngine(gen, he)
    assert not eng.blend and eng.grid.halo == 0 and len(eng.grid) == 1
    d = np.abs(eng.compute_all().astype(int) - REF["bcistainer_plain"].astype(int))
    assert d.max() <= 2 and d.mean() <= 0.25
    big = np.tile(he, (3, 2, 1))[:160, :128]
    eng = TileEngine(gen, big)
    assert eng.blend and eng.grid.tile == 64
    out = eng.compute_all()
    assert out.shape == big.shape and out.std() > 1


def test_tta_of_a_plain_generator_averages_untransformed_outputs():
    ident = FunctionGenerator(lambda t: t, name="identity")
    tiles = np.random.default_rng(0).integers(0, 255, (2, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(ident.run(tiles, tta=True)[0], tiles)  # equivariant: unchanged
    ramp = FunctionGenerator(lambda t: np.broadcast_to(np.arange(16, dtype=np.uint8)[None, None, :, None] * 10,
                                                       t.shape).copy(), name="ramp")
    out = with_tta(ramp)(tiles)
    assert out.shape == tiles.shape and with_tta(ramp).name == "ramp+tta"
    assert np.ptp(out) < np.ptp(ramp(tiles))  # orientations averaged


# -- bad checkpoints: one line each ---------------------------------------------------------------------
def test_bcistainer_without_config_names_what_is_missing(tmp_path):
    (tmp_path / "model_best_psnr.pth").write_bytes((TINY / "bcistainer_tiny.pth").read_bytes())
    with pytest.raises(ModelError, match="attention cannot be read from the weights.*--model-config") as e:
        load_checkpoint(tmp_path / "model_best_psnr.pth")
    assert "\n" not in str(e.value)
    gen = load_checkpoint(tmp_path / "model_best_psnr.pth", config=TINY / "bcistainer_tiny.yaml")
    assert gen.config["attention"] is True


def test_mismatch_names_family_keys_and_option(tmp_path):
    import yaml

    cfg = yaml.safe_load((TINY / "bcistainer_tiny.yaml").read_text())
    cfg["G"]["params"]["style_type"] = "ada"
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ModelError) as e:
        load_checkpoint(TINY / "bcistainer_tiny.pth", config=tmp_path / "wrong.yaml")
    msg = str(e.value)
    assert "bcistainer" in msg and "missing keys" in msg and "unexpected keys" in msg
    assert "style_type='mod'" in msg and "\n" not in msg

    d = tmp_path / "cut"
    d.mkdir()
    (d / "latest_net_G.pth").write_bytes((TINY / "cut_tiny" / "latest_net_G.pth").read_bytes())
    opt = (TINY / "cut_tiny" / "train_opt.txt").read_text().replace("resnet_4blocks", "resnet_9blocks")
    (d / "train_opt.txt").write_text(opt)
    with pytest.raises(ModelError) as e:
        load_checkpoint(d)
    msg = str(e.value)
    assert msg.count("cut") >= 1 and "missing keys" in msg and "n_blocks=4" in msg


def test_huge_config_refused_before_allocating(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"config": json.dumps({"arch": "resnet_9blocks", "ngf": 100000})})
    assert path.stat().st_size < 400
    t = time.perf_counter()
    with pytest.raises(InputError, match=r"describes [\d,]+ parameters .*ngf=100000.*refused before allocating"):
        load_checkpoint(path)
    assert time.perf_counter() - t < 5

    import yaml

    cfg = yaml.safe_load((TINY / "bcistainer_tiny.yaml").read_text())
    cfg["G"]["params"]["init_channels"] = 4096
    (tmp_path / "huge.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(InputError, match=f"above the limit of {MAX_PARAMETERS:,}"):
        load_checkpoint(TINY / "bcistainer_tiny.pth", config=tmp_path / "huge.yaml")


def test_stride_zero_tensors_refused(tmp_path):
    sd = {"model.1.weight": torch.zeros(1).expand(64, 3, 7, 7), "model.1.bias": torch.zeros(64)}
    torch.save(sd, tmp_path / "latest_net_G.pth")
    assert (tmp_path / "latest_net_G.pth").stat().st_size < 10_000
    with pytest.raises(InputError, match=r"model\.1\.weight.*views only 4 bytes"):
        load_checkpoint(tmp_path / "latest_net_G.pth")


# -- CLI ---------------------------------------------------------------------------------------------------
def test_models_json_lists_families(capsys):
    assert main(["models", "--json"]) == 0
    fam = json.loads(capsys.readouterr().out)["families"]
    assert fam == families()
    assert fam["pix2pix"]["archs"] == ["resnet_9blocks", "resnet_6blocks", "unet_256", "unet_128"]
    assert fam["cut"]["archs"] == ["resnet_4blocks", "resnet_6blocks", "resnet_9blocks"]
    assert fam["bcistainer"]["archs"] == ["basic", "cahr"] and "YAML" in fam["bcistainer"]["needs"]


def test_generate_cli_tta_level_and_bad_config(tmp_path, capsys):
    from PIL import Image

    Image.fromarray(REF["he"]).save(tmp_path / "he.png")
    out = tmp_path / "ihc.png"
    rc = main(["generate", str(tmp_path / "he.png"), "--model", str(TINY / "bcistainer_tiny.pth"),
               "--model-config", str(TINY / "bcistainer_tiny.yaml"), "--tta", "--out", str(out), "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tta"] is True and res["her2_level"] in ("0", "1+", "2+", "3+")
    d = np.abs(np.asarray(Image.open(out)).astype(int) - REF["bcistainer_tta"].astype(int))
    assert d.max() <= 2 and d.mean() <= 0.25
    (tmp_path / "bad.yaml").write_text("G: [unclosed\n")
    rc = main(["generate", str(tmp_path / "he.png"), "--model", str(TINY / "bcistainer_tiny.pth"),
               "--model-config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "bad.yaml" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


# -- the Virtual IHC widget -----------------------------------------------------------------------------
@pytest.mark.gui
def test_virtual_ihc_widget_runs_bcistainer_with_tta_and_shows_its_level(make_napari_viewer, qtbot, data_dir):
    from napari_bci.io import layers as L
    from napari_bci.io.patches import read_patch
    from napari_bci.widgets.virtual_ihc import VirtualIHCWidget

    viewer = make_napari_viewer()
    he = read_patch(data_dir / "he_carcinoma_1000.png")
    data, attrs, _ = L.image_layer(he, L.HE, mpp=0.5, role="he")
    viewer.add_image(data, **attrs)
    w = VirtualIHCWidget(viewer)
    qtbot.addWidget(w)
    w.set_model(str(TINY / "bcistainer_tiny.pth"))
    w.tta_check.setChecked(True)
    cam = viewer.scene.camera
    cam.zoom = min(viewer.canvas.size) / (96 * 0.5)
    cam.center = (0, 400 * 0.5, 300 * 0.5)
    w.mode_combo.setCurrentText("This view only")
    w.start()
    qtbot.waitUntil(lambda: w.is_idle() and w.written and w.her2_probs is not None, timeout=60000)
    assert w.engine.blend and w.engine.generator.name.endswith("+tta")
    assert w.her2_label.text().startswith("Model's HER2 level")
    layer = w.output_layer
    assert layer.metadata["her2_model_level"]["level"] in ("0", "1+", "2+", "3+")
    np.testing.assert_allclose(sum(layer.metadata["her2_model_level"]["probabilities"]), 1, atol=1e-5)


def test_pix2pix_reads_train_opt(tmp_path):
    from napari_bci.models.architectures import resnet_generator

    torch.manual_seed(0)
    net = resnet_generator(ngf=4, n_blocks=2, norm="instance", use_dropout=True)
    torch.save(net.state_dict(), tmp_path / "latest_net_G.pth")
    opt = "\n".join(["----------------- Options ---------------", "                    model: pix2pix",
                     "                     netG: resnet_2blocks                \t[default: resnet_9blocks]",
                     "                      ngf: 4", "                     norm: instance",
                     "               no_dropout: False", "----------------- End -------------------"])
    (tmp_path / "train_opt.txt").write_text(opt + "\n")
    gen = load_checkpoint(tmp_path)
    assert gen.family == "pix2pix" and gen.config["use_dropout"] and gen.window_dependent
    assert gen.quantize == "truncate"  # tensor2im
    x = REF["he"][None, :32, :32]
    with torch.no_grad():
        ref = net.eval()(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1)
    np.testing.assert_array_equal(gen(x), np.floor((ref.clamp(-1, 1).permute(0, 2, 3, 1).numpy() + 1) / 2 * 255).astype(np.uint8))
    (tmp_path / "train_opt.txt").write_text(opt.replace("no_dropout: False", "no_dropout: True") + "\n")
    with pytest.raises(ModelError, match=r"pix2pix checkpoint does not fit.*use_dropout=True \(dropout on\)"):
        load_checkpoint(tmp_path)
