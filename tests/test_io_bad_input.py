"""Bad input: every case names the file and the problem (InputError) or converts with a warning."""

from __future__ import annotations

import shutil
import zlib

import imagecodecs
import numpy as np
import pytest
import tifffile

from napari_bci.errors import InputError
from napari_bci.io import slide as slide_mod
from napari_bci.io.patches import read_patch
from napari_bci.io.slide import open_slide


def _raises(path, *words):
    with pytest.raises(InputError) as ei:
        open_slide(path)
    msg = str(ei.value)
    assert str(path) in msg
    for w in words:
        assert w in msg.lower(), msg
    return msg


def test_missing_file(tmp_path):
    _raises(tmp_path / "nope.svs", "no such file")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    _raises(p, "empty")


def test_directory_is_not_a_slide(tmp_path):
    _raises(tmp_path, "directory")


def test_truncated_tiff(data_dir, tmp_path):
    for name in ("CMU-1-Small-Region.pyramid.ome.tif", "CMU-1-Small-Region.svs"):
        p = tmp_path / name
        data = (data_dir / name).read_bytes()
        p.write_bytes(data[: int(len(data) * 0.6)])
        _raises(p, "truncated")


def test_corrupt_tiff_header(data_dir, tmp_path):
    p = tmp_path / "bad.tif"
    data = bytearray((data_dir / "CMU-1-Small-Region.pyramid.tif").read_bytes()[:4096])
    data[4:8] = b"\xff\xff\xff\x7f"  # first IFD offset far beyond the end
    p.write_bytes(bytes(data))
    _raises(p, "tiff")


def test_corrupt_tile_data(data_dir, tmp_path):
    p = tmp_path / "garbled.ome.tif"
    shutil.copy(data_dir / "CMU-1-Small-Region.pyramid.ome.tif", p)
    with tifffile.TiffFile(p) as tf:
        page = tf.series[0].levels[-1].pages[0]
        off, n = page.dataoffsets[0], page.databytecounts[0]
    raw = bytearray(p.read_bytes())
    raw[off:off + n] = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes()
    p.write_bytes(bytes(raw))
    _raises(p, "corrupt")


