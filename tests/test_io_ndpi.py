"""Hamamatsu NDPI through ``open_slide``, on a small NDPI built from real H&E pixels.

No NDPI file is available offline, so the fixture builds one the way NDP.scan lays them out:
classic little-endian TIFF whose IFDs have 64-bit next-IFD offsets and a block of 4 high
bytes per entry; every pyramid level is a separate full page holding ONE JPEG strip with
restart markers, whose byte offsets are listed in the McuStarts tag (65426) so readers
can decode restart intervals as tiles; Make "Hamamatsu", FileFormat (65420) = 1,
SourceLens (65421) = 20 for the levels and -1 for the macro image, resolution per cm.
"""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest
import tifffile
from PIL import Image
from skimage import io as skio

from napari_bci.io.slide import open_slide

MPP = 0.46
SIZES = (1000, 500, 250)


def _jpeg(rgb: np.ndarray, **restart) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90, subsampling=0, **restart)
    return buf.getvalue()


def _mcu_starts(jpeg: bytes) -> list[int]:
    """Byte offsets of the entropy-coded data start and of every data segment after a RSTn marker."""
    sos = jpeg.index(b"\xff\xda")
    start = sos + 2 + struct.unpack(">H", jpeg[sos + 2:sos + 4])[0]
    starts, i = [start], start
    while (i := jpeg.find(b"\xff", i)) >= 0 and i + 1 < len(jpeg):
        if 0xD0 <= jpeg[i + 1] <= 0xD7:
            starts.append(i + 2)
        i += 2
    return starts


def _to_ndpi_layout(buf: bytearray, ifd_offsets: list[int]) -> bytes:
    """Rewrite classic-TIFF IFDs as NDPI IFDs (entries, 8-byte next offset, 4 high bytes per entry), appended."""
    assert ifd_offsets[0] == 8  # header bytes 8..11 (the old first IFD) become the offset's high half
    ifds = []
    for off in ifd_offsets:
        n = struct.unpack_from("<H", buf, off)[0]
        ifds.append((n, bytes(buf[off:off + 2 + 12 * n])))
    buf += b"\0" * (len(buf) % 2)
    pos, new = len(buf), []
    for n, ifd in ifds:
        new.append(pos)
        pos += len(ifd) + 8 + 4 * n
    struct.pack_into("<Q", buf, 4, new[0])
    for k, (n, ifd) in enumerate(ifds):
        buf += ifd + struct.pack("<Q", new[k + 1] if k + 1 < len(new) else 0) + b"\0" * (4 * n)
    return bytes(buf)


