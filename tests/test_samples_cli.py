"""``napari-bci sample`` and the sample-data menu entries."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_bci.io.layers import HE, IHC_TRUTH
from napari_bci.transform import Transform


def test_sample_bci_writes_images_truth_and_cells(run_cli, tmp_path):
    out = tmp_path / "bci"
    code, stdout, stderr = run_cli("sample", "bci-3+", "--out", out, "--size", "160", "--seed", "4", "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["her2"] == "3+"
    for f in report["files"]:
        assert Path(f).exists()
    he = np.asarray(Image.open(out / "he.png"))
    ihc = np.asarray(Image.open(out / "ihc.png"))
    assert he.shape == ihc.shape == (160, 160, 3)
    truth = json.loads((out / "truth.json").read_text())
    assert truth["her2"] == "3+" and truth["mpp"] == 0.5 and truth["seed"] == 4
    t = Transform.load(out / truth["transform_file"])
    assert t.field is not None
    rows = list(csv.DictReader((out / "cells.csv").open()))
    assert len(rows) == truth["cells"]["total"] > 0
    # the saved transform reproduces the saved IHC centroids
    he_xy = np.array([[float(r["he_x"]), float(r["he_y"])] for r in rows])
    ihc_xy = np.array([[float(r["ihc_x"]), float(r["ihc_y"])] for r in rows])
    assert np.abs(t.forward(he_xy) - ihc_xy).max() < 0.01
    # no temporary files left behind
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    # same seed, same bytes
    out2 = tmp_path / "bci2"
    assert run_cli("sample", "bci-3+", "--out", out2, "--size", "160", "--seed", "4")[0] == 0
    assert (out2 / "he.png").read_bytes() == (out / "he.png").read_bytes()


def test_sample_wsi_pair_writes_pyramids(run_cli, tmp_path):
    code, stdout, stderr = run_cli("sample", "wsi-pair", "--out", tmp_path, "--size", "1024", "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["levels"] == [[1024, 1024], [512, 512]]
    for name in ("he.ome.tif", "ihc.ome.tif"):
        with tifffile.TiffFile(tmp_path / name) as tf:
            levels = tf.series[0].levels
            assert [lv.shape[:2] for lv in levels] == [(1024, 1024), (512, 512)]
            img = levels[0].asarray()
        assert img.dtype == np.uint8 and img.std() > 5
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert Transform.load(tmp_path / "transform.json").matrix.shape == (3, 3)
    assert truth["levels"][0] == [1024, 1024]


def test_sample_cmu_small_copies_the_real_slide(run_cli, tmp_path, data_dir):
    code, stdout, stderr = run_cli("sample", "cmu-small", "--out", tmp_path, "--json")
    assert code == 0, stderr
    copied = tmp_path / "CMU-1-Small-Region.svs"
    ref = data_dir / "CMU-1-Small-Region.svs"
    assert hashlib.sha256(copied.read_bytes()).digest() == hashlib.sha256(ref.read_bytes()).digest()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["sample", "bci-5+", "--out", "X"], "unknown sample"),
        (["sample", "wsi-pair", "--out", "X", "--size", "100"], "at least 512"),
        (["sample", "bci-0", "--out", "X", "--mpp", "0"], "must be positive"),
    ],
)
def test_sample_bad_input_exits_2(run_cli, tmp_path, args, fragment):
    args = [str(tmp_path / a) if a == "X" else a for a in args]
    code, stdout, stderr = run_cli(*args)
    assert code == 2
    assert fragment in stderr and stdout == ""
    assert len(stderr.strip().splitlines()) == 1


def test_sample_out_is_a_file_exits_2(run_cli, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    code, _, stderr = run_cli("sample", "bci-0", "--out", f)
    assert code == 2 and "not a directory" in stderr


def test_npe2_bci_samples_return_named_pairs():
    from napari_bci import _npe2

    layers = _npe2.pair_layers("1+", size=128, seed=2)
    (he, he_meta, he_kind), (ihc, ihc_meta, ihc_kind) = layers
    assert he_kind == ihc_kind == "image"
    assert he_meta["name"] == HE and ihc_meta["name"] == IHC_TRUTH
    assert he_meta["metadata"]["role"] == "he" and ihc_meta["metadata"]["role"] == "ihc"
    for meta in (he_meta, ihc_meta):
        md = meta["metadata"]
        assert md["her2"] == "1+" and md["mpp"] == 0.5 and md["format"] == "synthetic"
        assert md["truth"].her2 == "1+"
        assert meta["scale"] == (0.5, 0.5) and meta["rgb"]
    assert he.shape == (128, 128, 3)
    assert callable(_npe2.bci_0) and callable(_npe2.bci_3)


def test_npe2_wsi_and_cmu_samples():
    from napari_bci import _npe2

    (he, he_meta, _), (ihc, ihc_meta, _) = _npe2.wsi_pair(size=2048)
    assert he_meta["multiscale"] and isinstance(he, list) and he[0].shape == (2048, 2048, 3)
    assert ihc_meta["name"] == IHC_TRUTH and ihc_meta["metadata"]["her2"] == "2+"
    assert ihc_meta["metadata"]["truth"].transform is not None
    [(cmu, cmu_meta, _)] = _npe2.cmu_small()
    assert cmu_meta["name"] == HE and cmu_meta["metadata"]["role"] == "he"
    assert abs(cmu_meta["metadata"]["mpp"] - 0.499) < 0.01
    shape = cmu[0].shape if isinstance(cmu, list) else cmu.shape
    assert tuple(shape[:2]) == (2967, 2220)