def test_truncated_and_corrupt_png(data_dir, tmp_path):
    data = (data_dir / "he_tile_240.png").read_bytes()
    t = tmp_path / "trunc.png"
    t.write_bytes(data[: len(data) // 2])
    _raises(t, "png")
    c = tmp_path / "corrupt.png"
    c.write_bytes(data[:8] + bytes(200) + data[208:])
    _raises(c, "png")


def test_truncated_jpeg(data_dir, tmp_path):
    data = (data_dir / "he_tumour_nuclei_500x300.jpg").read_bytes()
    t = tmp_path / "trunc.jpg"
    t.write_bytes(data[: len(data) // 2])
    _raises(t, "truncated jpeg")


@pytest.mark.parametrize("name", ["notes.png", "notes.jpg", "slide.svs", "slide.tif"])
def test_non_image_with_image_extension(tmp_path, name):
    p = tmp_path / name
    p.write_text("patient,her2\n1,2+\n")
    _raises(p, "not")


def test_unknown_extension_without_openslide(tmp_path):
    p = tmp_path / "data.csv"
    p.write_text("a,b\n")
    if slide_mod._openslide_available():
        pytest.skip("OpenSlide installed: it gets to try")
    _raises(p, "unsupported")


def test_mrxs_needs_openslide(tmp_path):
    p = tmp_path / "slide.mrxs"
    p.write_text("[GENERAL]\n")
    if slide_mod._openslide_available():
        _raises(p, "corrupt")
    else:
        _raises(p, "openslide")


def test_grayscale_rgba_16bit_png_convert_with_warning(data_dir, tmp_path):
    rgb = read_patch(data_dir / "he_tile_240.png")
    gray = rgb[..., 1]
    cases = {
        "gray.png": (gray, "grayscale", np.dstack([gray] * 3)),
        "rgba.png": (np.dstack([rgb, np.full(gray.shape, 255, np.uint8)]), "alpha", rgb),
        "rgb16.png": (rgb.astype(np.uint16) * 257, "16-bit", rgb),
    }
    for name, (arr, word, expect) in cases.items():
        p = tmp_path / name
        p.write_bytes(imagecodecs.png_encode(np.ascontiguousarray(arr)))
        with pytest.warns(UserWarning, match=word) as rec:
            out = read_patch(p)
        assert str(p) in str(rec[0].message)
        assert out.shape == rgb.shape and out.dtype == np.uint8
        np.testing.assert_array_equal(out, expect)


def test_semi_transparent_rgba_is_composited_over_white(tmp_path):
    a = np.zeros((8, 8, 4), np.uint8)
    a[..., 0] = 200
    a[..., 3] = 0
    a[:4, ..., 3] = 255
    p = tmp_path / "alpha.png"
    p.write_bytes(imagecodecs.png_encode(a))
    with pytest.warns(UserWarning):
        out = read_patch(p)
    assert (out[:4] == [200, 0, 0]).all() and (out[4:] == 255).all()


def test_grayscale_and_16bit_tiff_convert_lazily(tmp_path):
    g = np.arange(600 * 400, dtype=np.uint32).reshape(600, 400) % 65536
    p = tmp_path / "gray16.tif"
    tifffile.imwrite(p, g.astype(np.uint16), tile=(256, 256))
    with pytest.warns(UserWarning, match="16-bit.*grayscale"):
        s = open_slide(p)
    assert s.shape == (600, 400, 3)
    out = s.read_region(0, 0, 0, 600, 400)
    np.testing.assert_array_equal(out[..., 0], np.rint(g * (255 / 65535)).astype(np.uint8))
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


@pytest.fixture(scope="module")
def huge_strip_tiff(tmp_path_factory):
    """A 20000 x 20000 RGB TIFF in zlib strips of 64 rows (1.2 GB of pixels, ~10 MB on disk).

    Red = 50 * (strip index % 4) + row in strip, green = x // 500: every strip is checkable,
    and only four distinct strips need compressing.
    """
    H = W = 20000
    rps = 64
    p = tmp_path_factory.mktemp("huge") / "huge_strips.tif"
    encoded = []
    for k in range(4):
        block = np.empty((rps, W, 3), np.uint8)
        block[..., 0] = (50 * k + np.arange(rps))[:, None]
        block[..., 1] = (np.arange(W) // 500).astype(np.uint8)
        block[..., 2] = 200
        encoded.append(block)
    encoded = [zlib.compress(b.tobytes(), 1) for b in encoded]
    last = H % rps
    tail = zlib.compress(np.ascontiguousarray(
        np.frombuffer(zlib.decompress(encoded[(H // rps) % 4]), np.uint8).reshape(rps, W, 3)[:last]).tobytes(), 1)

    def strips():
        for i in range(H // rps):
            yield encoded[i % 4]
        if last:
            yield tail

    tifffile.imwrite(p, strips(), shape=(H, W, 3), dtype=np.uint8, rowsperstrip=rps,
                     compression="zlib", photometric="rgb")
    return p


def expected_red(y0: int, n: int) -> np.ndarray:
    y = np.arange(y0, y0 + n)
    return (50 * ((y // 64) % 4) + y % 64).astype(np.uint8)


def test_untiled_huge_tiff_reads_lazily_by_strips(huge_strip_tiff):
    s = open_slide(huge_strip_tiff)
    assert s.shape == (20000, 20000, 3)
    assert s.metadata["tiled"] is False
    assert s.levels[0].chunksize[:2] == (512, 20000)  # 8 strips per dask chunk
    assert len(s.levels) > 1  # synthesised overview levels
    y, x = 12345, 17000
    r = s.read_region(0, y, x, 100, 80)
    np.testing.assert_array_equal(r[:, 0, 0], expected_red(y, 100))
    np.testing.assert_array_equal(r[0, :, 1], (np.arange(x, x + 80) // 500).astype(np.uint8))
    # only the dask chunk(s) of 8 strips covering the rows are read (of 313 strips), not 1.2 GB
    with open("/proc/self/io") as f:
        before = int(next(line for line in f if line.startswith("rchar")).split()[1])
    s.read_region(0, 5000, 100, 100, 80)
    with open("/proc/self/io") as f:
        read = int(next(line for line in f if line.startswith("rchar")).split()[1]) - before
    assert read < 0.06 * huge_strip_tiff.stat().st_size, read
    s.close()


def test_untiled_single_strip_too_large_is_refused(tmp_path):
    H, W = 12000, 12000  # one zlib strip of 432 MB raw: never decoded
    p = tmp_path / "one_strip.tif"
    comp = zlib.compressobj(1)
    row = np.full((500, W, 3), 180, np.uint8).tobytes()
    body = b"".join(comp.compress(row) for _ in range(H // 500)) + comp.flush()
    tifffile.imwrite(p, iter([body]), shape=(H, W, 3), dtype=np.uint8, rowsperstrip=H,
                     compression="zlib", photometric="rgb")
    msg = _raises(p, "too large", "tiled")
    assert "12000x12000" in msg


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


@pytest.mark.parametrize("rps", [3000, 7])  # one strip (the whole image); many odd-sized strips
def test_uncompressed_strips_are_read_by_windows(tmp_path, rps):
    import pickle

    a = np.random.default_rng(1).integers(0, 256, (3000, 2600, 3), dtype=np.uint8)
    p = tmp_path / "contig.tif"
    tifffile.imwrite(p, a, rowsperstrip=rps, photometric="rgb")
    with open_slide(p) as s:
        assert s.levels[0].chunksize[:2] == (1024, 1024)
        before = _rchar()
        np.testing.assert_array_equal(s.read_region(0, 1100, 1200, 300, 400), a[1100:1400, 1200:1600])
        assert _rchar() - before <= 1024 * 1024 * 3 + 4096  # one dask chunk, not the 23 MB image
        np.testing.assert_array_equal(s.levels[0].compute(), a)  # dask threads, full-width reads
        np.testing.assert_array_equal(s.read_region(0, 2990, 2590, 20, 20)[:10, :10], a[2990:, 2590:])
        lowest = s.levels[-1].compute()
        clone = pickle.loads(pickle.dumps(s.levels[0]))  # dask workers: reopened by path
        np.testing.assert_array_equal(clone[3:9, 5:7].compute(), a[3:9, 5:7])
    assert lowest.shape == (375, 325, 3)


def test_uncompressed_16bit_big_endian_gray_strips(tmp_path):
    g = np.random.default_rng(2).integers(0, 65536, (300, 257), dtype=np.uint16)
    p = tmp_path / "gray16be.tif"
    tifffile.imwrite(p, g, byteorder=">", rowsperstrip=13)
    with pytest.warns(UserWarning, match="16-bit"):
        s = open_slide(p)
    with s:
        out = s.read_region(0, 0, 0, 300, 257)
    np.testing.assert_array_equal(out[..., 0], np.rint(g * (255 / 65535)).astype(np.uint8))


@pytest.fixture()
def corrupt_svs(data_dir, tmp_path):
    """CMU-1-Small-Region.svs with tile 20 (row 2, column 0) of level 0 overwritten by zeros."""
    p = tmp_path / "corrupt.svs"
    shutil.copy(data_dir / "CMU-1-Small-Region.svs", p)
    with tifffile.TiffFile(p) as tf:
        off = tf.series[0].pages[0].dataoffsets[20]
    with open(p, "r+b") as f:
        f.seek(off)
        f.write(bytes(64))
    return p


def test_corrupt_tile_names_file_level_and_tile(corrupt_svs):
    with open_slide(corrupt_svs) as s:  # opening decodes one good tile: fine
        np.asarray(s.read_region(0, 0, 240, 240, 240))  # a good tile beside the bad one
        with pytest.raises(InputError) as ei:
            s.read_region(0, 400, 0, 200, 200)
        msg = str(ei.value)
        assert msg.startswith(f"{corrupt_svs}: corrupt image data in level 0 tile 20 (row 2, column 0; y=480, x=0")
        assert "Jpeg8Error" in msg and "\n" not in msg
        with pytest.raises(InputError, match="level 0 tile 20"):  # also through the computed levels
            s.levels[3].compute()


def test_corrupt_tile_reads_white_with_one_warning_in_fill_mode(corrupt_svs, data_dir):
    import warnings

    with open_slide(data_dir / "CMU-1-Small-Region.svs") as good:
        ref = good.read_region(0, 0, 0, 960, 480)
    with open_slide(corrupt_svs, on_error="fill") as s:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = s.read_region(0, 0, 0, 960, 480)
            s.read_region(0, 480, 0, 240, 240)  # the same tile again: no second warning
    msgs = [str(w.message) for w in caught]
    assert msgs == [f"{corrupt_svs}: corrupt image data in level 0 tile 20 (row 2, column 0; y=480, x=0, "
                    f"240x240 px) (Jpeg8Error: Not a JPEG file: starts with 0x00 0x00); shown as white"]
    assert (out[480:720, :240] == 255).all()
    bad = np.zeros(out.shape[:2], bool)
    bad[480:720, :240] = True
    np.testing.assert_array_equal(out[~bad], ref[~bad])


def test_reader_shows_a_corrupt_tile_as_white_and_bounds_the_dask_cache(corrupt_svs):
    """napari's reader opens a damaged slide for review: the bad tile is white with one warning
    (not an error on every redraw), the rest is the slide; napari's chunk cache is bounded."""
    import warnings

    import napari.utils._dask_utils as dask_utils
    from napari.utils import resize_dask_cache

    from napari_bci._npe2 import dask_cache_budget, get_reader

    resize_dask_cache(4 << 30)
    try:
        (data, meta, kind), = get_reader(str(corrupt_svs))(str(corrupt_svs))
        assert dask_utils._DASK_CACHE.cache.available_bytes == dask_cache_budget() <= 1 << 30
    finally:
        resize_dask_cache(dask_cache_budget())
    assert kind == "image" and meta["name"] == "H&E"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        level0 = np.asarray(data[0][:960, :480])
    assert [str(w.message).endswith("shown as white") for w in caught] == [True]
    assert (level0[480:720, :240] == 255).all() and level0[:240, :240].std() > 5
