"""Generators: pix2pix key layout, checkpoint formats and safety, determinism, registry, CLI."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from _helpers import randomise_bn

from napari_bci import stain
from napari_bci.errors import CheckpointSecurityError, InputError, ModelError
from napari_bci.models import registry
from napari_bci.models.architectures import infer_config, register_arch, resnet_generator, unet_generator
from napari_bci.models.base import TorchGenerator
from napari_bci.models.registry import available, load_generator

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def he(data_dir):
    from napari_bci.io.patches import read_patch

    return read_patch(data_dir / "he_carcinoma_1000.png")


# Facts read off the reference implementation (pytorch-CycleGAN-and-pix2pix models/networks.py
# and its printed network summaries), not derived from our code.
REFERENCE = {
    # (builder kwargs) -> (number of state-dict entries, keys that must exist, parameters in
    # millions as the reference prints them: "Total number of parameters : 11.378 M")
    "resnet_9blocks/batch": (dict(kind="resnet", n_blocks=9, norm="batch"), 140,
                             ["model.1.weight", "model.2.running_mean", "model.10.conv_block.1.weight",
                              "model.10.conv_block.5.weight", "model.18.conv_block.6.num_batches_tracked",
                              "model.19.weight", "model.22.weight", "model.26.weight", "model.26.bias"],
                             11.383),
    "resnet_9blocks/instance": (dict(kind="resnet", n_blocks=9, norm="instance"), 48,
                                ["model.1.bias", "model.10.conv_block.1.bias", "model.26.bias"], 11.378),
    "resnet_6blocks/instance+dropout": (dict(kind="resnet", n_blocks=6, norm="instance", use_dropout=True), 36,
                                        ["model.10.conv_block.6.weight", "model.15.conv_block.6.bias",
                                         "model.16.weight", "model.23.weight"], 7.838),
    "unet_256/batch": (dict(kind="unet", num_downs=8, norm="batch"), None,
                       ["model.model.0.weight", "model.model.3.weight", "model.model.3.bias",
                        "model.model.1.model.2.running_mean",
                        "model.model.1.model.3.model.3.model.3.model.3.model.3.model.3.model.1.weight",
                        "model.model.1.model.3.model.3.model.3.model.3.model.3.model.3.model.4.running_var"],
                       54.414),
    "unet_128/instance": (dict(kind="unet", num_downs=7, norm="instance"), None,
                          ["model.model.1.model.1.bias",
                           "model.model.1.model.3.model.3.model.3.model.3.model.3.model.3.weight"], 41.826),
}


def _build(kind, **kw):
    if kind == "resnet":
        return resnet_generator(**kw)
    return unet_generator(**kw)


@pytest.mark.parametrize("name", list(REFERENCE))
def test_reference_key_layout_and_size(name):
    kw, n_keys, must, n_params = REFERENCE[name]
    kw = dict(kw)
    module = _build(kw.pop("kind"), **kw)
    sd = module.state_dict()
    if n_keys is not None:
        assert len(sd) == n_keys
    missing = [k for k in must if k not in sd]
    assert not missing
    assert round(sum(p.numel() for p in module.parameters()) / 1e6, 3) == n_params


ARCH_CASES = [
    ("resnet_9blocks", dict(kind="resnet", n_blocks=9, ngf=8, norm="batch", use_dropout=False)),
    ("resnet_9blocks", dict(kind="resnet", n_blocks=9, ngf=8, norm="instance", use_dropout=True)),
    ("resnet_6blocks", dict(kind="resnet", n_blocks=6, ngf=8, norm="batch", use_dropout=True)),
    ("resnet_6blocks", dict(kind="resnet", n_blocks=6, ngf=8, norm="instance", use_dropout=False)),
    ("unet_256", dict(kind="unet", num_downs=8, ngf=4, norm="batch", use_dropout=True)),
    ("unet_128", dict(kind="unet", num_downs=7, ngf=4, norm="instance", use_dropout=False)),
]


@pytest.mark.parametrize("arch,kw", ARCH_CASES, ids=[f"{a}-{k['norm']}-{'do' if k['use_dropout'] else 'nodo'}"
                                                     for a, k in ARCH_CASES])
def test_latest_net_G_loads_with_inferred_options(tmp_path, arch, kw):
    kw = dict(kw)
    torch.manual_seed(1)
    ref = randomise_bn(_build(kw.pop("kind"), **kw)).eval()
    folder = tmp_path / "experiment"
    folder.mkdir()
    torch.save(ref.state_dict(), folder / "latest_net_G.pth")

    gen = load_generator(folder)
    cfg = gen.config
    assert cfg["arch"] == arch
    assert cfg["ngf"] == kw["ngf"] and cfg["norm"] == kw["norm"]
    if arch.startswith("resnet"):  # U-Net dropout adds no weights and is off in eval anyway
        assert cfg["use_dropout"] == kw["use_dropout"]
    size = 256 if arch == "unet_256" else 128
    x = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    out = gen(x)
    with torch.no_grad():
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1
        expect = ((ref(t) + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    assert out.shape == x.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - expect.astype(int)).max() <= 1
    assert not gen.module.training


def test_dataparallel_and_nested_checkpoints(tmp_path):
    m = resnet_generator(ngf=4, n_blocks=2)
    torch.save({"state_dict": {"module." + k: v for k, v in m.state_dict().items()}}, tmp_path / "g.pth")
    gen = load_generator(tmp_path / "g.pth")
    assert gen.config["n_blocks"] == 2


def test_mismatch_names_keys_and_option(tmp_path):
    m = resnet_generator(ngf=4, n_blocks=3, norm="batch", use_dropout=False)
    torch.save(m.state_dict(), tmp_path / "g.pth")
    (tmp_path / "g.json").write_text(json.dumps({"arch": "resnet_3blocks", "ngf": 4, "norm": "batch",
                                                 "use_dropout": True}))
    with pytest.raises(ModelError) as e:
        load_generator(tmp_path / "g.pth")
    msg = str(e.value)
    assert "missing keys" in msg and "conv_block.6.weight" in msg
    assert "unexpected keys" in msg and "conv_block.5.weight" in msg
    assert "use_dropout=False" in msg and "dropout off" in msg


def test_not_a_generator_state_dict(tmp_path):
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "g.pth")
    with pytest.raises(ModelError, match="not a pix2pix"):
        load_generator(tmp_path / "g.pth")


def test_malicious_checkpoint_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    torch.save({"model.1.weight": torch.zeros(1), "x": Evil()}, tmp_path / "latest_net_G.pth")
    with pytest.raises(CheckpointSecurityError, match="refused to load"):
        load_generator(tmp_path / "latest_net_G.pth")
    assert not marker.exists()


def test_corrupt_and_missing_checkpoint(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"\x80\x02not a checkpoint at all")
    with pytest.raises((InputError, CheckpointSecurityError)) as e:
        load_generator(bad)
    assert str(bad) in str(e.value)
    with pytest.raises(InputError, match="no such checkpoint"):
        load_generator(tmp_path / "nope.pth")
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        load_generator("nope")


def test_deterministic_even_with_dropout(he):
    torch.manual_seed(0)
    m = resnet_generator(ngf=8, n_blocks=2, norm="batch", use_dropout=True)
    m.train()  # the reference test default; the wrapper must switch to eval
    gen = TorchGenerator(m, name="d", multiple=4)
    x = np.ascontiguousarray(he[:128, :128])[None]
    a, b = gen(x), gen(x)
    assert np.array_equal(a, b)
    assert a.std() > 0  # a real image came out, not a constant


def test_torchscript_checkpoint(tmp_path):
    torch.manual_seed(0)
    m = randomise_bn(resnet_generator(ngf=4, n_blocks=2)).eval()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    torch.jit.trace(m, x).save(str(tmp_path / "g.pt"))
    gen = load_generator(tmp_path / "g.pt", tile=128, halo=16)
    img = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    ref = TorchGenerator(m, name="r")(img)
    assert np.abs(gen(img).astype(int) - ref.astype(int)).max() <= 1
    assert gen.tile == 128 and gen.halo == 16


class _WithHead(torch.nn.Module):
    """A generator returning (image, her2 logits), as the level-aware model does."""

    def __init__(self, cfg):
        super().__init__()
        self.body = resnet_generator(ngf=cfg["ngf"], n_blocks=1)
        self.head = torch.nn.Linear(3, 4)

    def forward(self, x):
        return self.body(x), self.head(x.mean(dim=(2, 3)))


def test_safetensors_with_config_and_her2_head(tmp_path):
    from safetensors.torch import save_file

    register_arch("test_with_head", lambda cfg: _WithHead(cfg))
    torch.manual_seed(0)
    m = _WithHead({"ngf": 4})
    save_file(m.state_dict(), str(tmp_path / "model.safetensors"))
    cfg = {"arch": "test_with_head", "ngf": 4, "name": "headed", "tile": 192, "halo": 24, "mpp": 0.5,
           "description": "test model", "metrics": {"psnr": 1.0}}
    (tmp_path / "model.json").write_text(json.dumps(cfg))
    gen = load_generator(tmp_path)  # folder with model.safetensors
    assert (gen.name, gen.tile, gen.halo, gen.mpp) == ("headed", 192, 24, 0.5)
    assert gen.predicts_her2 and gen.info()["predicts_her2"]
    img = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    p = gen.predict_her2(img)
    assert p.shape == (3, 4) and np.allclose(p.sum(1), 1, atol=1e-5)
    assert gen(img).shape == img.shape
    # the JSON names the weights
    (tmp_path / "other.json").write_text(json.dumps({**cfg, "weights": "model.safetensors", "name": "viajson"}))
    assert load_generator(tmp_path / "other.json").name == "viajson"


def test_safetensors_without_config_infers_arch(tmp_path):
    from safetensors.torch import save_file

    m = unet_generator(num_downs=7, ngf=4, norm="batch")
    save_file(m.state_dict(), str(tmp_path / "u.safetensors"))
    gen = load_generator(tmp_path / "u.safetensors")
    assert gen.config["arch"] == "unet_128" and gen.multiple == 128


def test_baseline_counterstain_only(he):
    gen = load_generator("baseline")
    out = gen(he[None, :300, :300])[0]
    assert out.shape == (300, 300, 3)
    # no DAB anywhere, hematoxylin follows the input's
    assert stain.dab(out).mean() < 0.02
    h_in, h_out = stain.hematoxylin(he[:300, :300]).ravel(), stain.hematoxylin(out).ravel()
    assert np.corrcoef(h_in, h_out)[0, 1] > 0.8
    white = gen(np.full((1, 16, 16, 3), 255, np.uint8))
    assert white.min() >= 250


def test_builtin_missing_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "BUILTIN_WEIGHTS", tmp_path / "builtin.safetensors")
    monkeypatch.setattr(registry, "BUILTIN_CONFIG", tmp_path / "builtin.json")
    with pytest.raises(ModelError, match="built-in model is not installed"):
        load_generator("builtin")
    row = next(m for m in available() if m["name"] == "builtin")
    assert row["available"] is False
    assert registry.default_generator_name() == "baseline"


def test_register_custom_factory():
    from napari_bci.models.base import FunctionGenerator

    registry.register("invert-test", lambda device=None: FunctionGenerator(lambda t: 255 - t, name="invert-test",
                                                                           tile=64, halo=0),
                      tile=64, halo=0, predicts_her2=False)
    try:
        assert any(m["name"] == "invert-test" for m in available())
        g = load_generator("invert-test")
        assert g(np.zeros((1, 4, 4, 3), np.uint8)).min() == 255
        with pytest.raises(ModelError, match="already registered"):
            registry.register("invert-test", lambda device=None: None)
    finally:
        registry.unregister("invert-test")


def test_entry_point_plugin(tmp_path, monkeypatch):
    pkg = tmp_path / "bci_plugin_demo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        import numpy as np
        from napari_bci.models.base import Generator

        class Grey(Generator):
            name = "grey-plugin"
            tile = 128
            halo = 4
            mpp = 0.5
            description = "third-party test generator"

            def __call__(self, tiles):
                g = np.asarray(tiles).mean(axis=-1, keepdims=True).astype(np.uint8)
                return np.repeat(g, 3, axis=-1)
    """))
    dist = tmp_path / "bci_plugin_demo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: bci-plugin-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[napari_bci.generators]\ngrey-plugin = bci_plugin_demo:Grey\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = {m["name"]: m for m in available()}
    assert rows["grey-plugin"]["tile"] == 128 and rows["grey-plugin"]["mpp"] == 0.5
    assert "bci-plugin-demo" in rows["grey-plugin"]["source"]
    gen = load_generator("grey-plugin")
    out = gen(np.full((1, 8, 8, 3), (30, 60, 90), np.uint8))
    assert (out == 60).all()
    sys.modules.pop("bci_plugin_demo", None)


