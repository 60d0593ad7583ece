"""The built-in model against issue 14's targets, in one run (``python benchmarks/bench_builtin.py``).

On the model card's held-out set (16 synthetic pairs of 1024x1024 px, seeds 900000-900015, 4 per
level, rendered fresh): the rule-based HER2 score (``napari_bci.her2.score``) of the generated
IHC against the truth, PSNR/SSIM (BCI-exact) and the mean membrane DAB OD of the output against
the real IHC per level; then the seconds per 512 px tile (2 threads) against the classical
baseline on the same tile, measured in the same run. Prints one line per target (met / MISSED)
and exits 1 when one is missed. A few minutes on 2 cores.

``--wide N`` then checks how far the held-out figures carry: N fresh pairs per level (1024 px,
seeds ``WIDE_SEED + 1000 * level index``, in no other set), the rule-based score of the
generated IHC against the truth, the share of tumour cells the scorer finds with faint or
stronger membrane staining, and the membrane DAB OD, generated against real, per level.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))


def main(argv=None) -> int:
    import argparse

    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default=None, help="cache the rendered held-out pairs here")
    ap.add_argument("--gains", default=None, metavar="JSON",
                    help="per-level DAB gains to try instead of the shipped config's (a JSON list for "
                         "0/1+/2+/3+ or a file holding one; null for none)")
    ap.add_argument("--sharpness", type=float, default=None,
                    help="level-map sharpness to try instead of the shipped config's (1: the head's map as trained)")
    ap.add_argument("--wide", type=int, default=0, metavar="N",
                    help="also score N fresh pairs per level beyond the held-out set (about 5 s a pair)")
    args = ap.parse_args(argv)

    from napari_bci.models.baseline import BaselineGenerator
    from napari_bci.models.registry import load_generator
    from napari_bci.train import loop as T
    from train_builtin import HELDOUT, targets, tile_time

    torch.set_num_threads(2)
    gen = load_generator("builtin", device="cpu")
    if args.gains is not None:
        import json

        text = Path(args.gains).read_text() if Path(args.gains).is_file() else args.gains
        gains = json.loads(text)
        gen.module.dab_gain = None if gains is None else [float(g) for g in gains]
    if args.sharpness is not None:
        gen.module.cond_sharpness = float(args.sharpness)
    print(f"dab_gain: {gen.module.dab_gain}, level-map sharpness: {gen.module.cond_sharpness:g}")
    t0 = time.perf_counter()
    pairs = T.synthetic_pairs(HELDOUT["n"], HELDOUT["size"], seed=HELDOUT["seed"], progress=True,
                             cache_dir=args.cache)
    model = T.evaluate_pairs(gen.module, pairs, multiple=gen.multiple, device="cpu", score=True)
    base = T.evaluate_pairs(None, pairs, multiple=16, generator=BaselineGenerator())
    for row in model["scored"]:
        print(f"  {row['name']}: truth {row['true']}, generated IHC scored {row['generated']}, "
              f"real IHC scored {row['real']}")
    print(f"held-out evaluation: {time.perf_counter() - t0:.0f} s")
    t_b = tile_time(gen)
    base_gen = BaselineGenerator()
    x = np.full((1, 512, 512, 3), 200, np.uint8)
    base_gen(x)
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        base_gen(x)
        ts.append(time.perf_counter() - t)
    t_c = float(np.median(ts))
    mc = {"heldout": {"model": model}, "tile_512_s": t_b}
    print(f"baseline (classical) on the same pairs: PSNR {base['psnr']:.2f} dB, SSIM {base['ssim']:.3f}; "
          f"builtin 512 px tile {t_b:.3f} s vs baseline {t_c:.3f} s ({t_b / t_c:.1f}x)")
    print(f"real IHC scored at the true level: {model['her2_real_correct']}/{model['n']}")
    missed = 0
    for t, v, ok in targets(mc):
        print(f"{'met   ' if ok else 'MISSED'}  {t}: {v}")
        missed += not ok
    if args.wide:
        wide(gen, args.wide, args.cache)
    return 1 if missed else 0


def wide(gen, n: int, cache) -> None:
    """Score ``n`` fresh pairs per level and print, per level, how the generated IHC reads."""
    from collections import Counter

    from napari_bci.train import loop as T
    from train_builtin import HER2_LEVELS, WIDE_SEED, wide_pairs

    print(f"beyond the held-out set: {n} fresh pairs per level (seeds {WIDE_SEED} + 1000 x level index)")
    for i, lv in enumerate(HER2_LEVELS):
        ps = wide_pairs(n, i, cache)
        res = T.evaluate_pairs(gen.module, ps, multiple=gen.multiple, device="cpu", score=True)
        rows, m = res["scored"], res["membrane_dab_by_level"][lv]
        read = Counter(r["generated"] for r in rows)
        sg = np.array([r["stained_generated"] for r in rows])
        sr = np.array([r["stained_real"] for r in rows])
        print(f"  {lv}: generated IHC scored right on {res['her2_scored_correct']}/{n} (read as "
              + ", ".join(f"{k} {v}x" for k, v in sorted(read.items())) + f"), real IHC on "
              f"{res['her2_real_correct']}/{n}; tumour cells with faint or stronger membranes "
              f"{sg.mean():.1%} (range {sg.min():.1%}-{sg.max():.1%}) generated, {sr.mean():.1%} "
              f"({sr.min():.1%}-{sr.max():.1%}) real; membrane DAB OD {m['generated']:.3f} generated, "
              f"{m['real']:.3f} real; PSNR {res['psnr']:.2f} dB, SSIM {res['ssim']:.3f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
