"""HER2 scorer benchmark: speed (cells/s, 1024 x 1024 patch time) and level accuracy on
held-out synthetic ground truth.

    python benchmarks/bench_her2.py                  # speed + accuracy on seeds 10-12
    python benchmarks/bench_her2.py --seeds 10-19    # the run recorded in docs/her2.md
    python benchmarks/bench_her2.py --no-accuracy

The baseline measured in the same run is scikit-image's ``rgb2hed`` colour deconvolution of
the same patch (the unavoidable first step), so the ratio says how many deconvolutions the
whole pipeline (deconvolution, nuclei, watershed, rings, classification, score) costs.
Thresholds were calibrated on seeds 0-2; use other seeds for accuracy.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402


def _best(f, repeat: int) -> float:
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return min(ts)


def speed(repeat: int = 3) -> None:
    from skimage.color import rgb2hed

    from napari_bci.her2 import score, score_map
    from napari_bci.samples.synthetic import make_pair

    ihc = make_pair(her2="2+", size=1024, seed=0).ihc
    base = _best(lambda: rgb2hed(ihc), repeat)
    res = score(ihc, 0.5)
    t = _best(lambda: score(ihc, 0.5), repeat)
    n = len(res.centroid)
    print(f"1024x1024 patch: {t:.2f} s ({'PASS' if t < 2 else 'FAIL'}: target < 2 s), {n} cells detected, "
          f"{n / t:.0f} cells/s, {1024 * 1024 / t / 1e6:.2f} Mpx/s")
    print(f"  baseline skimage rgb2hed: {base:.3f} s -> pipeline = {t / base:.1f}x a colour deconvolution")
    big = np.tile(ihc, (2, 2, 1))  # 2048 x 2048 as a two-level pyramid, scored tile by tile
    levels = [big, big[::2, ::2]]
    t0 = time.perf_counter()
    m = score_map(levels, 0.5, tile_um=256)
    tm = time.perf_counter() - t0
    nm = len(m.overall.centroid)
    print(f"2048x2048 tile map (4 x 512 px tiles, halo 12 um): {tm:.2f} s, {nm} cells, "
          f"{nm / tm:.0f} cells/s, "
          f"{tm / (4 * t):.2f}x four single-patch scores")


def accuracy(seeds: list[int], size: int = 1024) -> None:
    from napari_bci.her2 import LEVELS, score
    from napari_bci.samples.synthetic import make_pair

    conf = np.zeros((4, 4), int)
    cells = []
    for lv in LEVELS:
        for s in seeds:
            p = make_pair(her2=lv, size=size, seed=s)
            r = score(p.ihc, p.truth.mpp)
            conf[LEVELS.index(lv), LEVELS.index(r.her2)] += 1
            cells.append(r.cells)
            if r.her2 != lv:
                print(f"  miss: truth {lv} seed {s}: {r.explanation}")
    acc = np.trace(conf) / conf.sum()
    print(f"level accuracy on seeds {seeds[0]}-{seeds[-1]} ({conf.sum()} images, {size} px): {acc:.1%} "
          f"({'PASS' if acc >= 0.95 else 'FAIL'}: target >= 95%), "
          f"median {int(np.median(cells))} tumour cells/image")
    print("confusion (rows truth 0/1+/2+/3+, columns scored):")
    for lv, row in zip(LEVELS, conf):
        print(f"  {lv:>2}: " + " ".join(f"{v:3d}" for v in row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="10-12", help="held-out seeds, e.g. 10-19")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--no-accuracy", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    lo, _, hi = a.seeds.partition("-")
    seeds = list(range(int(lo), int(hi or lo) + 1))
    speed(a.repeat)
    if not a.no_accuracy:
        accuracy(seeds, a.size)


if __name__ == "__main__":
    main()
