"""HER2 scorer benchmark: speed (cells/s, 1024 x 1024 patch time), level accuracy on held-out
synthetic ground truth, and, when ``../shared/data/real_her2_mist`` is present (8 real MIST
H&E / HER2 IHC pairs, research use, never copied into the repository), on real IHC: fraction
assessable, stain pattern, levels, per-image background, time per 1024 px tile and cells/s;
the H&E of each pair refused; the learned level from the H&E beside the rule-based one.

    python benchmarks/bench_her2.py                  # speed + accuracy on seeds 10-12 + MIST
    python benchmarks/bench_her2.py --seeds 10-19    # the run recorded in docs/her2.md
    python benchmarks/bench_her2.py --no-accuracy --no-speed   # MIST only

The baseline measured in the same run is scikit-image's ``rgb2hed`` colour deconvolution of
the same patch (the unavoidable first step), so the ratio says how many deconvolutions the
whole pipeline (deconvolution, nuclei, watershed, rings, classification, score) costs.
Thresholds were calibrated on seeds 0-2; use other seeds for accuracy.
"""

from __future__ import annotations

import argparse
import glob
import os
import time
from pathlib import Path

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
    na = 0
    for lv in LEVELS:
        for s in seeds:
            p = make_pair(her2=lv, size=size, seed=s)
            r = score(p.ihc, p.truth.mpp)
            if r.her2 is None:
                na += 1
            else:
                conf[LEVELS.index(lv), LEVELS.index(r.her2)] += 1
            cells.append(r.cells)
            if r.her2 != lv:
                print(f"  miss: truth {lv} seed {s}: {r.explanation}", flush=True)
    acc = np.trace(conf) / (conf.sum() + na)
    print(f"level accuracy on seeds {seeds[0]}-{seeds[-1]} ({conf.sum() + na} images, {size} px): {acc:.1%} "
          f"({'PASS' if acc >= 0.95 else 'FAIL'}: target >= 95%), "
          f"median {int(np.median(cells))} tumour cells/image, {na} not assessable")
    print("confusion (rows truth 0/1+/2+/3+, columns scored):")
    for lv, row in zip(LEVELS, conf):
        print(f"  {lv:>2}: " + " ".join(f"{v:3d}" for v in row))


MIST = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real_her2_mist"


def mist(root: Path = MIST, learned: bool = True) -> None:
    from skimage.io import imread

    from napari_bci.her2 import score
    from napari_bci.her2.learned import compare, level_model, predict_map

    ihc = sorted(glob.glob(str(root / "IHC" / "*.jpg")))
    if not ihc:
        print(f"MIST: {root} absent, skipped")
        return
    model = level_model("builtin") if learned else None
    n_ok = refused = cells = 0
    t_all = 0.0
    levels, patterns = {}, {}
    print(f"MIST real HER2 IHC ({len(ihc)} pairs, 1024 px, 20x, mpp 0.5 assumed; no score is known):")
    for f in ihc:
        a = imread(f)[..., :3]
        t = time.perf_counter()
        r = score(a, 0.5)
        dt = time.perf_counter() - t
        t_all += dt
        cells += len(r.centroid)
        re = score(a, 0.5, estimate_stains=True)
        n_ok += r.assessable
        levels[r.display()] = levels.get(r.display(), 0) + 1
        patterns[r.pattern.get("pattern")] = patterns.get(r.pattern.get("pattern"), 0) + 1
        he_path = Path(f).parent.parent / "HE" / Path(f).name
        he = imread(he_path)[..., :3]
        hr = score(he, 0.5)
        refused += hr.reason_code == "not_ihc"
        line = (f"  {Path(f).stem:22s} {r.display():>4s} ({r.cells} tumour / {len(r.centroid)} cells, "
                f"H-score {r.h_score:.0f}, pattern {r.pattern.get('pattern')}, "
                f"bg DAB {r.stain['dab_background']:.3f}"
                f" cross-talk {r.stain['crosstalk']:.2f}, white {r.stain['white'][1]:.0f}) "
                f"estimated stains {re.display()}; {dt:.2f} s; H&E -> {hr.display()[:40]}")
        if model is not None:
            lm = predict_map(he, 0.5, model)
            line += f"; {compare(r, lm.region() if lm is not None else None)['text']}"
        print(line + ("; warnings: " + "; ".join(r.warnings) if r.warnings else ""))
    print(f"  assessable {n_ok}/{len(ihc)}; levels {levels}; patterns {patterns}; "
          f"H&E refused {refused}/{len(ihc)}")
    print(f"  {t_all / len(ihc):.2f} s per 1024 px tile, {cells / t_all:.0f} cells/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="10-12", help="held-out seeds, e.g. 10-19")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--no-accuracy", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--no-mist", action="store_true")
    ap.add_argument("--no-learned", action="store_true", help="skip the learned level on the MIST H&E")
    a = ap.parse_args()
    lo, _, hi = a.seeds.partition("-")
    seeds = list(range(int(lo), int(hi or lo) + 1))
    if not a.no_speed:
        speed(a.repeat)
    if not a.no_accuracy:
        accuracy(seeds, a.size)
    if not a.no_mist:
        mist(learned=not a.no_learned)


if __name__ == "__main__":
    main()
