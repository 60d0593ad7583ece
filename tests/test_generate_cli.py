"""`napari-bci generate` on real slides to every kind of output, bad numbers, and one run per
output (regressions of the hardening issue)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile

from napari_bci.io.patches import read_patch


@pytest.mark.parametrize("src, out", [("CMU-1-Small-Region.svs", "o.png"), ("he_skin_10x.tif", "o.tif")])
def test_single_level_slides_to_image_outputs(run_cli, data_dir, tmp_path, src, out):
    """The slide used to be read after its file was closed (AssertionError, exit 1)."""
    code, stdout, err = run_cli("generate", data_dir / src, "--model", "baseline", "--out", tmp_path / out, "--json")
    assert code == 0, err
    rep = json.loads(stdout)
    img = read_patch(tmp_path / out)
    assert list(img.shape[:2]) == rep["shape"] and img.std() > 5  # tissue, not a blank
    assert sorted(p.name for p in tmp_path.iterdir()) == [out]  # nothing else left behind


def test_a_large_single_level_image_in_a_folder_becomes_a_tiled_slide(run_cli, data_dir, tmp_path):
    """A one-strip TIFF wider than 4096 px in a folder is tiled into an OME-TIFF (memory flat in
    its size) instead of being held whole for one PNG; a small image beside it stays a PNG."""
    src = tmp_path / "in"
    src.mkdir()
    he = read_patch(data_dir / "he_carcinoma_1000.png")
    wide = np.tile(he[:300], (1, 9, 1))[:, :8500]
    tifffile.imwrite(src / "wide.tif", wide, photometric="rgb")  # one strip, one level
    shutil.copy(data_dir / "he_tile_240.png", src)
    code, stdout, err = run_cli("generate", src, "--model", "baseline", "--out", tmp_path / "out", "--json",
                                "--all-tiles")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["he_tile_240.png", "wide.ome.tif"]
    with tifffile.TiffFile(tmp_path / "out" / "wide.ome.tif") as tf:
        assert tf.series[0].shape[:2] == (300, 8500) and tf.pages[0].is_tiled
    # asked for by name, a PNG of it is still one image
    code, stdout, err = run_cli("generate", src / "wide.tif", "--model", "baseline", "--out", tmp_path / "w.png")
    assert code == 0, err
    assert read_patch(tmp_path / "w.png").shape == (300, 8500, 3)


def test_jpeg_output_follows_quality(run_cli, data_dir, tmp_path):
    """``--quality`` reaches a .jpg image output (it used to be fixed at 95)."""
    sizes = {}
    for q in (30, 95):
        out = tmp_path / f"q{q}.jpg"
        code, _, err = run_cli("generate", data_dir / "he_tile_240.png", "--model", "baseline", "--out", out,
                               "--quality", str(q))
        assert code == 0, err
        sizes[q] = out.stat().st_size
        assert read_patch(out).shape == (240, 240, 3)
    assert sizes[30] < 0.6 * sizes[95]


def test_folder_of_slides_to_folder_output(run_cli, data_dir, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(data_dir / "CMU-1-Small-Region.svs", src)
    shutil.copy(data_dir / "he_tile_240.png", src)
    code, stdout, err = run_cli("generate", src, "--model", "baseline", "--out", tmp_path / "out", "--json")
    assert code == 0, err
    made = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "he_tile_240.png" in made and len(made) == 2
    for name in made:
        assert min(read_patch(tmp_path / "out" / name).shape[:2]) > 100


@pytest.mark.parametrize("flags, words", [
    (["--batch-size", "-1"], "--batch-size -1: must be at least 1"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--tile", "100000"], "--tile 100000: must be between 16 and"),
    (["--tile", "8"], "--tile 8"),
    (["--workers", "0"], "--workers 0"),
    (["--quality", "101"], "--quality 101"),
])
def test_bad_numbers_fail_at_once_with_one_line(run_cli, data_dir, tmp_path, flags, words):
    code, _, err = run_cli("generate", data_dir / "he_tile_240.png", "--model", "baseline",
                           "--out", tmp_path / "o.png", *flags)
    assert code == 2
    assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not any(tmp_path.iterdir())


@pytest.fixture
def small_slide(tmp_path, data_dir):
    from napari_bci.io.writers import write_pyramid

    canvas = np.full((768, 768, 3), 255, np.uint8)
    canvas[100:340, 200:440] = read_patch(data_dir / "he_tile_240.png")[..., :3]
    p = tmp_path / "he.ome.tif"
    write_pyramid(p, canvas, mpp=0.5, tile=256, compression="zlib")
    return p


def _lock(out, pid, host=None):
    lock = out.with_name(f".{out.name}.lock")
    lock.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": time.time()}))
    return lock


def test_a_second_run_on_the_same_output_refuses(run_cli, small_slide, tmp_path):
    out = tmp_path / "v.ome.tif"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = _lock(out, other.pid)
        code, _, err = run_cli("generate", small_slide, "--model", "baseline", "--out", out, "--tile", "256")
        assert code == 2 and f"PID {other.pid}" in err and "another napari-bci run" in err
        assert len(err.strip().splitlines()) == 1
        assert not out.exists() and lock.exists()  # the other run's lock is not touched
    finally:
        other.kill()
        other.wait()
    # that run is gone now: its lock is stale, the next run takes it over and releases it
    code, _, err = run_cli("generate", small_slide, "--model", "baseline", "--out", out, "--tile", "256")
    assert code == 0, err
    assert not lock.exists()
    with tifffile.TiffFile(out) as tf:
        assert tf.series[0].shape[:2] == (768, 768)


def test_a_lock_from_another_host_names_the_file_to_remove(run_cli, small_slide, tmp_path):
    out = tmp_path / "v.ome.tif"
    lock = _lock(out, 1, host="some-other-node")
    code, _, err = run_cli("generate", small_slide, "--model", "baseline", "--out", out, "--tile", "256")
    assert code == 2 and "some-other-node" in err and str(lock) in err


def test_the_learned_level_is_shown_beside_the_rule_based_one(run_cli, tmp_path):
    """A generator with a HER2 head (the built-in model) reports its level from the H&E and the
    rule-based level of its own generated IHC, and whether they agree."""
    from napari_bci.io.writers import write_image_atomic
    from napari_bci.samples.synthetic import make_pair

    pair = make_pair(her2="3+", size=640, seed=21)
    write_image_atomic(tmp_path / "he.png", pair.he)
    code, stdout, err = run_cli("generate", tmp_path / "he.png", "--model", "builtin", "--out", tmp_path / "o.png",
                                "--mpp", "0.5", "--json")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["her2_level"] in ("0", "1+", "2+", "3+")
    assert rep["her2_rule"] in ("0", "1+", "2+", "3+") or rep["her2_rule"].startswith("not assessable")
    assert isinstance(rep["her2_agree"], bool) or rep["her2_agree"] is None
    assert "learned" in rep["her2_compare"]
