"""Whole-slide batch generation: pyramid output, tissue-only tiles, resume, folders, faults."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_bci.errors import Cancelled, ModelError
from napari_bci.models.baseline import BaselineGenerator
from napari_bci.generate.batch import (
    generate_folder,
    generate_slide,
    parts_dir,
    plan_slide,
    save_generated_layer,
    tissue_mask_image,
)
from napari_bci.io.writers import write_pyramid

TILE = 256
# where the real H&E patch sits on the white slide: rows 100:1100, cols 600:1600 of 1280 x 1792
Y0, Y1, X0, X1 = 100, 1100, 600, 1600


def _he(data_dir: Path) -> np.ndarray:
    from napari_bci.io.patches import read_patch

    return np.asarray(read_patch(data_dir / "he_carcinoma_1000.png"))[:1000, :1000, :3]


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory, request) -> Path:
    """A small real-H&E slide: the carcinoma patch on white glass, as a 4-level OME-TIFF, 0.5 um/px."""
    data_dir = Path(request.config.rootpath) / "tests" / "data"
    canvas = np.full((1280, 1792, 3), 255, np.uint8)
    canvas[Y0:Y1, X0:X1] = _he(data_dir)
    p = tmp_path_factory.mktemp("slide") / "he.ome.tif"
    write_pyramid(p, canvas, mpp=0.5, tile=TILE, compression="zlib")
    return p


@pytest.fixture(scope="module")
def reference(slide_path, tmp_path_factory) -> Path:
    """One uninterrupted single-process run (the output other runs must reproduce)."""
    out = tmp_path_factory.mktemp("ref") / "ref.ome.tif"
    generate_slide(slide_path, "baseline", out, tile=TILE, show_progress=False)
    return out


def _levels(path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tf:
        return [lv.asarray() for lv in tf.series[0].levels]


def _bytes_without_uuid(path) -> bytes:
    """File bytes with the OME-XML UUID (unique per file by definition) masked."""
    return re.sub(rb"urn:uuid:[0-9a-f-]{36}", b"urn:uuid:" + b"0" * 36, Path(path).read_bytes())


def _expected_tissue_tiles() -> set[tuple[int, int]]:
    ny, nx = -(-1280 // TILE), -(-1792 // TILE)
    return {(r, c) for r in range(ny) for c in range(nx)
            if r * TILE < Y1 and (r + 1) * TILE > Y0 and c * TILE < X1 and (c + 1) * TILE > X0}


def test_slide_output_records_its_model_and_source(reference, slide_path):
    from napari_bci.io import provenance

    made = provenance.read(reference)
    assert (made["virtual_ihc"], made["model"], made["source"]) == (True, "baseline", str(slide_path))
    assert made["out_of_domain"] is None  # the baseline records no training domain


def test_slide_cli_writes_tiled_compressed_pyramid(slide_path, tmp_path, run_cli, data_dir):
    out = tmp_path / "ihc.ome.tif"
    code, stdout, stderr = run_cli("generate", slide_path, "--model", "baseline", "--out", out,
                                   "--tile", TILE, "--json")
    assert code == 0, stderr
    rep = json.loads(stdout)
    expected = _expected_tissue_tiles()
    assert rep["tiles"] == 35 and rep["tissue_tiles"] == len(expected) == rep["computed"] < 35
    assert rep["mpp"] == pytest.approx(0.5)
    with tifffile.TiffFile(out) as tf:
        page = tf.series[0].pages[0]
        assert tf.is_ome and page.is_tiled and page.tilewidth == TILE
        assert page.compression != 1  # compressed (JPEG by default)
        shapes = [lv.shape[:2] for lv in tf.series[0].levels]
    assert shapes == [(1280, 1792), (640, 896), (320, 448), (160, 224)]
    from napari_bci.io.slide import open_slide

    with open_slide(out) as s:  # our reader: all levels, mpp preserved
        assert s.level_shapes == [list(x) for x in shapes] and s.mpp == pytest.approx(0.5)
        lv0 = np.asarray(s.levels[0])
    # background tiles are white; tissue tiles hold the generator's output (JPEG-close)
    for r in range(5):
        for c in range(7):
            t = lv0[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE]
            if (r, c) not in expected:
                assert t.min() >= 250
    he = _he(data_dir)
    direct = BaselineGenerator()(he[None])[0]
    got = lv0[Y0:Y1, X0:X1].astype(int)
    assert np.abs(got - direct).mean() < 3.0
    assert np.abs(got - 255).mean() > 20  # not blank


def test_tissue_mask_finds_tissue_and_ignores_glass(data_dir):
    he = _he(data_dir)
    glass = np.full((200, 300, 3), 245, np.uint8) + np.random.default_rng(0).integers(0, 6, (200, 300, 3)).astype(np.uint8)
    glass[50:150, 100:200] = he[:400:4, :400:4]
    m = tissue_mask_image(glass)
    assert m[60:140, 110:190].mean() > 0.9
    assert m[:40].mean() == 0 and m[:, :80].mean() == 0
    assert not tissue_mask_image(np.full((64, 64, 3), 250, np.uint8)).any()


def test_plan_selects_tissue_tiles(slide_path):
    plan = plan_slide(slide_path, BaselineGenerator(), tile=TILE)
    got = {tuple(map(int, i)) for i in zip(*np.nonzero(plan.tissue))}
    assert got == _expected_tissue_tiles()


class FailAfter(BaselineGenerator):
    """The baseline that raises after ``k`` calls (an injected crash)."""

    def __init__(self, k: int):
        super().__init__()
        self.k, self.calls = k, 0

    def __call__(self, tiles):
        self.calls += 1
        if self.calls > self.k:
            raise RuntimeError("injected failure")
        return super().__call__(tiles)


def test_resume_after_crash_gives_identical_output(slide_path, reference, tmp_path):
    out = tmp_path / "ihc.ome.tif"
    with pytest.raises(ModelError, match="injected failure"):
        generate_slide(slide_path, "baseline", out, tile=TILE, batch_size=2, generator=FailAfter(3),
                       show_progress=False)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    store = parts_dir(out)
    kept = list((store / "tiles").glob("*.zst"))
    assert len(kept) == 6  # 3 batches of 2 tiles finished before the crash
    prog = json.loads((store / "progress.json").read_text())
    assert prog["state"] == "failed" and prog["done"] == 6
    rep = generate_slide(slide_path, "baseline", out, tile=TILE, batch_size=2, show_progress=False)
    assert rep["resumed"] == 6 and rep["computed"] == rep["tissue_tiles"] - 6
    assert not store.exists()
    assert _bytes_without_uuid(out) == _bytes_without_uuid(reference)


def test_resume_after_cancel(slide_path, reference, tmp_path):
    out = tmp_path / "ihc.ome.tif"
    stop = threading.Event()
    seen = []

    def progress(done, total):
        seen.append((done, total))
        if done >= 5:
            stop.set()

    with pytest.raises(Cancelled):
        generate_slide(slide_path, "baseline", out, tile=TILE, batch_size=1, cancel=stop, progress=progress,
                       show_progress=False)
    assert not out.exists()
    n_kept = len(list((parts_dir(out) / "tiles").glob("*.zst")))
    assert 5 <= n_kept < len(_expected_tissue_tiles())
    seen.clear()
    rep = generate_slide(slide_path, "baseline", out, tile=TILE, progress=progress, show_progress=False)
    assert rep["resumed"] == n_kept and seen[0][0] == n_kept and seen[-1] == (rep["tissue_tiles"],) * 2
    assert _bytes_without_uuid(out) == _bytes_without_uuid(reference)


def test_changed_settings_discard_the_store(slide_path, tmp_path):
    out = tmp_path / "ihc.ome.tif"
    with pytest.raises(ModelError):
        generate_slide(slide_path, "baseline", out, tile=TILE, generator=FailAfter(1), show_progress=False)
    assert parts_dir(out).exists()
    rep = generate_slide(slide_path, "baseline", out, tile=128, show_progress=False)  # other grid
    assert rep["store_discarded"] and rep["resumed"] == 0


def test_failure_leaves_previous_output_untouched(slide_path, tmp_path):
    out = tmp_path / "ihc.ome.tif"
    out.write_bytes(b"previous result")
    with pytest.raises(ModelError):
        generate_slide(slide_path, "baseline", out, tile=TILE, generator=FailAfter(2), show_progress=False)
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ihc.ome.tif", "ihc.ome.tif.parts"]


def test_unwritable_output_is_a_clear_input_error(slide_path, tmp_path, run_cli):
    missing = tmp_path / "no" / "such" / "dir" / "x.ome.tif"
    code, _, err = run_cli("generate", slide_path, "--model", "baseline", "--out", missing)
    assert code == 2 and str(missing) in err and "does not exist" in err
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            code, _, err = run_cli("generate", slide_path, "--model", "baseline", "--out", ro / "x.ome.tif")
            assert code == 2 and "permission denied" in err
        finally:
            ro.chmod(0o700)


def test_disk_full_leaves_nothing_and_keeps_previous_output(slide_path, tmp_path):
    """A real write failure: the file-size limit (RLIMIT_FSIZE) hits the OME-TIFF mid-way."""
    out = tmp_path / "ihc.ome.tif"
    out.write_bytes(b"previous result")
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))\n"
        "from napari_bci.cli import main\n"
        f"sys.exit(main(['generate', {str(slide_path)!r}, '--model', 'baseline', '--out', {str(out)!r},"
        f" '--tile', '{TILE}', '--compression', 'zlib']))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    assert str(out) in p.stderr and ("file size limit" in p.stderr or "disk full" in p.stderr)
    assert "Traceback" not in p.stderr
    assert out.read_bytes() == b"previous result"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ihc.ome.tif", "ihc.ome.tif.parts"]


def _corrupt_tile(src: Path, dst: Path, tile_index: int) -> None:
    """Copy ``src`` with the compressed bytes of one level-0 tile overwritten by garbage."""
    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tf:
        page = tf.series[0].pages[0]
        off, n = page.dataoffsets[tile_index], page.databytecounts[tile_index]
    data[off:off + n] = bytes(np.random.default_rng(1).integers(0, 256, n, dtype=np.uint8))
    dst.write_bytes(bytes(data))


def test_corrupt_input_tile_stop_or_skip(slide_path, reference, tmp_path, run_cli):
    bad = tmp_path / "bad.ome.tif"
    _corrupt_tile(slide_path, bad, 2 * 7 + 4)  # tile row 2, col 4: inside the tissue
    out = tmp_path / "ihc.ome.tif"
    code, _, err = run_cli("generate", bad, "--model", "baseline", "--out", out, "--tile", TILE)
    assert code == 2 and "tile (2, 4)" in err and "x=1024:1280" in err and "y=512:768" in err
    assert not out.exists()
    code, stdout, err = run_cli("generate", bad, "--model", "baseline", "--out", out, "--tile", TILE,
                                "--on-error", "skip", "--json")
    assert code == 0, err
    rep = json.loads(stdout)
    assert [s["tile"] for s in rep["skipped"]] == [[2, 4]]
    assert rep["skipped"][0]["level0_x"] == 1024 and rep["skipped"][0]["level0_y"] == 512
    got, ref = _levels(out)[0], _levels(reference)[0]
    assert got[512:768, 1024:1280].min() >= 250  # filled white
    mask = np.ones(got.shape[:2], bool)
    mask[512:768, 1024:1280] = False
    assert np.array_equal(got[mask], ref[mask])


def test_progress_bar_and_callback(slide_path, tmp_path, capsys):
    calls = []
    generate_slide(slide_path, "baseline", tmp_path / "a.ome.tif", tile=TILE, show_progress=True,
                   progress=lambda d, t: calls.append((d, t)))
    err = capsys.readouterr().err
    n = len(_expected_tissue_tiles())
    assert f"{n}/{n}" in err and "tile/s" in err
    assert calls[0] == (0, n) and calls[-1] == (n, n)
    assert all(b[0] >= a[0] for a, b in zip(calls, calls[1:]))


def test_bci_folder_to_pngs_and_resume(data_dir, tmp_path, run_cli):
    he = _he(data_dir)
    root = tmp_path / "BCI"
    names = ["00000_test_1+.png", "00001_test_2+.png", "00002_test_0.png"]
    import imagecodecs

    for d in ("HE/test", "IHC/test"):
        (root / d).mkdir(parents=True)
    for i, n in enumerate(names):
        crop = np.ascontiguousarray(he[i * 200:i * 200 + 256, i * 100:i * 100 + 256])
        (root / "HE/test" / n).write_bytes(imagecodecs.png_encode(crop))
        (root / "IHC/test" / n).write_bytes(imagecodecs.png_encode(255 - crop))
    out = tmp_path / "pred"
    code, stdout, err = run_cli("generate", root, "--model", "baseline", "--out", out, "--json")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    pred = imagecodecs.png_decode((out / names[1]).read_bytes())
    src = imagecodecs.png_decode((root / "HE/test" / names[1]).read_bytes())
    assert np.array_equal(pred, BaselineGenerator()(src[None])[0])
    code, stdout, err = run_cli("generate", root, "--model", "baseline", "--out", out, "--json")
    rep = json.loads(stdout)
    assert code == 0 and rep["written"] == 0 and rep["kept"] == 3
    code, stdout, err = run_cli("evaluate", "--pred", out, "--gt", root / "IHC/test", "--json")
    if "invalid choice" not in err:  # the metrics area provides `evaluate`
        assert code == 0, err
        assert json.loads(stdout)["n"] == 3


def test_folder_of_slides_gives_ome_tiffs(slide_path, reference, tmp_path):
    d = tmp_path / "slides"
    d.mkdir()
    (d / "case1.ome.tif").write_bytes(slide_path.read_bytes())
    rep = generate_folder(sorted(d.iterdir()), "baseline", tmp_path / "out", tile=TILE, show_progress=False)
    assert rep["n"] == 1 and len(rep["slides"]) == 1
    out = tmp_path / "out" / "case1.ome.tif"
    assert all(np.array_equal(a, b) for a, b in zip(_levels(out), _levels(reference)))


def test_save_generated_layer_computes_missing_tiles(slide_path, reference, tmp_path):
    """The napari writer path: a viewer-made layer with some tiles is completed and saved."""
    ref0 = _levels(reference)[0]
    partial = np.full_like(ref0, 255)
    gen = BaselineGenerator()
    from napari_bci.io.slide import open_slide

    with open_slide(slide_path) as s:
        lv0 = np.asarray(s.levels[0])
    done = [[1, 3], [2, 4]]
    for r, c in done:  # what the viewer computed (exact, uncompressed)
        sl = np.s_[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE]
        partial[sl] = gen(lv0[sl][None])[0]
    meta = {"role": "generated", "source_path": str(slide_path), "model": "baseline", "source_level": 0,
            "tile": TILE, "halo": 0, "tiles_done": done}
    seen = []
    out = tmp_path / "saved.ome.tif"
    assert save_generated_layer(out, [partial], meta, progress=lambda d, t: seen.append(d)) == [str(out)]
    rep = save_generated_layer.last_report
    assert rep["reused"] == 2 and rep["computed"] == rep["tissue_tiles"] - 2
    assert seen[-1] == rep["tissue_tiles"]
    assert _bytes_without_uuid(out) == _bytes_without_uuid(reference)


def test_pages_layout_for_openslide(slide_path, reference, tmp_path, run_cli):
    """``--layout pages``: every level a tiled top-level page marked reduced (OpenSlide generic-tiff)."""
    out = tmp_path / "os.tif"
    code, _, err = run_cli("generate", slide_path, "--model", "baseline", "--out", out, "--tile", TILE,
                           "--layout", "pages")
    assert code == 0, err
    with tifffile.TiffFile(out) as tf:
        pages = list(tf.pages)
        assert len(pages) == 4 and all(p.is_tiled for p in pages)
        assert [int(p.subfiletype) for p in pages] == [0, 1, 1, 1]
        assert [p.shape[:2] for p in pages] == [(1280, 1792), (640, 896), (320, 448), (160, 224)]
    from napari_bci.io.slide import open_slide

    with open_slide(out) as s:
        assert s.native_levels == 4 and s.mpp == pytest.approx(0.5)
        assert np.array_equal(np.asarray(s.levels[0]), _levels(reference)[0])


def test_save_generated_layer_shows_napari_progress(slide_path, tmp_path):
    """The npe2 front end saves a generated layer with napari's progress bar (the core only takes a
    callback)."""
    from napari.utils import progress

    from napari_bci._npe2 import save_generated

    finished = []

    def on_change(event):
        finished.extend((p.desc, p.n, p.total) for p in event.removed)

    progress._all_instances.events.changed.connect(on_change)
    try:
        meta = {"role": "generated", "source_path": str(slide_path), "model": "baseline", "tile": TILE}
        out = tmp_path / "g.ome.tif"
        save_generated(str(out), [np.full((1280, 1792, 3), 255, np.uint8)], meta)
    finally:
        progress._all_instances.events.changed.disconnect(on_change)
    n = len(_expected_tissue_tiles())
    assert ("Saving g.ome.tif", n, n) in finished


def test_npe2_writer_completes_a_generated_layer(slide_path, reference, tmp_path):
    """The plugin's OME-TIFF writer hands a generated layer (with its source in the metadata) to
    ``save_generated_layer``: the saved file is the whole slide, as the CLI writes it."""
    from napari_bci._npe2 import write_ome_tiff

    meta = {"role": "generated", "source_path": str(slide_path), "model": "baseline", "generation_level": 0,
            "tile": TILE, "tiles_done": []}
    out = tmp_path / "layer.ome.tif"
    blank = np.full((1280, 1792, 3), 255, np.uint8)
    assert write_ome_tiff(str(out), [blank], {"name": "IHC (generated: baseline)", "metadata": meta}) == [str(out)]
    assert _bytes_without_uuid(out) == _bytes_without_uuid(reference)


def test_npe2_writer_keeps_a_reopened_virtual_ihc_a_virtual_ihc(reference, tmp_path):
    """A generated file opened in napari (no source to complete it from) and saved again keeps
    its provenance; an H&E layer saved the same way gets none."""
    from napari_bci._npe2 import read_paths, write_ome_tiff
    from napari_bci.io import provenance

    [(data, attrs, _)] = read_paths(str(reference))
    assert attrs["metadata"]["role"] == "generated" and "source_path" not in attrs["metadata"]
    out = tmp_path / "again.ome.tif"
    assert write_ome_tiff(str(out), data, attrs) == [str(out)]
    assert provenance.read(out) == provenance.read(reference)
    he = tmp_path / "he.ome.tif"
    write_ome_tiff(str(he), data, {"name": "H&E", "metadata": {"role": "he"}})
    assert provenance.read(he) is None
