"""Out-of-domain warning: the built-in model (trained on synthetic tissue) warns on real H&E and
names the published models for real tissue, in the headless check, the CLI and the Virtual IHC
widget; it stays silent on the package's own synthetic samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_bci.io import layers as L
from napari_bci.models.domain import check_domain, check_generator_domain, domain_stats, generator_domain
from napari_bci.models.registry import load_generator

MIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_her2_mist" / "HE"


@pytest.fixture(scope="module")
def builtin():
    return load_generator("builtin", device="cpu")


def _real(data_dir, name):
    from napari_bci.io.slide import open_slide

    with open_slide(data_dir / name) as s:
        return np.asarray(s.levels[0])


def _assert_names_real_models(msg):
    assert msg is not None and msg.startswith("out of domain")
    assert "synthetic" in msg and "BCIStainer" in msg and "ASP" in msg and "\n" not in msg


def test_builtin_records_its_training_domain(builtin):
    dom = generator_domain(builtin)
    assert dom is not None and dom["source"] == "synthetic" and dom["n"] >= 100
    assert np.asarray(dom["cov"]).shape == (len(dom["features"]),) * 2


@pytest.mark.parametrize("name", ["CMU-1-Small-Region.svs", "he_carcinoma_1000.png", "he_skin_10x.tif"])
def test_real_he_is_out_of_domain(builtin, data_dir, name):
    _assert_names_real_models(check_generator_domain(builtin, _real(data_dir, name)))


@pytest.mark.skipif(not MIST.is_dir(), reason="real MIST H&E tiles (../shared/data/real_her2_mist) not here")
def test_real_her2_mist_he_is_out_of_domain(builtin):
    from napari_bci.io.patches import read_patch

    files = sorted(MIST.glob("*.jpg"))
    assert files
    for f in files:
        _assert_names_real_models(check_generator_domain(builtin, read_patch(f)))


def test_synthetic_samples_are_in_domain(builtin):
    from napari_bci.samples.synthetic import make_pair
    from napari_bci.samples.wsi import make_wsi_pair

    for lv, seed in (("0", 424242), ("1+", 424243), ("2+", 424244), ("3+", 424245)):
        assert check_generator_domain(builtin, make_pair(lv, 768, seed=seed).he) is None
    # the synthetic whole slide (lazy level 0): the check picks a tissue-rich window itself
    assert check_generator_domain(builtin, make_wsi_pair(4096, seed=5, her2="3+").he_levels[0]) is None


def test_no_record_no_check_and_glass_is_not_judged(data_dir):
    from napari_bci.models.baseline import BaselineGenerator

    he = _real(data_dir, "he_carcinoma_1000.png")
    assert check_generator_domain(BaselineGenerator(), he) is None
    dom = domain_stats([he[:500, :500], he[500:, 500:], he[:500, 500:]], source="test")
    assert check_domain(np.full((600, 600, 3), 245, np.uint8), dom) is None  # blank glass: no tissue


def test_cli_warns_on_real_he_only(run_cli, data_dir, tmp_path):
    from napari_bci.io.writers import write_image_atomic
    from napari_bci.samples.synthetic import make_pair

    code, out, err = run_cli("generate", data_dir / "he_carcinoma_1000.png", "--out", tmp_path / "real.png")
    assert code == 0 and (tmp_path / "real.png").is_file()
    lines = [ln for ln in err.splitlines() if "out of domain" in ln]
    assert len(lines) == 1 and "BCIStainer" in lines[0] and "he_carcinoma_1000.png" in lines[0]

    synth = tmp_path / "synthetic_he.png"
    write_image_atomic(synth, make_pair("3+", 512, seed=424246).he)
    code, out, err = run_cli("generate", synth, "--out", tmp_path / "synth_ihc.png")
    assert code == 0 and "out of domain" not in err


def test_cli_warns_once_for_a_folder_of_real_he(run_cli, data_dir, tmp_path):
    """A BCI-style folder of real H&E patches gets the same one-line warning, naming a flagged
    image; a folder of synthetic patches none (the outputs are written either way)."""
    import shutil

    from napari_bci.io.writers import write_image_atomic
    from napari_bci.samples.synthetic import make_pair

    real = tmp_path / "HE_real"
    real.mkdir()
    shutil.copy(data_dir / "he_tile_240.png", real / "00000_test_2+.png")
    shutil.copy(data_dir / "he_carcinoma_1000.png", real / "00001_test_3+.png")
    code, out, err = run_cli("generate", real, "--out", tmp_path / "pred_real", "--json")
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if "out of domain" in ln]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "BCIStainer" in lines[0]
    assert "00000_test_2+.png and 1 more of the 2 images judged" in lines[0]
    rep = json.loads(out)
    assert rep["written"] == 2 and rep["out_of_domain"] == lines[0][len("warning: "):]

    synth = tmp_path / "HE_synth"
    synth.mkdir()
    for i, level in enumerate(("0", "3+")):
        write_image_atomic(synth / f"0000{i}_test_{level}.png", make_pair(level, 384, seed=424250 + i).he)
    code, out, err = run_cli("generate", synth, "--out", tmp_path / "pred_synth", "--json")
    assert code == 0 and "out of domain" not in err and "out_of_domain" not in json.loads(out)
    assert sorted(p.name for p in (tmp_path / "pred_synth").iterdir()) == ["00000_test_0.png", "00001_test_3+.png"]


def test_widget_notifies_and_keeps_a_note(make_napari_viewer, data_dir, qtbot):
    from napari.utils.notifications import notification_manager

    from napari_bci.samples.synthetic import make_pair
    from napari_bci.widgets.virtual_ihc import VirtualIHCWidget

    viewer = make_napari_viewer()
    data, attrs, _ = L.image_layer(_real(data_dir, "he_carcinoma_1000.png"), L.HE, mpp=0.5, role="he")
    viewer.add_image(data, **attrs)
    w = VirtualIHCWidget(viewer)
    qtbot.addWidget(w)
    w.model_combo.setCurrentText("builtin")
    before = len(notification_manager.records)
    assert w._ensure_engine()
    msgs = [str(r.message) for r in notification_manager.records[before:]]
    assert any("out of domain" in m and "BCIStainer" in m for m in msgs)
    assert "out of domain" in w.domain_label.text() and "ASP" in w.domain_label.text()

    viewer.layers.clear()
    data, attrs, _ = L.image_layer(make_pair("2+", 768, seed=424247).he, L.HE, mpp=0.5, role="he")
    viewer.add_image(data, **attrs)
    w.refresh_layers()
    assert w._ensure_engine()
    assert w.domain_label.text() == "" and w.domain_warning is None
