"""I/O benchmark: random-tile latency through the lazy pyramid vs reading a whole level with
tifffile, streaming-writer throughput and peak memory, and peak memory of the CLI on untiled
(one-strip) TIFFs of growing size.

    python benchmarks/bench_io.py [--size 8192] [--tiles 40] [--memory-sizes 8192 16384 20000]
                                  [--only-memory | --no-memory]

Memory section: for each size N, an uncompressed N x N RGB TIFF stored as ONE strip (the worst
case for a lazy reader: 192 MiB at 8k, 1.1 GiB at 20k) of real H&E; the peak resident set
(``VmHWM``) of ``napari-bci info``, ``generate --model baseline --out X.ome.tif`` and
``ssim A A --out map.tif``, each in a fresh process. Baseline, same run: the same commands on a
1024 x 1024 image (the interpreter, numpy/dask/torch imports). Reported: MiB above the baseline
and that as a fraction of the image's bytes (flat memory: the MiB do not grow with N; a reader
that copies the image has a fraction >= 1).

Builds an OME-TIFF of SIZE x SIZE (JPEG tiles of real H&E from tests/data) with the project's
writer in a temporary folder, then times, in the same run:
  baseline  tifffile.imread of the whole level 0 (what a non-lazy reader does)
  lazy      Slide.read_region of random 512x512 regions at level 0 (what napari asks for)
and prints the ratio. Also reports open time and the CMU SVS synthesised-level cost.
"""

from __future__ import annotations

import argparse
import shutil
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


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent's memory across fork/exec
_CHILD = """
import sys, warnings
warnings.simplefilter("ignore")
from napari_bci.cli import main
rc = main(sys.argv[1:])
hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
print("MAXRSS", hwm, rc, flush=True)
"""


def _peak_mib(argv: list[str], cwd: str) -> tuple[float, int, float]:
    """(peak RSS MiB, exit code, seconds) of ``napari-bci ARGV`` in a fresh process."""
    import subprocess
    import sys

    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _CHILD, *argv], cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t
    line = [x for x in r.stdout.splitlines() if x.startswith("MAXRSS")]
    if not line:
        return float("nan"), r.returncode, dt
    _, kb, rc = line[-1].split()
    return int(kb) / 1024, int(rc), dt


