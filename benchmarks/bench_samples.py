"""Speed of the synthetic sample generator (run: python benchmarks/bench_samples.py).

Targets (issue 2): a 1024x1024 pair in under 2 s on one core; a 512 whole-slide tile in well
under 0.5 s. Each figure is printed as wall and CPU seconds (CPU time is what one core spends;
wall time also counts waiting on a busy machine) and as a ratio to a baseline measured in the
same run: one Gaussian blur + Beer-Lambert render of a 1024x1024 image, the bare minimum any
renderer of such an image pays.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402

from napari_bci import stain  # noqa: E402
from napari_bci.samples.synthetic import make_pair  # noqa: E402
from napari_bci.samples.wsi import make_wsi_pair  # noqa: E402


def timed(fn, repeat=3):
    best_w, best_c = np.inf, np.inf
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        best_w = min(best_w, time.perf_counter() - w0)
        best_c = min(best_c, time.process_time() - c0)
    return best_w, best_c


def baseline():
    conc = np.random.default_rng(0).random((1024, 1024, 3), dtype=np.float32) * 0.5
    blurred = np.stack([ndi.gaussian_filter(conc[..., c], 0.85, truncate=2.5) for c in range(3)], -1)
    stain.render(blurred, stain.HED_MATRIX)


def main():
    make_pair("2+", 128, seed=0)  # warm caches (noise tiles, imports)
    bw, bc = timed(baseline)
    print(f"baseline (blur + render 1024^2): wall {bw:.3f} s, cpu {bc:.3f} s")
    rows = []
    for lvl in ("0", "3+"):
        w, c = timed(lambda: make_pair(lvl, 1024, seed=1), repeat=2)
        rows.append((f"make_pair({lvl!r}, 1024)", w, c, 2.0))
    wsi = make_wsi_pair(16384, seed=0, her2="2+")
    w, c = timed(lambda: make_wsi_pair(16384, seed=0, her2="2+"), repeat=2)
    rows.append(("make_wsi_pair(16384) build (lazy)", w, c, None))
    n = len(wsi.he_levels)
    for k in range(n):
        shp = wsi.he_levels[k].shape
        # the slowest of a few tiles across the tissue (dense tumour costs most)
        spots = [(0.5, 0.5), (0.35, 0.3), (0.6, 0.7)] if shp[0] > 512 else [(0.0, 0.0)]
        for sec in ("he", "ihc"):
            worst = (0.0, 0.0)
            for fy, fx in spots:
                y = min(int(shp[0] * fy) // 512 * 512, max(0, shp[0] - 512))
                x = min(int(shp[1] * fx) // 512 * 512, max(0, shp[1] - 512))
                t = timed(lambda: wsi.render(sec, k, y, x, min(512, shp[0]), min(512, shp[1])), repeat=1)
                worst = max(worst, t, key=lambda v: v[1])
            rows.append((f"WSI {sec} tile 512, level {k} (downsample {2**k})", *worst, 0.5))
    print(f"{'what':48s} {'wall s':>8s} {'cpu s':>8s} {'cpu/base':>9s} {'cpu/target':>10s}")
    for name, w, c, target in rows:
        tgt = f"{c / target:10.2f}" if target else f"{'':>10s}"
        print(f"{name:48s} {w:8.3f} {c:8.3f} {c / bc:9.1f} {tgt}")


if __name__ == "__main__":
    main()
