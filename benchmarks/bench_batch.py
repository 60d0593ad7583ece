"""Whole-slide batch generation: throughput with 1 and 2 dask workers, and peak memory vs slide size.

    python benchmarks/bench_batch.py [--size 4096] [--mem-sizes 16384 32768] [--tile 512] [--strip-sizes 8192 16384 20000]

1. Throughput: the synthetic whole slide (``napari_bci.samples.wsi.make_wsi_pair``) written as an
   OME-TIFF, then ``generate_slide`` with the ``baseline`` generator (tissue tiles only) in this
   process, on a LocalCluster with 1 worker and with 2 workers. Prints tiles/s, the peak RSS of
   the process that runs the writer and the ratios against the single-process run.
2. Memory: ``generate_slide`` on lazily rendered 16k and 32k slides (real H&E texture on tissue
   islands, white glass elsewhere; nothing is ever held whole), each in a fresh subprocess, and
   the same slides written by the pyramid writer alone; prints the peak RSS of both, the
   writer's stated row buffer ``2 * tile * width * 3`` and the growth 16k -> 32k. Memory must not
   grow with the slide beyond the writer's buffers.
3. Strip TIFFs: peak RSS of the batch paths of the CLI on one-strip uncompressed TIFFs of 8k, 16k
   and 20k (``bench_io.py``'s memory table, same baseline rule): a folder holding the slide
   (``generate FOLDER --out OUTDIR``) and a local dask cluster (``generate --workers 1``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HE_PATCH = ROOT / "tests" / "data" / "he_carcinoma_1000.png"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# -- a cheap lazy slide for the memory benchmark --------------------------------------------------------
def lazy_slide(size: int, tile: int = 512, seed: int = 0, tissue_fraction: float = 0.08) -> list:
    """Pyramid of dask arrays ``size x size``: H&E texture on random tissue islands, white glass."""
    from napari_bci.io.patches import read_patch

    he = np.ascontiguousarray(np.asarray(read_patch(HE_PATCH))[:1000, :1000, :3])
    rng = np.random.default_rng(seed)
    cells = 32
    islands = rng.random((cells, cells)) < tissue_fraction
    levels = []
    s, k = size, 0
    while True:
        f = 2**k

        def block(block_info=None, f=f, n=s):
            (y0, y1), (x0, x1), _ = block_info[None]["array-location"]
            ys, xs = np.arange(y0, y1), np.arange(x0, x1)
            on = islands[(ys * cells // n)[:, None], (xs * cells // n)[None, :]]
            tex = he[((ys * f) % 1000)[:, None], ((xs * f) % 1000)[None, :]]
            return np.where(on[..., None], tex, np.uint8(255)).astype(np.uint8)

        levels.append(_lazy_level(block, s, tile, f"lazy-{size}-{k}"))
        if s <= 1024:
            break
        s, k = s // 2, k + 1
    return levels


def _lazy_level(block, n: int, tile: int, name: str):
    import dask.array as da

    chunks = (tuple(min(tile, n - i) for i in range(0, n, tile)),) * 2 + ((3,),)
    return da.map_blocks(block, dtype=np.uint8, chunks=chunks, meta=np.empty((0, 0, 3), np.uint8), name=name)


def _memory_child(size: int, tile: int, writer_only: bool = False) -> dict:
    """Run in a fresh process: generate a lazy ``size`` slide (or, ``writer_only``, just write the
    H&E itself with the same pyramid writer: the writer's own buffers); report time and peak RSS."""
    import dask

    from napari_bci.generate import batch
    from napari_bci.io.writers import write_pyramid

    dask.config.set(scheduler="synchronous")
    before = peak_rss_mb()
    levels = lazy_slide(size, tile)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        if writer_only:
            batch._limit_heap_fragmentation()  # the same allocator setting as generate_slide
            write_pyramid(Path(d) / "out.ome.tif", levels[0], tile=tile)
            rep = {"tiles": -(-size // tile) ** 2, "tissue_tiles": 0}
        else:
            rep = batch.generate_slide(levels, "baseline", Path(d) / "out.ome.tif", tile=tile,
                                       show_progress=False)
        dt = time.perf_counter() - t0
        out_mb = (Path(d) / "out.ome.tif").stat().st_size / 2**20
    return {"size": size, "tiles": rep["tiles"], "tissue_tiles": rep["tissue_tiles"], "seconds": round(dt, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1), "rss_before_mb": round(before, 1), "output_mb": round(out_mb, 1),
            "writer_buffer_mb": round(2 * tile * size * 3 / 2**20, 1)}


# -- throughput with workers ----------------------------------------------------------------------------
def make_wsi_file(size: int, tile: int, d: Path) -> Path:
    from napari_bci.io.writers import write_pyramid
    from napari_bci.samples.wsi import make_wsi_pair

    pair = make_wsi_pair(size=size, seed=0, tile=tile)
    p = d / "he.ome.tif"
    write_pyramid(p, pair.he_levels[0], mpp=pair.mpp, tile=tile)
    return p


def _throughput_child(path: str, workers: int, tile: int, model: str = "baseline") -> dict:
    from napari_bci.generate.batch import generate_slide

    before = peak_rss_mb()
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        rep = generate_slide(path, model, Path(d) / "out.ome.tif", tile=tile, workers=workers or None,
                             show_progress=False)
        total = time.perf_counter() - t0
    return {"workers": workers, "tiles": rep["computed"], "seconds": rep["seconds"], "with_startup_s": round(total, 1),
            "tiles_per_s": rep["tiles_per_s"], "peak_rss_mb": round(peak_rss_mb(), 1),
            "rss_before_mb": round(before, 1)}


def _child(func: str, *args) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_batch as b; "
            f"print('RESULT' + json.dumps(b.{func}(*{args!r})))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")]
    if p.returncode or not line:
        raise SystemExit(f"{func}{args} failed:\n{p.stderr[-3000:]}")
    return json.loads(line[-1][6:])


def _in_folder(src: Path, d: str) -> str:
    """A folder in ``d`` holding (a hard link to) ``src`` alone."""
    folder = Path(d) / f"in_{src.stem}"
    folder.mkdir(exist_ok=True)
    if not (folder / src.name).exists():
        os.link(src, folder / src.name)
    return str(folder)


BATCH_COMMANDS = {
    "folder": lambda src, d: ["generate", _in_folder(src, d), "--model", "baseline", "--out",
                              str(Path(d) / f"out_{src.stem}"), "--device", "cpu"],
    "workers": lambda src, d: ["generate", str(src), "--model", "baseline", "--workers", "1", "--out",
                               str(Path(d) / f"w_{src.stem}.ome.tif"), "--device", "cpu"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096, help="synthetic WSI side for the worker benchmark")
    ap.add_argument("--mem-sizes", type=int, nargs="*", default=[16384, 32768])
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--skip-workers", action="store_true")
    ap.add_argument("--strip-sizes", type=int, nargs="*", default=[8192, 16384, 20000],
                    help="one-strip TIFF sides for the batch CLI memory table (none: skip it)")
    ap.add_argument("--model", default="baseline", help="generator for the worker benchmark (default baseline)")
    args = ap.parse_args()
    print(f"cores: {os.cpu_count()}")
    if not args.skip_workers:
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            path = make_wsi_file(args.size, args.tile, Path(d))
            print(f"synthetic WSI {args.size}x{args.size} written in {time.perf_counter() - t0:.1f} s")
            runs = [_child("_throughput_child", str(path), w, args.tile, args.model) for w in (0, 1, 2)]
        base = runs[0]
        print(f"{'run':<16}{'tiles':>7}{'tiles/s':>10}{'x single':>10}{'gen s':>8}{'+startup s':>12}{'peak RSS MB':>13}")
        for r in runs:
            label = "single process" if r["workers"] == 0 else f"{r['workers']} worker(s)"
            print(f"{label:<16}{r['tiles']:>7}{r['tiles_per_s']:>10.2f}{r['tiles_per_s'] / base['tiles_per_s']:>10.2f}"
                  f"{r['seconds']:>8.1f}{r['with_startup_s']:>12.1f}{r['peak_rss_mb']:>13.0f}")
        print(f"ratio 2 workers / 1 worker (tiles/s): {runs[2]['tiles_per_s'] / runs[1]['tiles_per_s']:.2f}")
    mem = [_child("_memory_child", s, args.tile) for s in args.mem_sizes]
    wr = [_child("_memory_child", s, args.tile, True) for s in args.mem_sizes]
    print(f"{'slide':>8}{'tiles':>8}{'tissue':>8}{'gen s':>7}{'peak RSS MB':>13}{'writer only MB':>16}"
          f"{'2*tile*W*3 MB':>15}{'out MB':>8}")
    for m, w in zip(mem, wr):
        print(f"{m['size']:>8}{m['tiles']:>8}{m['tissue_tiles']:>8}{m['seconds']:>7.1f}{m['peak_rss_mb']:>13.0f}"
              f"{w['peak_rss_mb']:>16.0f}{m['writer_buffer_mb']:>15.0f}{m['output_mb']:>8.1f}")
    if len(mem) >= 2:
        a, b = mem[0], mem[-1]
        grow = b["peak_rss_mb"] - a["peak_rss_mb"]
        wgrow = wr[-1]["peak_rss_mb"] - wr[0]["peak_rss_mb"]
        print(f"peak RSS {b['size']} / {a['size']}: {b['peak_rss_mb'] / a['peak_rss_mb']:.2f} "
              f"(pixels x{(b['size'] / a['size']) ** 2:.0f}); growth {grow:.0f} MB, "
              f"of which the pyramid writer alone grows {wgrow:.0f} MB "
              f"(generation adds {grow - wgrow:+.0f} MB)")
    if args.strip_sizes:
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_io import memory

        memory(args.strip_sizes, BATCH_COMMANDS)

if __name__ == "__main__":
    main()
