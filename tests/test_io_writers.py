"""Pyramidal OME-TIFF writer: round trips, layouts, streaming sources, atomicity."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_bci.errors import Cancelled, InputError
from napari_bci.io.slide import open_slide
from napari_bci.io.writers import pyramid_shapes, write_pyramid


def box2(a):
    h, w = a.shape[0] // 2, a.shape[1] // 2
    return np.floor(a[: 2 * h, : 2 * w].astype(float).reshape(h, 2, w, 2, 3).mean(axis=(1, 3)) + 0.5).astype(np.uint8)


@pytest.fixture(scope="module")
def cmu(data_dir):
    with open_slide(data_dir / "CMU-1-Small-Region.svs") as s:
        return s.read_region(0, 0, 0, *s.shape[:2])


def test_lossless_round_trip_levels_and_mpp(data_dir, cmu, tmp_path):
    out = tmp_path / "cmu.ome.tif"
    with open_slide(data_dir / "CMU-1-Small-Region.svs") as src:
        write_pyramid(out, src, tile=256, compression="zstd")
    with tifffile.TiffFile(out) as tf:
        assert tf.is_ome
        s0 = tf.series[0]
        assert s0.is_pyramidal and len(s0.levels) == 5
        assert len(tf.pages) == 1 and len(tf.pages[0].subifds) == 4  # levels live in SubIFDs
        assert 'PhysicalSizeX="0.499"' in tf.ome_metadata and "µm" in tf.ome_metadata
        p0 = tf.pages[0]
        assert p0.is_tiled and p0.tilelength == 256 and p0.compression == 50000
        assert p0.tags["ResolutionUnit"].value == 3
        xr = p0.tags["XResolution"].value
        assert 1e4 / (xr[0] / xr[1]) == pytest.approx(0.499, rel=1e-6)
        direct = [tifffile.imread(out, series=0, level=k) for k in range(5)]
    np.testing.assert_array_equal(direct[0], cmu)
    expect = cmu
    for k in range(1, 5):
        expect = box2(expect)
        np.testing.assert_array_equal(direct[k], expect)
    with open_slide(out) as s:
        assert s.format == "ome-tiff" and s.mpp == pytest.approx(0.499)
        assert s.level_shapes == [list(x) for x in pyramid_shapes(cmu.shape[:2], 256)]
        assert s.metadata["synthesised_levels"] == 0


def test_jpeg_within_tolerance(cmu, tmp_path):
    out = tmp_path / "cmu_jpeg.ome.tif"
    write_pyramid(out, cmu, tile=512, compression="jpeg", quality=90, mpp=0.499)
    with open_slide(out) as s:
        back = s.read_region(0, 0, 0, *cmu.shape[:2])
        assert len(s.levels) == 4
    mse = np.mean((back.astype(float) - cmu) ** 2)
    assert 10 * np.log10(255**2 / mse) > 32
    assert out.stat().st_size < cmu.nbytes / 5


def test_pages_layout_is_generic_tiff(cmu, tmp_path):
    out = tmp_path / "cmu_pages.tif"
    write_pyramid(out, cmu[:1000, :1200], tile=256, compression="zlib", layout="pages", mpp=0.25)
    with tifffile.TiffFile(out) as tf:
        assert not tf.is_ome
        assert [p.shape[:2] for p in tf.pages] == [(1000, 1200), (500, 600), (250, 300), (125, 150)]
        assert [p.subfiletype for p in tf.pages] == [0, 1, 1, 1]
    with open_slide(out) as s:
        assert s.format == "tiff" and s.native_levels == 4 and s.mpp == pytest.approx(0.25)
        np.testing.assert_array_equal(s.read_region(1, 0, 0, 500, 600), box2(cmu[:1000, :1200]))


def test_callable_and_iterator_sources_stream_tiles(tmp_path):
    H, W, T = 700, 1100, 256
    img = np.random.default_rng(3).integers(0, 256, (H, W, 3), dtype=np.uint8)
    calls = []

    def tile(y, x, h, w):
        calls.append((y, x, h, w))
        return img[y:y + h, x:x + w]

    def tiles():
        for y in range(0, H, T):
            for x in range(0, W, T):
                yield img[y:y + T, x:x + T]

    a, b = tmp_path / "a.ome.tif", tmp_path / "b.ome.tif"
    write_pyramid(a, tile, shape=(H, W), tile=T, compression="zlib", mpp=0.5)
    write_pyramid(b, tiles(), shape=(H, W), tile=T, compression="zlib", mpp=0.5)
    assert len(calls) == len(set(calls)) == 3 * 5  # each level-0 tile generated exactly once
    assert calls[:5] == [(0, x, T, min(T, W - x)) for x in range(0, W, T)]  # row-major
    for p in (a, b):
        with open_slide(p) as s:
            assert s.level_shapes == [[700, 1100], [350, 550], [175, 275], [87, 137]]
            np.testing.assert_array_equal(s.read_region(0, 0, 0, H, W), img)
            np.testing.assert_array_equal(s.read_region(2, 0, 0, 175, 275), box2(box2(img)))


def test_list_of_dask_levels_written_as_given(data_dir, tmp_path):
    with open_slide(data_dir / "CMU-1-Small-Region.pyramid.ome.tif") as src:
        out = write_pyramid(tmp_path / "copy.ome.tif", src.levels, compression="zlib", tile=256, mpp=src.mpp)
        ref = [np.asarray(a) for a in src.levels]
    with open_slide(out) as s:
        assert s.level_shapes == [list(r.shape[:2]) for r in ref]
        for k, r in enumerate(ref):
            np.testing.assert_array_equal(np.asarray(s.levels[k]), r)


def test_progress_and_cancel(cmu, tmp_path):
    seen = []
    out = tmp_path / "p.ome.tif"
    write_pyramid(out, cmu[:600, :600], tile=256, compression="zlib", progress=lambda d, t: seen.append((d, t)))
    total = 9 + 4 + 1
    assert seen[-1] == (total, total) and len(seen) == total
    n = []
    with pytest.raises(Cancelled):
        write_pyramid(tmp_path / "c.ome.tif", cmu[:600, :600], tile=256, cancel=lambda: n.append(1) or len(n) > 3)
    assert not (tmp_path / "c.ome.tif").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.ome.tif"]


def test_failure_leaves_existing_output_untouched(cmu, tmp_path):
    out = tmp_path / "keep.ome.tif"
    out.write_bytes(b"previous result")

    def tile(y, x, h, w):
        if y >= 512:
            raise RuntimeError("generator failed")
        return cmu[y:y + h, x:x + w]

    with pytest.raises(RuntimeError, match="generator failed"):
        write_pyramid(out, tile, shape=(1000, 1000), tile=256)
    assert out.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.ome.tif"]  # no temp or spill files left


def test_bad_tiles_and_paths(tmp_path):
    with pytest.raises(ValueError, match="tile at y=0, x=0"):
        write_pyramid(tmp_path / "x.ome.tif", lambda y, x, h, w: np.zeros((h, w), np.uint8), shape=(100, 100))
    with pytest.raises(ValueError, match="ended early"):
        write_pyramid(tmp_path / "x.ome.tif", iter([np.zeros((64, 64, 3), np.uint8)]), shape=(100, 100), tile=64)
    with pytest.raises(InputError, match="does not exist"):
        write_pyramid(tmp_path / "no" / "x.ome.tif", np.zeros((10, 10, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_memory_does_not_grow_with_slide_height(tmp_path):
    import tracemalloc

    W, T = 2048, 256
    base = np.random.default_rng(0).integers(0, 256, (T, T, 3), dtype=np.uint8)

    def peak(H):
        tracemalloc.start()
        write_pyramid(tmp_path / f"h{H}.ome.tif", lambda y, x, h, w: base[:h, :w], shape=(H, W), tile=T,
                      compression=None)
        p = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return p

    peak(512)  # warm-up (imports, codec state)
    small, big = peak(2048), peak(8192)  # 12.6 MB and 50 MB of pixels
    assert big < 1.25 * small + 2**20, (small, big)
    assert big < 8192 * W * 3 / 3, big  # a few tile rows, never the level


def test_openslide_reads_written_pyramids(cmu, tmp_path):
    openslide = pytest.importorskip("openslide")
    pages = write_pyramid(tmp_path / "os.tif", cmu[:1000, :1200], tile=256, layout="pages", mpp=0.5)
    ome = write_pyramid(tmp_path / "os.ome.tif", cmu[:1000, :1200], tile=256, mpp=0.5)
    with openslide.OpenSlide(str(pages)) as o:
        assert o.level_count == 4 and o.level_dimensions[1] == (600, 500)
        assert float(o.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        region = np.asarray(o.read_region((256, 512), 0, (300, 200)))[..., :3]
    assert np.abs(region.astype(int) - cmu[512:712, 256:556]).mean() < 4
    with openslide.OpenSlide(str(ome)) as o:  # SubIFD levels are invisible to OpenSlide: level 0 only
        assert o.level_count == 1 and o.level_dimensions[0] == (1200, 1000)


# --- write_image_atomic: the one atomic single-image writer -------------------------------------

def _smooth(h=64, w=80):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 3, y * 3, x + y], -1).astype(np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".tif", ".jpg"])
def test_write_image_atomic_round_trip_mode_and_no_temporaries(tmp_path, suffix):
    import os
    import stat

    from napari_bci.io.patches import read_patch
    from napari_bci.io.writers import write_image_atomic

    img = _smooth()
    out = write_image_atomic(tmp_path / f"o{suffix}", img)
    back = read_patch(out)
    err = np.abs(back.astype(int) - img)
    assert (err.mean() < 2 and err.max() <= 12) if suffix == ".jpg" else err.max() == 0
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o644 & ~_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def _umask():
    import os

    m = os.umask(0)
    os.umask(m)
    return m


def test_write_image_atomic_bad_targets_name_the_file_and_leave_nothing(tmp_path):
    import os

    from napari_bci.io.writers import write_image_atomic

    img = _smooth()
    with pytest.raises(InputError, match=r"nope/o\.png: cannot write: the directory does not exist"):
        write_image_atomic(tmp_path / "nope" / "o.png", img)
    with pytest.raises(InputError, match=r"o\.bmp: unsupported output type"):
        write_image_atomic(tmp_path / "o.bmp", img)
    # an image JPEG cannot hold fails before any file exists
    with pytest.raises(InputError, match=r"o\.jpg: JPEG is limited to 65535 px"):
        write_image_atomic(tmp_path / "o.jpg", np.zeros((1, 70000, 3), np.uint8))
    with pytest.raises(InputError, match=r"o\.png: cannot write a \(4, 4, 7\)"):
        write_image_atomic(tmp_path / "o.png", np.zeros((4, 4, 7), np.uint8))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(InputError, match=r"o\.png: cannot write: .*x\.txt is not a folder"):
        write_image_atomic(tmp_path / "x.txt" / "o.png", img)
    ro = _unwritable_folder(tmp_path)
    with pytest.raises(InputError, match=r"o\.tif: cannot write: (permission denied|read-only file system)"):
        write_image_atomic(ro / "o.tif", img)
    assert not (ro / "o.tif").exists()


def _unwritable_folder(tmp_path):
    """A folder no file can be created in: mode 0555, or (as root, who ignores modes) /sys."""
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if not os.access(ro, os.W_OK):
        return ro
    sysfs = __import__("pathlib").Path("/sys")
    try:
        os.close(os.open(sysfs / ".napari-bci-probe", os.O_WRONLY | os.O_CREAT, 0o644))
    except OSError:
        return sysfs
    pytest.skip("no unwritable folder available")


def test_existing_file_kept_when_a_write_fails(tmp_path):
    from napari_bci.io.writers import write_image_atomic

    out = write_image_atomic(tmp_path / "o.jpg", _smooth())
    before = out.read_bytes()
    with pytest.raises(InputError):
        write_image_atomic(out, np.zeros((1, 70000, 3), np.uint8))
    assert out.read_bytes() == before


def test_successful_write_removes_temporaries_of_dead_runs_only(tmp_path):
    import subprocess
    import sys

    from napari_bci.io.writers import temp_path, write_image_atomic

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    out = tmp_path / "o.png"
    stale = tmp_path / f".o.png.{dead}-0123abcd.tmp"
    stale.write_bytes(b"half a png")
    live = temp_path(out)  # this process: a run in progress
    live.write_bytes(b"being written")
    other = tmp_path / f".other.png.{dead}-0123abcd.tmp"
    other.write_bytes(b"not ours")
    write_image_atomic(out, _smooth())
    assert not stale.exists() and live.exists() and other.exists()


def test_the_forced_exit_list_keeps_only_temporaries_still_in_use(tmp_path):
    """A long napari session writes many files: once renamed or removed, a temporary leaves the
    list that a forced exit (the CLI's SIGTERM grace) cleans up."""
    from napari_bci.io import writers

    live = writers.temp_path(tmp_path / "busy.png")  # a write still in progress
    writers.write_image_atomic(tmp_path / "a.png", _smooth())
    writers.write_pyramid(tmp_path / "b.ome.tif", np.zeros((300, 200, 3), np.uint8), tile=128)
    with writers.atomic_output(tmp_path / "c.txt") as f:
        f.write("x")
    with pytest.raises(RuntimeError), writers.atomic_output(tmp_path / "d.txt") as f:
        raise RuntimeError("failed half way")
    assert {p for p in writers._OWN_TEMPS if p.parent == tmp_path} == {live}
    live.write_bytes(b"half")
    assert live in writers.remove_own_temps() and not live.exists()


@pytest.mark.parametrize("suffix", [".png", ".tif", ".jpg"])
def test_a_virtual_ihc_file_carries_its_provenance(tmp_path, suffix):
    """The record (model, source H&E, out-of-domain warning) is stored in the file itself and
    read back; the image still decodes as before, with another library too (Pillow)."""
    from PIL import Image

    from napari_bci.io import provenance
    from napari_bci.io.patches import read_patch
    from napari_bci.io.writers import write_image_atomic

    img = _smooth()
    rec = provenance.record("builtin", tmp_path / "he.png", "out of domain: this H&E is unlike ...")
    out = write_image_atomic(tmp_path / f"o{suffix}", img, provenance=rec)
    assert provenance.read(out) == rec and rec["virtual_ihc"] and rec["source"].endswith("he.png")
    err = np.abs(read_patch(out).astype(int) - img)
    assert (err.mean() < 2 and err.max() <= 12) if suffix == ".jpg" else err.max() == 0
    with Image.open(out) as im:
        assert np.abs(np.asarray(im.convert("RGB")).astype(int) - read_patch(out)).max() <= 2
    plain = write_image_atomic(tmp_path / f"plain{suffix}", img)
    assert provenance.read(plain) is None


@pytest.mark.parametrize("layout", ["subifd", "pages"])
def test_a_virtual_ihc_pyramid_carries_its_provenance(cmu, tmp_path, layout):
    from napari_bci.io import provenance

    rec = provenance.record("baseline", "/slides/he.svs", None)
    out = write_pyramid(tmp_path / ("o.ome.tif" if layout == "subifd" else "o.tif"), cmu, mpp=0.5, tile=256,
                        compression="zlib", layout=layout, provenance=rec)
    assert provenance.read(out) == rec
    with open_slide(out) as s:  # levels and pixel size as without it
        assert len(s.levels) == len(pyramid_shapes(cmu.shape[:2], 256)) and s.mpp == pytest.approx(0.5)
        assert np.array_equal(np.asarray(s.levels[0]), cmu)
    assert provenance.read(write_pyramid(tmp_path / "plain.ome.tif", cmu, tile=256)) is None


def test_damaged_or_foreign_files_have_no_provenance(tmp_path, data_dir):
    from napari_bci.io import provenance
    from napari_bci.io.writers import write_image_atomic

    rec = provenance.record("builtin")
    full = write_image_atomic(tmp_path / "o.png", _smooth(), provenance=rec).read_bytes()
    (tmp_path / "cut.png").write_bytes(full[:40])  # cut inside the record
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8\xff\xfe\x00")
    (tmp_path / "junk.tif").write_bytes(b"II*\x00garbage")
    for name in ("cut.png", "junk.jpg", "junk.tif", "missing.png"):
        assert provenance.read(tmp_path / name) is None
    for name in ("he_carcinoma_1000.png", "he_tumour_nuclei_500x300.jpg", "CMU-1-Small-Region.svs"):
        assert provenance.read(data_dir / name) is None
