"""Tile engine: seams, exactness vs whole-image, OOM policy, cache bound, cancel, levels, placement."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from _helpers import randomise_bn

from napari_bci.errors import Cancelled
from napari_bci.models.architectures import receptive_radius, resnet_generator
from napari_bci.models.base import FunctionGenerator, Generator, TorchGenerator
from napari_bci.generate.cache import TileCache
from napari_bci.generate.display import OutputPyramid
from napari_bci.generate.engine import TileEngine, TileGrid
from napari_bci.pyramid import pick_level, view_box

torch.set_num_threads(2)


def _bn_model(ngf=8, n_blocks=2, seed=0):
    torch.manual_seed(seed)
    return randomise_bn(resnet_generator(ngf=ngf, n_blocks=n_blocks, norm="batch"), seed)


def _seam_ratio(img: np.ndarray, tile: int, stride: int = 4) -> float:
    """Mean |difference| between neighbouring pixels across tile borders / inside tiles.

    Inside pairs are taken at the same phase of the model's stride as the borders (strided
    and transposed convolutions leave a periodic texture that would bias a plain mean)."""
    a = img.astype(np.float32)
    pairs = []
    for d in (np.abs(np.diff(a, axis=1)).mean(axis=(0, 2)), np.abs(np.diff(a, axis=0)).mean(axis=(1, 2))):
        pos = np.arange(d.size)
        border = pos % tile == tile - 1
        inside = (pos % stride == (tile - 1) % stride) & ~border
        pairs.append((d[border].mean(), d[inside].mean()))
    return float(np.mean([p[0] for p in pairs]) / np.mean([p[1] for p in pairs]))


def test_seams_on_2048_image(data_dir):
    import tifffile

    img = tifffile.imread(data_dir / "CMU-1-Small-Region.svs", key=0)[3:2051, 3:2051]  # off the JPEG grid
    assert img.shape == (2048, 2048, 3)
    m = _bn_model(ngf=4, n_blocks=1)
    halo = receptive_radius({"arch": "resnet_1blocks", "n_blocks": 1})
    gen = TorchGenerator(m, name="seam", tile=256, halo=halo, multiple=4)
    eng = TileEngine(gen, img, cache=TileCache(256 * 2**20), batch_size=4)
    out = eng.compute_all()
    assert out.shape == img.shape and len(eng.grid) == 64
    ratio = _seam_ratio(out, 256)
    assert 0.9 <= ratio <= 1.1, ratio
    # the measure does see seams: per-tile instance-norm statistics without context
    torch.manual_seed(0)
    inst = TorchGenerator(resnet_generator(ngf=4, n_blocks=1, norm="instance"), name="inst", multiple=4)
    naive = TileEngine(inst, img, tile=512, halo=0, cache=TileCache(2**26)).compute_all()
    assert _seam_ratio(naive, 512) > 1.2


def test_tiled_equals_whole_image_in_interior(data_dir):
    from napari_bci.io.patches import read_patch

    img = np.ascontiguousarray(read_patch(data_dir / "he_carcinoma_1000.png")[:512, :512])
    m = _bn_model()
    radius = receptive_radius({"arch": "resnet_2blocks", "n_blocks": 2})
    gen = TorchGenerator(m, name="exact", multiple=4)
    eng = TileEngine(gen, img, tile=128, halo=radius, cache=TileCache(2**26))
    tiled = eng.compute_all()
    whole = gen(img[None])[0]
    inner = slice(radius, -radius)
    diff = np.abs(tiled.astype(int) - whole.astype(int))[inner, inner]
    assert diff.max() <= 1
    assert eng.computed == 16


class _FakeCuda(Generator):
    """Raises the torch CUDA OOM error above ``limit`` tiles (or always) while 'on cuda'."""

    name = "fake-cuda"
    tile = 64
    halo = 0

    def __init__(self, limit):
        self.limit = limit
        self.device = "cuda"
        self.calls = []

    def to(self, device):
        self.device = device
        return self

    def __call__(self, tiles):
        self.calls.append((self.device, len(tiles)))
        if self.device == "cuda" and (self.limit is None or len(tiles) > self.limit):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return 255 - tiles


def test_oom_halves_batch():
    img = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    gen = _FakeCuda(limit=2)
    msgs = []
    eng = TileEngine(gen, img, batch_size=8, cache=TileCache(2**24), on_warning=msgs.append)
    out = eng.compute_all()
    assert np.array_equal(out, 255 - img)
    assert eng.batch_size == 2 and gen.device == "cuda"
    assert any("batch size reduced to 2" in m for m in msgs)


def test_oom_falls_back_to_cpu_with_warning():
    img = np.random.default_rng(1).integers(0, 256, (128, 192, 3), dtype=np.uint8)
    gen = _FakeCuda(limit=None)
    eng = TileEngine(gen, img, batch_size=4, cache=TileCache(2**24))
    with pytest.warns(RuntimeWarning, match="falling back to CPU"):
        out = eng.compute_all()
    assert np.array_equal(out, 255 - img)
    assert gen.device == "cpu" and eng.batch_size == 1
    assert [c[1] for c in gen.calls[:3]] == [4, 2, 1]


def test_other_errors_are_not_swallowed():
    def boom(t):
        raise ValueError("bad weights")

    eng = TileEngine(FunctionGenerator(boom, name="boom", tile=64), np.zeros((64, 64, 3), np.uint8),
                     cache=TileCache(2**20))
    with pytest.raises(Exception, match="bad weights"):
        eng.compute_all()


def test_cache_bounded_and_revisit_computes_nothing():
    img = np.random.default_rng(2).integers(0, 256, (640, 640, 3), dtype=np.uint8)
    gen = FunctionGenerator(lambda t: t // 2, name="half", tile=64, halo=0)
    tile_bytes = 64 * 64 * 3
    small = TileCache(max_bytes=10 * tile_bytes)
    eng = TileEngine(gen, img, cache=small)
    eng.compute_all()  # 100 tiles through a 10-tile budget
    st = small.stats()
    assert st["bytes"] <= small.max_bytes and st["tiles"] == 10 and st["evictions"] == 90

    big = TileCache(max_bytes=200 * tile_bytes)
    eng = TileEngine(gen, img, cache=big, image_id="img", batch_size=16)
    view = eng.grid.in_box(0, 200, 0, 300)
    eng.compute(view)
    n = eng.computed
    eng.compute(eng.grid.in_box(100, 400, 100, 400))  # overlapping view: only new tiles computed
    assert eng.computed - n == len(set(eng.grid.in_box(100, 400, 100, 400)) - set(view))
    before = eng.computed
    again = eng.compute(view)
    assert eng.computed == before  # revisit: 100 % cache hits
    assert np.array_equal(again[(0, 0)], img[:64, :64] // 2)
    # a second engine on the same image id and model shares the cache
    eng2 = TileEngine(gen, img, cache=big, image_id="img")
    eng2.compute(view)
    assert eng2.computed == 0


def test_cancel_between_batches():
    img = np.zeros((512, 512, 3), np.uint8)
    gen = FunctionGenerator(lambda t: t, name="id", tile=64, halo=0)
    stop = threading.Event()
    seen = []

    def progress(done, total):
        seen.append(done)
        stop.set()

    eng = TileEngine(gen, img, batch_size=4, cache=TileCache(2**24))
    with pytest.raises(Cancelled):
        eng.compute(eng.grid.all_indices(), cancel=stop, progress=progress)
    assert eng.computed == 4 and seen == [4]


def test_centre_first_order():
    grid = TileGrid(1024, 1024, 128, 0)
    idx = grid.centre_first(grid.in_box(0, 1024, 0, 1024))
    assert set(idx[:4]) == {(3, 3), (3, 4), (4, 3), (4, 4)}
    assert idx[-1] in {(0, 0), (0, 7), (7, 0), (7, 7)}


def test_level_choice_and_world_placement():
    rng = np.random.default_rng(3)
    l0 = rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    levels = [l0, l0[::2, ::2].copy(), l0[::4, ::4].copy()]
    gen = FunctionGenerator(lambda t: t, name="id", tile=128, halo=0, mpp=0.5)
    assert pick_level(levels, 0.25, 0.5) == 1
    assert pick_level(levels, 0.25, 0.9) == 2
    assert pick_level(levels, None, 0.5) == 0
    eng = TileEngine(gen, levels, mpp=0.25, scale=(0.25, 0.25), translate=(10.0, 20.0),
                     cache=TileCache(2**24))
    assert eng.level == 1 and eng.shape == (512, 512)
    assert eng.out_scale == (0.5, 0.5)
    # output pixel (i, j) covers level-0 pixels (2i..2i+1, 2j..2j+1): its centre in world
    # coordinates equals the centre of those H&E pixels
    i, j = 37, 101
    he_centre = (10.0 + 0.25 * (2 * i + 0.5), 20.0 + 0.25 * (2 * j + 0.5))
    out_centre = (eng.out_translate[0] + 0.5 * i, eng.out_translate[1] + 0.5 * j)
    assert np.allclose(he_centre, out_centre)
    # the visible-tile query uses the same mapping
    box = view_box((10.0 + 0.25 * 512, 20.0 + 0.25 * 512), zoom=4.0, canvas_size=(256, 256))
    tiles = eng.tiles_in_world_box(box)
    assert set(tiles) == {(1, 1), (1, 2), (2, 1), (2, 2)}


def test_dask_levels_and_image_edges():
    da = pytest.importorskip("dask.array")
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (150, 130, 3), dtype=np.uint8)
    m = _bn_model(ngf=4, n_blocks=1)
    gen = TorchGenerator(m, name="d", tile=64, halo=24, multiple=4)
    a = TileEngine(gen, img, cache=TileCache(2**24)).compute_all()
    b = TileEngine(gen, da.from_array(img, chunks=(100, 100, 3)), cache=TileCache(2**24)).compute_all()
    assert a.shape == img.shape and np.array_equal(a, b)
    tiny = TileEngine(gen, img[:10, :7], cache=TileCache(2**24)).compute_all()  # smaller than the halo
    assert tiny.shape == (10, 7, 3)


def test_output_pyramid_levels():
    out = OutputPyramid((600, 500), 128, min_size=100, memory_bytes=600 * 500 * 3 - 1)
    assert [tuple(lv.shape[:2]) for lv in out.levels] == [(600, 500), (300, 250), (150, 125), (75, 63)]
    assert not isinstance(out.levels[0], np.ndarray)  # large level: sparse blocks
    rng = np.random.default_rng(5)
    block = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    out.write(256, 384, block[:, :116])
    lv0 = out.levels[0]
    assert np.array_equal(lv0[256:384, 384:500], block[:, :116])
    assert np.array_equal(np.asarray(lv0)[300, 400], block[44, 16])
    assert np.array_equal(lv0[300, 400], block[44, 16]) and lv0[300, 400, 1] == block[44, 16, 1]
    assert np.array_equal(lv0[250:260:3, 390, :2], np.concatenate([np.full((2, 2), 255), block[0:4:3, 6, :2]]))
    assert (lv0[:256] == 255).all()
    expect = block[:, :116].astype(float).reshape(64, 2, 58, 2, 3).mean(axis=(1, 3))
    got = np.asarray(out.levels[1][128:192, 192:250]).astype(float)
    assert np.abs(got - expect).max() <= 0.5


def test_output_pyramid_memory_bound():
    evicted = []
    tile = np.zeros((64, 64, 3), np.uint8)
    out = OutputPyramid((2048, 2048), 64, memory_bytes=0, max_bytes=40 * tile.nbytes, on_evict=evicted.append)
    for i in range(32):
        for j in range(32):
            out.write(64 * i, 64 * j, tile)
    assert out.nbytes <= out.max_bytes
    assert len(evicted) > 900 and evicted[0] == (0, 0)
    assert (out.levels[0][:64, :64] == 255).all()  # evicted: white again
    assert (out.levels[0][-64:, -64:] == 0).all()  # recent: kept


def test_feathered_blending_is_exact_where_windows_agree(data_dir):
    """Blend mode (half-offset windows, triangular weights summing to one) reproduces the
    halo-cropped tiles exactly for a model whose output depends only on its receptive field."""
    from napari_bci.io.patches import read_patch

    img = np.ascontiguousarray(read_patch(data_dir / "he_carcinoma_1000.png")[:500, :436])  # ragged edge tiles
    gen = TorchGenerator(_bn_model(), name="exact", multiple=4)
    radius = receptive_radius({"arch": "resnet_2blocks", "n_blocks": 2})
    cropped = TileEngine(gen, img, tile=128, halo=radius, cache=TileCache(2**26), blend=False).compute_all()
    eng = TileEngine(gen, img, tile=128, halo=radius, cache=TileCache(2**26), blend=True)
    blended = eng.compute_all()
    assert eng.blend and eng.computed == len(eng.grid)
    assert np.abs(blended.astype(int) - cropped.astype(int)).max() == 0


def test_feathered_blending_removes_instance_norm_seams(data_dir):
    """Instance norm: each window has its own statistics. Plain tiles show seams beyond what the
    untiled model's own output has at those positions; blended tiles do not. Blending is the
    default for instance-norm configs."""
    import tifffile

    img = tifffile.imread(data_dir / "CMU-1-Small-Region.svs", key=0)[3:2051, 3:2051]
    torch.manual_seed(0)
    inst = TorchGenerator(resnet_generator(ngf=4, n_blocks=1, norm="instance"), name="inst", multiple=4,
                          config={"norm": "instance"})
    whole = _seam_ratio(inst(img[None])[0], 512)  # the image's own structure at these positions
    plain = TileEngine(inst, img, tile=512, halo=0, cache=TileCache(2**28), blend=False).compute_all()
    eng = TileEngine(inst, img, tile=512, halo=0, cache=TileCache(2**28))
    assert eng.blend
    blended = eng.compute_all()
    assert _seam_ratio(plain, 512) > 1.1 * whole
    assert _seam_ratio(blended, 512) < 1.03 * whole


def test_one_level_picking_rule():
    """pyramid.pick_level: nearest in log scale, or the coarsest level not coarser than the
    target (with a tolerance), or capped by pixels."""
    from napari_bci.pyramid import pick_level

    levels = [np.zeros((1024, 1024)), np.zeros((512, 512)), np.zeros((256, 256))]
    assert pick_level(levels, 0.25, 0.9) == 2  # 1.0 is nearer 0.9 than 0.5
    assert pick_level(levels, 0.25, 0.9, prefer="finer") == 1  # 1.0 would be coarser than 0.9
    assert pick_level(levels, 0.25, 0.49, prefer="finer") == 0
    assert pick_level(levels, 0.25, 0.49, prefer="finer", tolerance=1.05) == 1
    assert pick_level(levels, None, 0.5, prefer="finer") == 0
    assert pick_level(levels, 0.25, 0.25, max_pixels=300 * 300) == 2