def test_cli_models_json(run_cli):
    code, out, err = run_cli("models", "--json")
    assert code == 0 and err == ""
    models = json.loads(out)["models"]
    names = [m["name"] for m in models]
    assert "baseline" in names and "builtin" in names
    for m in models:
        assert {"name", "tile", "halo", "predicts_her2"} <= set(m)


def test_cli_generate_folder_and_errors(run_cli, data_dir, tmp_path):
    import shutil

    from napari_bci.io.patches import read_patch

    src = tmp_path / "HE"
    src.mkdir()
    shutil.copy(data_dir / "he_tile_240.png", src / "00001_test_2+.png")
    shutil.copy(data_dir / "he_tumour_nuclei_500x300.jpg", src / "00002_test_0.jpg")
    out = tmp_path / "pred"
    code, stdout, err = run_cli("generate", src, "--model", "baseline", "--out", out, "--json", "--tile", "128")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["n"] == 2 and rep["model"] == "baseline"
    assert sorted(p.name for p in out.iterdir()) == ["00001_test_2+.png", "00002_test_0.png"]
    a = read_patch(out / "00001_test_2+.png")
    assert a.shape == (240, 240, 3)
    # the tiled CLI output equals the generator run on the whole image (baseline is pixel-wise)
    whole = load_generator("baseline")(read_patch(src / "00001_test_2+.png")[None])[0]
    assert np.array_equal(a, whole)

    # a folder run resumes: the outputs present are kept, as for a BCI root and for slides
    code, stdout, err = run_cli("generate", src, "--model", "baseline", "--out", out, "--json")
    assert code == 0 and json.loads(stdout)["kept"] == 2 and json.loads(stdout)["written"] == 0

    # an unreadable patch stops the run naming it (the outputs written stay whole), or with
    # --on-error skip is listed and the rest written
    (src / "00003_test_1+.png").write_bytes(b"not a png")
    code, stdout, err = run_cli("generate", src, "--model", "baseline", "--out", tmp_path / "p2", "--tile", "128")
    assert code == 2 and "00003_test_1+.png: not an image" in err and stdout == ""
    assert not (tmp_path / "p2" / "00003_test_1+.png").exists()
    assert all(read_patch(p).shape[2] == 3 for p in (tmp_path / "p2").iterdir())
    code, stdout, err = run_cli("generate", src, "--model", "baseline", "--out", tmp_path / "p3", "--json",
                                "--on-error", "skip")
    rep = json.loads(stdout)
    assert code == 0 and rep["written"] == 2 and [Path(f["file"]).name for f in rep["failed"]] == ["00003_test_1+.png"]
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"not a png")
    code, stdout, err = run_cli("generate", only_bad, "--model", "baseline", "--out", tmp_path / "p4",
                                "--on-error", "skip")
    assert code == 2 and "no image could be read" in err

    code, stdout, err = run_cli("generate", tmp_path / "missing", "--model", "baseline", "--out", out)
    assert code == 2 and "missing" in err and stdout == ""
    code, stdout, err = run_cli("generate", src, "--model", "no-such-model", "--out", out)
    assert code == 2 and "unknown model" in err


def test_cli_generate_image_with_checkpoint(run_cli, data_dir, tmp_path):
    from napari_bci.io.patches import read_patch

    torch.manual_seed(0)
    exp = tmp_path / "my_experiment"
    exp.mkdir()
    m = randomise_bn(resnet_generator(ngf=4, n_blocks=2))
    torch.save(m.state_dict(), exp / "latest_net_G.pth")
    out = tmp_path / "ihc.png"
    code, stdout, err = run_cli("generate", data_dir / "he_tile_240.png", "--model", exp, "--out", out,
                                "--device", "cpu", "--tile", "128", "--json")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["model"] == "my_experiment" and rep["tiles"] == 4
    res = read_patch(out)
    assert res.shape == (240, 240, 3) and res.std() > 0
    code, _, err = run_cli("generate", data_dir / "he_tile_240.png", "--model", exp, "--out", out,
                           "--device", "tpu")
    assert code == 2 and "unknown device 'tpu'" in err
