"""I/O benchmark: random-tile latency through the lazy pyramid vs reading a whole level with
tifffile, and streaming-writer throughput and peak memory.

    python benchmarks/bench_io.py [--size 8192] [--tiles 40]

Builds an OME-TIFF of SIZE x SIZE (JPEG tiles of real H&E from tests/data) with the project's
writer in a temporary folder, then times, in the same run:
  baseline  tifffile.imread of the whole level 0 (what a non-lazy reader does)
  lazy      Slide.read_region of random 512x512 regions at level 0 (what napari asks for)
and prints the ratio. Also reports open time and the CMU SVS synthesised-level cost.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import tifffile

from napari_bci.io.patches import read_patch
from napari_bci.io.slide import open_slide
from napari_bci.io.writers import write_pyramid

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--tiles", type=int, default=40)
    args = ap.parse_args()
    N, T = args.size, 512
    he = read_patch(DATA / "he_carcinoma_1000.png")
    rng = np.random.default_rng(0)

    def tile(y, x, h, w):  # real H&E, shifted per tile so JPEG has real work
        oy, ox = (y * 7 + x * 3) % (1000 - T), (x * 5 + y) % (1000 - T)
        return he[oy:oy + h, ox:ox + w]

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bench.ome.tif"
        tracemalloc.start()
        t = time.perf_counter()
        write_pyramid(path, tile, shape=(N, N), tile=T, compression="jpeg", quality=90, mpp=0.5)
        t_write = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        mp = N * N / 1e6
        print(f"write  {N}x{N} JPEG pyramid: {t_write:.2f} s ({mp / t_write:.1f} MP/s), "
              f"peak traced memory {peak / 2**20:.1f} MiB vs level 0 {N * N * 3 / 2**20:.0f} MiB, "
              f"file {path.stat().st_size / 2**20:.1f} MiB")

        open_slide(DATA / "CMU-1-Small-Region.pyramid.ome.tif").close()  # warm up (zarr's I/O thread)
        t = time.perf_counter()
        s = open_slide(path)
        t_open = time.perf_counter() - t
        lat = []
        for _ in range(args.tiles):
            y, x = rng.integers(0, N - T, 2)
            t = time.perf_counter()
            s.read_region(0, int(y), int(x), T, T)
            lat.append(time.perf_counter() - t)
        lat_ms = np.array(lat) * 1e3
        low = len(s.levels) - 1
        t = time.perf_counter()
        s.read_region(low, 0, 0, *s.levels[low].shape[:2])
        t_low = time.perf_counter() - t
        s.close()

        t = time.perf_counter()
        full = tifffile.imread(path, series=0, level=0)
        t_full = time.perf_counter() - t
        del full
        print(f"open   {t_open * 1e3:.1f} ms, {len(s.levels)} levels")
        print(f"lazy   random {T}x{T} region at level 0: median {np.median(lat_ms):.1f} ms, "
              f"p95 {np.percentile(lat_ms, 95):.1f} ms; whole lowest level ({low}): {t_low * 1e3:.1f} ms")
        print(f"base   tifffile.imread whole level 0: {t_full * 1e3:.0f} ms")
        print(f"ratio  whole-level read / median lazy region read = {t_full / np.median(lat) :.0f}x")

    svs = DATA / "CMU-1-Small-Region.svs"
    s = open_slide(svs)
    t = time.perf_counter()
    s.read_region(3, 0, 0, *s.levels[3].shape[:2])
    t_syn = time.perf_counter() - t
    t = time.perf_counter()
    tifffile.imread(svs, key=0)
    t_l0 = time.perf_counter() - t
    s.close()
    print(f"synth  CMU SVS synthesised level 3 (370x277) from level 0: {t_syn * 1e3:.0f} ms "
          f"(tifffile level-0 decode alone: {t_l0 * 1e3:.0f} ms; ratio {t_syn / t_l0:.1f}x)")


if __name__ == "__main__":
    main()
