"""BCI folders, the npe2 reader/writer hooks and `napari-bci info` on real patches."""

from __future__ import annotations

import json

import imagecodecs
import numpy as np
import pytest

from napari_bci.errors import InputError
from napari_bci._npe2 import get_reader, write_ome_tiff
from napari_bci.io.bci import find_ihc_partner, open_bci_folder, parse_bci_name
from napari_bci.io.layers import HE, IHC_TRUTH
from napari_bci.io.patches import read_patch

NAMES = {
    "train": ["00001_train_0.png", "00002_train_2+.png", "00003_train_3+.png", "00004_train_1+.png"],
    "test": ["00010_test_2+.png", "00011_test_3+.png"],
}


def make_bci(root, data_dir, *, size=200):
    """A small BCI folder: H&E crops of a real carcinoma image, IHC crops of skimage's real IHC image."""
    from skimage.data import immunohistochemistry

    he = read_patch(data_dir / "he_carcinoma_1000.png")
    ihc = immunohistochemistry()
    k = 0
    for split, names in NAMES.items():
        for stain in ("HE", "IHC"):
            (root / stain / split).mkdir(parents=True, exist_ok=True)
        for name in names:
            y, x = (k * 97) % 700, (k * 131) % 700
            (root / "HE" / split / name).write_bytes(imagecodecs.png_encode(
                np.ascontiguousarray(he[y:y + size, x:x + size])))
            (root / "IHC" / split / name).write_bytes(imagecodecs.png_encode(
                np.ascontiguousarray(ihc[y % 300:y % 300 + size, x % 300:x % 300 + size])))
            k += 1
    return root


@pytest.fixture
def bci_root(tmp_path, data_dir):
    return make_bci(tmp_path / "BCI", data_dir)


def test_parse_bci_name():
    n = parse_bci_name("HE/train/00002_train_2+.png")
    assert (n.id, n.split, n.her2) == ("00002", "train", "2+")
    assert parse_bci_name("00011_test_3+.png").her2 == "3+"
    for bad in ("00002_train_4+.png", "slide.png", "00002_val_1+.png", "00002_train_2.png.bak"):
        assert parse_bci_name(bad) is None


def test_open_bci_folder_pairs_and_filters(bci_root):
    ds = open_bci_folder(bci_root)
    assert len(ds) == 6 and not ds.problems
    assert [p.name for p in ds][:4] == NAMES["train"][:1] + sorted(NAMES["train"])[1:4]
    assert all(p.ihc_path == bci_root / "IHC" / p.split / p.name for p in ds)
    assert ds.counts() == {"0": 1, "1+": 1, "2+": 2, "3+": 2}
    assert [p.name for p in ds.filter(her2="3+")] == ["00003_train_3+.png", "00011_test_3+.png"]
    assert [p.name for p in ds.filter(her2="2+", split="test")] == ["00010_test_2+.png"]
    assert len(open_bci_folder(bci_root / "HE" / "test")) == 2  # a split folder works too
    assert len(open_bci_folder(bci_root / "IHC")) == 6
    with pytest.raises(ValueError):
        ds.filter(her2="4+")


def test_find_ihc_partner_both_ways(bci_root):
    he = bci_root / "HE" / "train" / "00002_train_2+.png"
    ihc = bci_root / "IHC" / "train" / "00002_train_2+.png"
    assert find_ihc_partner(he) == ihc
    assert find_ihc_partner(ihc) == he
    (ihc).unlink()
    assert find_ihc_partner(he) is None


def test_unpaired_and_unlabeled_files_are_named(bci_root):
    (bci_root / "IHC" / "train" / "00004_train_1+.png").unlink()
    (bci_root / "HE" / "test" / "scan_17.png").write_bytes(b"x")
    with pytest.warns(UserWarning) as rec:
        ds = open_bci_folder(bci_root)
    text = " ".join(str(w.message) for w in rec)
    assert "scan_17.png" in text and "00004_train_1+.png" in text
    assert len(ds) == 6 and sum(p.ihc_path is None for p in ds) == 1
    with pytest.raises(InputError, match="scan_17.png"):
        open_bci_folder(bci_root, strict=True)


def test_folder_without_images(tmp_path):
    (tmp_path / "HE" / "train").mkdir(parents=True)
    with pytest.raises(InputError, match="no BCI images"):
        open_bci_folder(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="not a BCI dataset folder"):
        open_bci_folder(empty)
    with pytest.raises(InputError, match="no such folder"):
        open_bci_folder(tmp_path / "missing")
    assert get_reader(str(empty)) is None  # napari may try other readers


