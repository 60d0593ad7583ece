"""Whole-slide generation on dask.distributed: identical output, killed workers, CLI options."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

distributed = pytest.importorskip("distributed")

from napari_bci.models.baseline import BaselineGenerator  # noqa: E402
from napari_bci.generate.batch import generate_folder, generate_slide  # noqa: E402
from napari_bci.generate.distributed import pick_device, worker_index  # noqa: E402
from napari_bci.io.writers import write_pyramid  # noqa: E402

TILE = 256


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory, request) -> Path:
    from napari_bci.io.patches import read_patch

    he = np.asarray(read_patch(Path(request.config.rootpath) / "tests/data/he_carcinoma_1000.png"))[:, :, :3]
    canvas = np.full((512, 1024, 3), 255, np.uint8)
    canvas[56:456, 100:900] = he[:400, :800]  # 8 tiles, 7 with tissue
    p = tmp_path_factory.mktemp("dslide") / "he.ome.tif"
    write_pyramid(p, canvas, mpp=0.5, tile=TILE, compression="zlib")
    return p


@pytest.fixture(scope="module")
def reference(slide_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dref") / "ref.ome.tif"
    generate_slide(slide_path, "baseline", out, tile=TILE, show_progress=False)
    return out


@pytest.fixture(scope="module")
def client():
    """Two worker processes with one thread each (the 2-core machine), nannies restart dead workers."""
    import cloudpickle

    from napari_bci.generate.distributed import restore_environ

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    environ = dict(os.environ)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=50) as cluster, distributed.Client(cluster, set_as_default=False) as c:
        yield c
    restore_environ(environ)  # the nannies' thread limits would reach later tests' subprocesses


def test_own_local_cluster_leaves_the_environment_as_it_was():
    """A run on its own LocalCluster (``workers=N``) gives this process's environment back as it
    found it once closed, so commands started later keep their threads."""
    from napari_bci.generate.distributed import Cluster

    before = dict(os.environ)
    with Cluster("baseline", workers=1) as c:
        assert c.cluster is not None
    assert dict(os.environ) == before


def _bytes_without_uuid(path) -> bytes:
    return re.sub(rb"urn:uuid:[0-9a-f-]{36}", b"urn:uuid:" + b"0" * 36, Path(path).read_bytes())


def test_two_workers_give_identical_output(slide_path, reference, client, tmp_path):
    out = tmp_path / "d.ome.tif"
    with distributed.get_task_stream(client) as ts:
        rep = generate_slide(slide_path, "baseline", out, tile=TILE, client=client, window=3, show_progress=False)
    assert rep["cluster"]["workers"] == 2 and rep["cluster"]["window"] == 3
    assert rep["computed"] == rep["tissue_tiles"]
    tasks = [t for t in ts.data if "tiles_task" in t["key"]]
    assert len(tasks) == rep["tissue_tiles"] and len({t["worker"] for t in tasks}) == 2  # both worked
    assert _bytes_without_uuid(out) == _bytes_without_uuid(reference)


class DieOnce(BaselineGenerator):
    """Kills its worker process at its 2nd call, once per marker file (a worker crash mid-run)."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker, self.calls = marker, 0

    def __call__(self, tiles):
        self.calls += 1
        if self.calls == 2 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return super().__call__(tiles)


def test_killed_worker_task_is_retried(slide_path, reference, client, tmp_path):
    marker = tmp_path / "died"
    out = tmp_path / "k.ome.tif"
    gen = DieOnce(str(marker))
    gen.name = "baseline"
    rep = generate_slide(slide_path, gen, out, tile=TILE, client=client, show_progress=False)
    assert marker.exists()  # a worker really died mid-run
    assert rep["computed"] == rep["tissue_tiles"] and not rep["skipped"]
    assert _bytes_without_uuid(out) == _bytes_without_uuid(reference)
    client.wait_for_workers(2, timeout=60)


def test_cli_joins_a_scheduler(slide_path, reference, client, tmp_path, run_cli):
    out = tmp_path / "s.ome.tif"
    code, stdout, err = run_cli("generate", slide_path, "--model", "baseline", "--out", out, "--tile", TILE,
                                "--scheduler", client.scheduler.address, "--tiles-per-task", 2, "--json")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["cluster"]["local"] is False and rep["cluster"]["tiles_per_task"] == 2
    assert _bytes_without_uuid(out) == _bytes_without_uuid(reference)
    # the plugin was removed from the shared cluster afterwards
    plugins = client.run(lambda dask_worker: sorted(dask_worker.plugins))
    assert not any("napari-bci" in p for ps in plugins.values() for p in ps)


def test_patch_folder_on_workers(data_dir, client, tmp_path):
    import imagecodecs

    from napari_bci.io.patches import read_patch

    he = np.asarray(read_patch(data_dir / "he_carcinoma_1000.png"))[:, :, :3]
    src = tmp_path / "patches"
    src.mkdir()
    for i in range(3):
        (src / f"p{i}.png").write_bytes(imagecodecs.png_encode(np.ascontiguousarray(he[i * 256:(i + 1) * 256, :256])))
    rep = generate_folder(sorted(src.iterdir()), "baseline", tmp_path / "out", scheduler=client.scheduler.address,
                          show_progress=False)
    assert rep["written"] == 3
    for i in range(3):
        got = imagecodecs.png_decode((tmp_path / "out" / f"p{i}.png").read_bytes())
        want = BaselineGenerator()(he[None, i * 256:(i + 1) * 256, :256])[0]
        assert np.array_equal(got, want)


def test_worker_device_mapping(monkeypatch):
    assert worker_index(3) == 3 and worker_index("SLURMCluster-7") == 7 and worker_index("tcp://a") == 0
    assert pick_device("cpu", 5) == "cpu" and pick_device("cuda:1", 0) == "cuda:1"
    monkeypatch.setenv("NAPARI_BCI_DEVICE", "cpu")  # the user's override reaches every worker
    assert pick_device(None, 3) == "cpu"


def test_corrupt_tile_reported_from_a_worker(slide_path, reference, client, tmp_path):
    """A worker that cannot read a tile reports it (coordinates travel back); ``skip`` fills it white."""
    data = bytearray(slide_path.read_bytes())
    with tifffile.TiffFile(slide_path) as tf:
        page = tf.series[0].pages[0]
        off, n = page.dataoffsets[1 * 4 + 2], page.databytecounts[1 * 4 + 2]  # tile (1, 2), in the tissue
    data[off:off + n] = bytes(np.random.default_rng(2).integers(0, 256, n, dtype=np.uint8))
    bad = tmp_path / "bad.ome.tif"
    bad.write_bytes(bytes(data))
    out = tmp_path / "o.ome.tif"
    rep = generate_slide(bad, "baseline", out, tile=TILE, client=client, on_error="skip", show_progress=False)
    assert [(s["tile"], s["level0_x"], s["level0_y"]) for s in rep["skipped"]] == [([1, 2], 512, 256)]
    with tifffile.TiffFile(out) as a, tifffile.TiffFile(reference) as b:
        got, ref = a.series[0].levels[0].asarray(), b.series[0].levels[0].asarray()
    assert got[256:512, 512:768].min() >= 250
    got[256:512, 512:768] = ref[256:512, 512:768]
    assert np.array_equal(got, ref)
