"""Slide reader on the real files in tests/data: levels, mpp, pixels, laziness."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile

from napari_bci.io.slide import open_slide

CMU_SHAPE = (2967, 2220, 3)


def box2(a: np.ndarray) -> np.ndarray:
    """Independent 2x2 mean (half rounded up) for checking synthesised levels."""
    h, w = a.shape[0] // 2, a.shape[1] // 2
    return np.floor(a[: 2 * h, : 2 * w].astype(float).reshape(h, 2, w, 2, 3).mean(axis=(1, 3)) + 0.5).astype(np.uint8)


@pytest.mark.parametrize(
    "name, fmt, native",
    [
        ("CMU-1-Small-Region.svs", "svs", 1),
        ("CMU-1-Small-Region.pyramid.ome.tif", "ome-tiff", 4),
        ("CMU-1-Small-Region.pyramid.tif", "tiff", 4),
    ],
)
def test_wsi_formats_levels_mpp(data_dir, name, fmt, native):
    with open_slide(data_dir / name) as s:
        assert s.format == fmt
        assert s.shape == CMU_SHAPE
        assert s.native_levels == native
        assert s.level_shapes == [[2967, 2220], [1483, 1110], [741, 555], [370, 277]]
        assert s.mpp == pytest.approx(0.499, abs=1e-6)
        assert s.downsamples[0] == 1.0 and s.downsamples[-1] == pytest.approx(8.0, rel=0.01)
        for a in s.levels:
            assert a.dtype == np.uint8 and a.shape[2] == 3
            assert type(a).__module__.startswith("dask")


def test_svs_associated_images_are_not_levels(data_dir):
    with tifffile.TiffFile(data_dir / "CMU-1-Small-Region.svs") as tf:
        names = [s.name for s in tf.series]
    assert {"Thumbnail", "Label", "Macro"} <= set(names)
    with open_slide(data_dir / "CMU-1-Small-Region.svs") as s:
        assert sorted(s.metadata["associated"]) == ["Label", "Macro", "Thumbnail"]
        assert s.metadata["series_name"] == "Baseline"
        # the thumbnail (768x574) would otherwise look like a 3.9x level
        assert all(abs(d - round(d)) < 0.02 and round(d) in (1, 2, 4, 8) for d in s.downsamples)


def test_level0_region_equals_tifffile(data_dir):
    ref = tifffile.imread(data_dir / "CMU-1-Small-Region.svs", key=0)
    with open_slide(data_dir / "CMU-1-Small-Region.svs") as s:
        y, x, h, w = 1001, 517, 333, 611  # not tile-aligned, spans several 240-px tiles
        np.testing.assert_array_equal(s.read_region(0, y, x, h, w), ref[y:y + h, x:x + w])


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_ome_levels_equal_tifffile(data_dir, level):
    path = data_dir / "CMU-1-Small-Region.pyramid.ome.tif"
    ref = tifffile.imread(path, series=0, level=level)
    with open_slide(path) as s:
        np.testing.assert_array_equal(np.asarray(s.levels[level]), ref)


def test_generic_tiff_pages_are_levels(data_dir):
    path = data_dir / "CMU-1-Small-Region.pyramid.tif"
    with tifffile.TiffFile(path) as tf:
        ref = tf.pages[2].asarray()
    with open_slide(path) as s:
        np.testing.assert_array_equal(s.read_region(2, 100, 50, 200, 300), ref[100:300, 50:350])


def test_synthesised_levels_are_box_downsamples(data_dir):
    with open_slide(data_dir / "CMU-1-Small-Region.svs") as s:
        assert s.metadata["synthesised_levels"] == 3
        l0 = np.asarray(s.levels[0])
        l1 = np.asarray(s.levels[1])
        l2 = np.asarray(s.levels[2])
    np.testing.assert_array_equal(l1, box2(l0))
    np.testing.assert_array_equal(l2, box2(l1))


def test_read_region_outside_is_white(data_dir):
    with open_slide(data_dir / "CMU-1-Small-Region.svs") as s:
        r = s.read_region(0, -10, 2200, 30, 40)
        assert r.shape == (30, 40, 3)
        assert (r[:10] == 255).all() and (r[:, 20:] == 255).all()
        np.testing.assert_array_equal(r[10:, :20], s.read_region(0, 0, 2200, 20, 20))


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
def test_opening_and_region_reads_are_lazy(data_dir):
    path = data_dir / "CMU-1-Small-Region.pyramid.ome.tif"
    size = path.stat().st_size
    open_slide(path).close()  # warm up imports
    before = _rchar()
    s = open_slide(path)
    opened = _rchar() - before
    before = _rchar()
    s.read_region(0, 1024, 1024, 256, 256)
    region = _rchar() - before
    s.close()
    assert opened < 0.05 * size, (opened, size)  # headers + one small tile, not the pixels
    assert region < 0.08 * size, (region, size)  # a few 256-px JPEG tiles out of ~110


def test_patches_png_jpeg_tiff(data_dir):
    for name, fmt, shape in [
        ("he_carcinoma_1000.png", "png", (1000, 1000, 3)),
        ("he_tumour_nuclei_500x300.jpg", "jpeg", (300, 500, 3)),
        ("he_tile_240.png", "png", (240, 240, 3)),
        ("he_skin_10x.tif", "tiff", (960, 1280, 3)),
    ]:
        with open_slide(data_dir / name) as s:
            assert (s.format, s.shape, len(s.levels), s.mpp) == (fmt, shape, 1, None)
    ref = tifffile.imread(data_dir / "he_skin_10x.tif")
    with open_slide(data_dir / "he_skin_10x.tif") as s:
        np.testing.assert_array_equal(np.asarray(s.levels[0]), ref)


def test_level_for_mpp(data_dir):
    with open_slide(data_dir / "CMU-1-Small-Region.svs") as s:
        assert s.level_for_mpp(0.5) == 0
        assert s.level_for_mpp(1.0) == 1
        assert s.level_for_mpp(4.1) == 3


def test_openslide_backend_reads_svs(data_dir):
    openslide = pytest.importorskip("openslide")
    from napari_bci.io.slide import _open_openslide

    s = _open_openslide(data_dir / "CMU-1-Small-Region.svs", reason="test")
    assert s.metadata["backend"] == "openslide" and s.mpp == pytest.approx(0.499) and s.format == "svs"
    assert sorted(s.metadata["associated"]) == ["label", "macro", "thumbnail"]
    assert s.level_shapes[0] == [2967, 2220] and s.native_levels == 1
    ref = tifffile.imread(data_dir / "CMU-1-Small-Region.svs", key=0)
    np.testing.assert_array_equal(s.read_region(0, 300, 200, 100, 120), ref[300:400, 200:320])
    s.close()
    assert openslide