def test_reader_slide_layer(data_dir):
    reader = get_reader(str(data_dir / "CMU-1-Small-Region.svs"))
    assert callable(reader)
    [(data, attrs, kind)] = reader(str(data_dir / "CMU-1-Small-Region.svs"))
    assert kind == "image" and attrs["name"] == HE and attrs["rgb"] and attrs["multiscale"]
    assert len(data) == 4 and data[0].shape == (2967, 2220, 3)
    assert attrs["scale"] == pytest.approx((0.499, 0.499))
    md = attrs["metadata"]
    assert md["format"] == "svs" and md["mpp"] == pytest.approx(0.499) and md["role"] == "he"
    assert md["levels"][0] == [2967, 2220]


def test_reader_rejects_unsupported(tmp_path):
    p = tmp_path / "table.csv"
    p.write_text("a,b\n1,2\n")
    assert get_reader(str(p)) is None
    assert get_reader([str(p)]) is None


def test_reader_bci_folder_and_patch(bci_root):
    layers = get_reader(str(bci_root))(str(bci_root))
    assert [a["name"] for _, a, _ in layers] == [HE, IHC_TRUTH]
    assert [a["metadata"]["role"] for _, a, _ in layers] == ["he", "ihc"]
    assert all(a["metadata"]["her2"] == "0" for _, a, _ in layers)
    assert layers[0][1]["metadata"]["bci"]["count"] == 6
    assert all(isinstance(d, np.ndarray) and d.shape == (200, 200, 3) for d, _, _ in layers)

    ihc = bci_root / "IHC" / "test" / "00011_test_3+.png"
    layers = get_reader(str(ihc))(str(ihc))
    assert [a["name"] for _, a, _ in layers] == [HE, IHC_TRUTH]
    assert layers[0][1]["metadata"]["path"].endswith("HE/test/00011_test_3+.png")
    assert layers[1][1]["metadata"]["her2"] == "3+"
    np.testing.assert_array_equal(layers[1][0], read_patch(ihc))


def test_reader_errors_name_the_file(tmp_path):
    p = tmp_path / "broken.png"
    p.write_text("this is not a png")
    reader = get_reader(str(p))
    assert reader is not None  # claimed by extension, then a clear error
    with pytest.raises(InputError, match="broken.png"):
        reader(str(p))


def test_npe2_writer_round_trip(data_dir, tmp_path):
    [(data, attrs, _)] = get_reader(str(data_dir / "CMU-1-Small-Region.pyramid.ome.tif"))(
        str(data_dir / "CMU-1-Small-Region.pyramid.ome.tif"))
    out = tmp_path / "saved.ome.tif"
    assert write_ome_tiff(str(out), data, attrs) == [str(out)]
    from napari_bci.io.slide import open_slide

    with open_slide(out) as s:
        assert s.mpp == pytest.approx(0.499) and s.native_levels == 4
        ref = np.asarray(data[2])
        diff = np.abs(s.read_region(2, 0, 0, *ref.shape[:2]).astype(int) - ref)
        assert diff.mean() < 4


def test_npe2_writer_errors_are_not_swallowed(tmp_path):
    from napari_bci.errors import BCIError

    img = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(BCIError, match="does not exist") as ei:  # napari hides ValueErrors from writers
        write_ome_tiff(str(tmp_path / "no" / "x.ome.tif"), img, {"name": "x", "metadata": {}})
    assert not isinstance(ei.value, ValueError)


def test_cli_info(run_cli, data_dir, bci_root, tmp_path):
    code, out, err = run_cli("info", data_dir / "CMU-1-Small-Region.svs", "--json")
    assert code == 0 and err == ""
    info = json.loads(out)
    assert info["levels"] == [[2967, 2220], [1483, 1110], [741, 555], [370, 277]]
    assert info["mpp"] == pytest.approx(0.499) and info["format"] == "svs"
    code, out, _ = run_cli("info", data_dir / "he_tile_240.png", "--json")
    info = json.loads(out)
    assert (info["levels"], info["mpp"], info["format"]) == ([[240, 240]], None, "png")
    code, out, _ = run_cli("info", bci_root, "--json")
    info = json.loads(out)
    assert info["format"] == "bci-folder" and info["pairs"] == 6 and info["her2"]["3+"] == 2
    code, out, err = run_cli("info", tmp_path / "missing.svs", "--json")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "missing.svs" in err and "no such file" in err