def _halve(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[0] // 2, a.shape[1] // 2
    return a[:2 * h, :2 * w].reshape(h, 2, w, 2, 3).mean((1, 3)).round().astype(np.uint8)


@pytest.fixture(scope="module")
def ndpi(tmp_path_factory, data_dir):
    """``(path, source levels, level JPEGs, macro)``: a 3-level NDPI of he_carcinoma_1000.png plus a macro."""
    rgb = skio.imread(data_dir / "he_carcinoma_1000.png")[..., :3]
    assert rgb.shape[:2] == (SIZES[0], SIZES[0])
    levels = [rgb]
    while len(levels) < len(SIZES):
        levels.append(_halve(levels[-1]))
    macro = np.ascontiguousarray(np.tile(_halve(levels[2]), (1, 3, 1))[:100, :300])  # 3:1 slide photo
    tmp = tmp_path_factory.mktemp("ndpi")
    classic, jpegs = tmp / "classic.tif", []
    with tifffile.TiffWriter(classic) as tw:
        for k, (a, lens) in enumerate([(a, 20.0) for a in levels] + [(macro, -1.0)]):
            # level 0: 5 restart intervals per MCU row (tiles 8x200); others: one per row
            jpeg = _jpeg(a, restart_marker_blocks=25) if k == 0 else _jpeg(a, restart_marker_rows=1)
            starts = _mcu_starts(jpeg)
            jpegs.append(jpeg)
            ppcm = 1e4 / (MPP * SIZES[0] / a.shape[1]) if lens > 0 else 1e4 / 100.0
            tw.write(iter([jpeg]), shape=a.shape, dtype=np.uint8, compression="jpeg", photometric="ycbcr",
                     subsampling=(1, 1), rowsperstrip=a.shape[0], metadata=None, software="NDP.scan-like",
                     resolution=(ppcm, ppcm), resolutionunit="CENTIMETER",
                     extratags=[(271, "s", 0, "Hamamatsu", True), (272, "s", 0, "napari-bci test", True),
                                (65420, "I", 1, 1, True), (65421, "f", 1, lens, True),
                                (65422, "i", 1, 0, True), (65423, "i", 1, 0, True),
                                (65426, "I", len(starts), starts, True),
                                (65449, "s", 0, "[NDP.S]\r\nobjective=20\r\n", True)])
    with tifffile.TiffFile(classic) as tf:
        offsets = [p.offset for p in tf.pages]
    path = tmp / "he.ndpi"
    path.write_bytes(_to_ndpi_layout(bytearray(classic.read_bytes()), offsets))
    classic.unlink()
    return path, levels, jpegs[:len(SIZES)], macro


def test_tifffile_reads_fixture_as_ndpi(ndpi):
    path, levels, _, macro = ndpi
    with tifffile.TiffFile(path) as tf:
        assert tf.tiff.is_ndpi and tf.is_ndpi  # 64-bit IFD layout and NDPI tags
        assert [s.kind for s in tf.series] == ["ndpi", "ndpi"]
        assert [s.name for s in tf.series] == ["Baseline", "Macro"]
        base = tf.series[0]
        assert [lv.shape[:2] for lv in base.levels] == [(n, n) for n in SIZES]
        assert tf.pages[0].chunks == (8, 200, 3)  # McuStarts turned the strip into restart-interval tiles
        assert tf.pages[0].ndpi_tags["Magnification"] == 20.0
        assert tf.series[1].keyframe.tags.valueof(65421) == -1.0
        # the JPEGs hold the H&E source (not noise): close to it, and the macro decodes as written
        for lv, src in zip(base.levels, levels):
            assert np.abs(lv.asarray().astype(int) - src).mean() < 6
        assert np.abs(tf.series[1].asarray().astype(int) - macro).mean() < 6


def test_open_slide_ndpi_levels_mpp_associated(ndpi):
    path, _, _, macro = ndpi
    with open_slide(path) as s:
        assert s.format == "ndpi"
        assert s.level_shapes == [[n, n] for n in SIZES]
        assert s.native_levels == 3
        assert s.downsamples == pytest.approx([1.0, 2.0, 4.0])
        assert s.mpp == pytest.approx(MPP, rel=0.01)
        assert s.metadata["associated"] == ["Macro"]
        assert list(macro.shape) not in [list(a.shape) for a in s.levels]
        assert s.level_for_mpp(2 * MPP) == 1


@pytest.mark.parametrize("level,region", [(0, (193, 411, 300, 257)), (1, (0, 380, 140, 120)),
                                          (2, (7, 3, 243, 247))])
def test_ndpi_region_matches_tifffile_page(ndpi, level, region):
    path, levels, jpegs, _ = ndpi
    y, x, h, w = region
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[level].asarray()
    with open_slide(path) as s:
        got = s.read_region(level, y, x, h, w)
        whole = np.asarray(s.levels[level].compute())
    np.testing.assert_array_equal(whole, page)
    np.testing.assert_array_equal(got, page[y:y + h, x:x + w])
    # independent decoder: the level's JPEG strip decoded whole by Pillow (4:4:4, so tile decoding is exact)
    np.testing.assert_array_equal(whole, np.asarray(Image.open(io.BytesIO(jpegs[level])).convert("RGB")))
    assert np.abs(got.astype(int) - levels[level][y:y + h, x:x + w]).mean() < 6


def test_info_json_ndpi(ndpi, run_cli):
    path, *_ = ndpi
    code, out, err = run_cli("info", path, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["format"] == "ndpi"
    assert info["levels"] == [[n, n] for n in SIZES]
    assert info["mpp"] == pytest.approx(MPP, rel=0.01)
    assert info["downsamples"] == [1.0, 2.0, 4.0]
    assert info["native_levels"] == 3
    assert info["backend"] == "tifffile"