def _strip_tiff(path: Path, n: int, he: np.ndarray) -> None:
    """An n x n uncompressed RGB TIFF in one strip, filled with tiles of real H&E."""
    tifffile.imwrite(path, shape=(n, n, 3), dtype=np.uint8, photometric="rgb")  # one contiguous strip
    m = tifffile.memmap(path)
    reps = -(-n // he.shape[1])
    for y in range(0, n, he.shape[0]):
        band = np.tile(he[: min(he.shape[0], n - y)], (1, reps, 1))[:, :n]
        m[y:y + len(band)] = band
    m.flush()
    del m


IO_COMMANDS = {
    "info": lambda src, d: ["info", str(src)],
    "generate": lambda src, d: ["generate", str(src), "--model", "baseline", "--out",
                                str(Path(d) / f"g_{src.stem}.ome.tif"), "--device", "cpu"],
    "ssim": lambda src, d: ["ssim", str(src), str(src), "--out", str(Path(d) / f"s_{src.stem}.tif")],
}


def memory(sizes: list[int], commands: dict | None = None) -> None:
    """Peak RSS of each ``commands[name](src, tmpdir) -> argv`` on one-strip TIFFs of ``sizes``,
    above the same command on a 1024 x 1024 one (see the module docstring)."""
    commands = commands or IO_COMMANDS
    he = read_patch(DATA / "he_carcinoma_1000.png")[:1000, :1000]
    with tempfile.TemporaryDirectory() as d:
        base_src = Path(d) / "base_1024.tif"
        _strip_tiff(base_src, 1024, he)
        base = {k: _peak_mib(f(base_src, d), d) for k, f in commands.items()}
        print("memory  peak RSS of the CLI on one-strip uncompressed TIFFs (MiB above the 1024x1024 baseline; "
              "fraction of the image's bytes)")
        print("        baseline 1024x1024: " + ", ".join(f"{k} {v[0]:.0f} MiB" for k, v in base.items()))
        for n in sizes:
            src = Path(d) / f"strip_{n}.tif"
            _strip_tiff(src, n, he)
            img_mib = n * n * 3 / 2**20
            cells = []
            for k, f in commands.items():
                peak, rc, dt = _peak_mib(f(src, d), d)
                extra = peak - base[k][0]
                status = "" if rc == 0 else f" [exit {rc}]"
                cells.append(f"{k} {peak:.0f} MiB (+{extra:.0f}, {extra / img_mib:.2f}x image, {dt:.0f} s){status}")
            print(f"        {n}x{n} ({img_mib:.0f} MiB of pixels): " + "; ".join(cells), flush=True)
            for p in Path(d).iterdir():
                if p.name != base_src.name:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()


def regions() -> None:
    """GeoJSON import and rasterisation at QuPath scale vs the floor (json.loads) and the old
    per-pixel point-in-polygon fill (skimage.draw.polygon), in the same run."""
    import json
    import warnings

    from skimage.draw import polygon as sk_polygon

    from napari_bci.regions import read_geojson

    rng = np.random.default_rng(0)
    n = 60000
    c = rng.uniform(0, 40000, (n, 2))
    t = np.linspace(0, 2 * np.pi, 13)[:-1]
    rings = np.round(c[:, None] + rng.uniform(4, 8, (n, 1, 1)) * np.stack([np.cos(t), np.sin(t)], -1), 2)
    k = 400000
    th = np.linspace(0, 2 * np.pi, k, endpoint=False)
    rad = 3000 + 30 * np.sin(th * 2000)
    big = np.round(np.stack([5000 + rad * np.cos(th), 5000 + rad * np.sin(th)], -1), 3)
    with tempfile.TemporaryDirectory() as d:
        det, one = Path(d) / "detections.geojson", Path(d) / "outline.geojson"
        det.write_text(json.dumps({"type": "FeatureCollection", "features": [
            {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [r.tolist() + [r[0].tolist()]]},
             "properties": {"objectType": "detection", "classification": {"name": "Tumor"}}} for r in rings]}))
        one.write_text(json.dumps({"type": "Feature", "properties": {},
                                   "geometry": {"type": "Polygon", "coordinates": [big.tolist()]}}))
        for path, label in ((det, f"{n} detections"), (one, f"one {k}-vertex polygon")):
            t0 = time.perf_counter()
            json.loads(path.read_text())
            t_json = time.perf_counter() - t0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                regs = read_geojson(path)
                t_read = time.perf_counter() - t0
            print(f"regions {label} ({path.stat().st_size / 1e6:.1f} MB): read_geojson {t_read:.2f} s "
                  f"vs json.loads alone {t_json:.2f} s ({t_read / t_json:.1f}x the floor)", flush=True)
        regs = read_geojson(det)
        t0 = time.perf_counter()
        for r in regs:
            x0, y0, x1, y1 = r.bounds
            r.mask((int(y1 - y0) + 3, int(x1 - x0) + 3), offset_xy=(x0 - 1, y0 - 1))
        t_ours = time.perf_counter() - t0
        sub = regs[:3000]
        t0 = time.perf_counter()
        for r in sub:
            x0, y0, x1, y1 = r.bounds
            ring = r.outline
            sk_polygon(ring[:, 1] - y0 + 0.5, ring[:, 0] - x0 + 0.5, (int(y1 - y0) + 3, int(x1 - x0) + 3))
        t_sk = (time.perf_counter() - t0) * len(regs) / len(sub)
        print(f"regions masks of {n} detections, each on its box: {t_ours:.2f} s "
              f"(skimage.draw.polygon, timed on {len(sub)}, scaled: {t_sk:.2f} s)")
        (r,) = read_geojson(one)
        t0 = time.perf_counter()
        m = r.mask((10000, 10000))
        t_big = time.perf_counter() - t0
        dec = r.outline[::100]  # the old fill costs box pixels x vertices: timed on 1/100 of them
        t0 = time.perf_counter()
        sk_polygon(dec[:, 1] - 0.5, dec[:, 0] - 0.5, (10000, 10000))
        t_sk = (time.perf_counter() - t0) * 100
        print(f"regions mask of the {k}-vertex polygon on 10000x10000: {t_big:.2f} s, {int(m.sum())} px "
              f"(skimage.draw.polygon on 1/100 of the vertices, x100: {t_sk:.0f} s; ratio {t_sk / t_big:.0f}x)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--tiles", type=int, default=40)
    ap.add_argument("--memory-sizes", type=int, nargs="+", default=[8192, 16384, 20000])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--only-memory", action="store_true")
    g.add_argument("--no-memory", action="store_true")
    g.add_argument("--only-regions", action="store_true")
    ap.add_argument("--commands", nargs="+", choices=sorted(IO_COMMANDS), default=sorted(IO_COMMANDS),
                    help="the CLI commands of the memory section")
    args = ap.parse_args()
    if args.only_memory:
        return memory(args.memory_sizes, {k: IO_COMMANDS[k] for k in args.commands})
    if args.only_regions:
        return regions()
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
    regions()
    if not args.no_memory:
        memory(args.memory_sizes, {k: IO_COMMANDS[k] for k in args.commands})


if __name__ == "__main__":
    main()
