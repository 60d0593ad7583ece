#!/usr/bin/env python
"""Train the built-in model shipped in the package (``napari-bci generate --model builtin``).

Reproducible: fixed seeds for the data (synthetic pairs from ``napari_bci.samples.synthetic``,
aligned with their registration truth), the initialisation and every training crop. Steps:

1. training set: 256 pairs of 512x512 px at 0.5 um/px (20x), the four HER2 levels cycled,
   seeds 1000-1255; per-epoch validation: 8 pairs of 512 px, seeds 500000-500007;
2. stage 1 (the first built-in recipe, ``STAGE1``): ``level_aware`` from scratch on the first
   128 pairs with L1 pyramid + SSIM + focal loss (skipped with ``--init W``: the shipped run
   started from the previous built-in weights, which are this stage's output);
3. stage 2 (``HP``): fine-tuning on all pairs with the membrane DAB loss, teacher-forced level
   conditioning and a pooled level map (``napari_bci.train.loop.train``);
4. stage 3 (``STAGE3``, the shipped weights): fine-tuning stage 2 with the membrane DAB loss
   weighted by the truth's DAB strength, plus its membrane-mean and crop-mean terms
   (``MembraneDabLoss(strength, pixel, match, balance)``), so that intense 3+ membranes are drawn
   intense and HER2 0 stays clean (``--init-stage3 W`` skips stages 1-2: the shipped run
   fine-tuned the stage-2 built-in weights; ``--stage3-weights W`` skips stages 1-3);
5. stage 4 (the shipped model, weights unchanged): the level map's sharpness
   (``cond_sharpness``, ``choose_sharpness``) chosen among ``SHARPNESS`` on 24 calibration pairs
   of 1024 px (seeds 700000-700007 and 710000-710015), not on the held-out set;
   tried and not shipped (``--calibrate``): per-level DAB gains of the output (``calibrate_dab``)
   fitted on the first 8 calibration pairs so that the scorer's membrane DAB matches the real IHC's;
6. model card: on a held-out set of 16 pairs of 1024x1024 px (4 per level, seeds
   900000-900015) PSNR/SSIM for the model, the classical ``baseline`` and the previous (stage 2)
   model, the rule-based HER2 score of the generated IHC, the membrane DAB OD per level, the
   level head's accuracy, the figures of the small test subset (4 pairs of 384 px, seeds
   910000-910003, frozen in tests/data/builtin_subset.npz) that ``tests/test_builtin.py``
   checks, and the training domain for the out-of-domain warning (``napari_bci.models.domain``);
7. writes ``src/napari_bci/models/weights/builtin.{safetensors,json}`` and ``docs/model_card.md``.

Run from the repository root: ``python scripts/train_builtin.py`` (stage 1 ~12 min, stage 2
~35 min, stage 3 ~30 min, evaluation ~20 min on 2 shared CPU cores, one thread; ``--steps 20``
for a smoke run of the last stage into ``--out``). Re-running resumes a finished or interrupted
stage from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from napari_bci.train import loop as T  # noqa: E402

TRAIN = {"n": 256, "size": 512, "seed": 1000}
VAL = {"n": 8, "size": 512, "seed": 500_000}
HELDOUT = {"n": 16, "size": 1024, "seed": 900_000}
TEST_SUBSET = {"n": 4, "size": 384, "seed": 910_000}
#: Fresh pairs beyond the held-out set (``bench_builtin.py --wide N``): seeds WIDE_SEED + 1000 * level index.
WIDE_SEED = 930_000
CALIB = {"n": 8, "size": 1024, "seed": 700_000}
CALIB2 = {"n": 16, "size": 1024, "seed": 710_000}
#: Stage 4: the level-map sharpness factors tried (1: the head's softmax as trained).
SHARPNESS = (1.0, 1.5, 2.0, 3.0)
HER2_LEVELS = ("0", "1+", "2+", "3+")
FIXTURE = ROOT / "tests" / "data" / "builtin_subset.npz"
#: Stage 1 (the first built-in recipe): L1 + SSIM + focal from scratch on the first 128 pairs.
STAGE1 = {"n": 128, "hp": {"arch": "level_aware", "steps": 800, "epochs": 8, "batch": 8, "crop": 128, "lr": 1e-3,
                           "ssim_weight": 10.0, "gan_weight": 0.0, "focal_weight": 2.0, "seed": 0,
                           "model_options": {"channels": [12, 24, 48, 96], "n_blocks": 3, "head_channels": 48}}}
#: Stage 2: fine-tune stage 1 on all pairs with the membrane DAB loss, teacher-forced level
#: conditioning and a level map averaged over 5x5 head cells.
HP = {"arch": "level_aware", "steps": 500, "epochs": 5, "batch": 8, "crop": 128, "lr": 5e-4,
      "ssim_weight": 10.0, "gan_weight": 0.0, "focal_weight": 2.0, "dab_weight": 25.0, "teacher_forcing": 0.5,
      "seed": 1, "model_options": {"channels": [12, 24, 48, 96], "n_blocks": 3, "head_channels": 48, "cond_pool": 5}}
#: Stage 3 (the shipped model): fine-tune stage 2 with the membrane DAB loss weighted by the
#: truth's DAB strength (intense 3+ membranes dominate), its membrane-mean (``match``) and
#: crop-mean (``balance``: stray DAB on HER2 0 costs too) terms and a lighter pixel term.
STAGE3 = {**HP, "steps": 200, "epochs": 2, "dab_weight": 40.0,
          "dab_options": {"strength": 10.0, "pixel": 0.5, "match": 1.0, "balance": 0.0}, "seed": 11}


def pairs(spec: dict, cache: Path | None, progress: bool = True):
    return T.synthetic_pairs(spec["n"], spec["size"], seed=spec["seed"], cache_dir=cache, progress=progress)


def wide_pairs(n: int, level_index: int, cache: Path | None):
    """``n`` fresh pairs of one level beyond the held-out set (seeds WIDE_SEED + 1000 x level index)."""
    return T.synthetic_pairs(n, HELDOUT["size"], seed=WIDE_SEED + 1000 * level_index,
                             levels=(HER2_LEVELS[level_index],), cache_dir=cache)


def samples_commit() -> str:
    """The last commit of the sample generator (what rendered the data)."""
    import subprocess

    try:
        out = subprocess.run(["git", "log", "-1", "--format=%h %cI", "--", "src/napari_bci/samples"], cwd=ROOT,
                             capture_output=True, text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src/napari_bci/samples"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return out + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def save_fixture(ps, path: Path) -> None:
    """Freeze the test subset (aligned H&E, IHC, valid mask, level) for tests/test_builtin.py, so
    the test checks the model, not later changes of the sample generator."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, he=np.stack([p.he for p in ps]), ihc=np.stack([p.ihc for p in ps]),
                        valid=np.stack([p.valid for p in ps]), level=np.array([p.level for p in ps]),
                        name=np.array([p.name for p in ps]))
    tmp.replace(path)


def tile_time(gen, size: int = 512, repeats: int = 5) -> float:
    """Median seconds for one ``size`` px tile through the generator interface (2 threads)."""
    import torch

    torch.set_num_threads(2)
    x = np.full((1, size, size, 3), 200, np.uint8)
    gen(x)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        gen(x)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def evaluate(gen, ps, score: bool = False) -> dict:
    from napari_bci.models.baseline import BaselineGenerator

    model = T.evaluate_pairs(gen.module, ps, multiple=16, device=gen.device, score=score)
    base = T.evaluate_pairs(None, ps, multiple=16, generator=BaselineGenerator())
    return {"model": model, "baseline": {k: base[k] for k in ("n", "psnr", "ssim", "per_level", "dab_od_by_level")}}


def r(x, n=4):
    if isinstance(x, dict):
        return {k: r(v, n) for k, v in x.items()}
    if isinstance(x, float):
        return round(x, n)
    return x


#: The stage-2 model and the first built-in model (stage 1 alone) on the held-out pairs, measured
#: when stage 3 and stage 2 were made.
EARLIER = ("The stage-2 model: PSNR 25.19 dB, SSIM 0.742, right on 11/16, membrane DAB OD 0 0.004, 1+ 0.053, "
           "2+ 0.108, 3+ 0.155. The first built-in model (stage 1 alone): PSNR 24.84 dB, SSIM 0.734, right on 8/16, membrane DAB OD "
           "0 0.002, 1+ 0.037, 2+ 0.060, 3+ 0.076.")
#: Seconds for a 512 px tile through the generator on the quiet machine (2 threads, load average
#: below 1; 14:03 UTC 2026-12-01, stage-2 weights: the same network as stage 3's).
QUIET_TILE_S = 0.22

#: Stage-3 variants tried (all fine-tuning stage 2 with seed 11 and the stage-2 terms), chosen between
#: on the 8 calibration pairs of 1024 px (seeds 700000-700007), not on the held-out set.
STAGE3_TRIED = """\
  The recipe was chosen among these variants on the 8 calibration pairs of 1024 px (seeds
  700000-700007, 2 per level), not on the held-out set; figures there: PSNR / SSIM, rule-based
  score right, membrane DAB OD at 0 / 1+ / 2+ / 3+ (real 0.007 / 0.071 / 0.182 / 0.535):

  | variant | PSNR | SSIM | scored | membrane DAB OD |
  |---|---|---|---|---|
  | stage 2 (previous model) | 26.42 | 0.783 | 6/8 | 0.011 / 0.041 / 0.103 / 0.181 |
  | **200 steps, DAB 40, strength 10, pixel 0.5, match 1 (shipped)** | 26.33 | 0.781 | 6/8 | 0.043 / 0.066 / 0.169 / 0.414 |
  | 200 steps, DAB 80, strength 20, pixel 0.25, match 2 | 25.91 | 0.771 | 6/8 | 0.056 / 0.074 / 0.170 / 0.457 |
  | 600 steps, DAB 40, strength 10, pixel 0.5, match 1, balance 4 | 25.92 | 0.776 | 5/8 | 0.040 / 0.065 / 0.236 / 0.543 |
  | 600 steps, DAB 50, strength 15, pixel 0.5, match 1, balance 8 | 25.59 | 0.770 | 5/8 | 0.034 / 0.064 / 0.246 / 0.548 |
  | 300 steps, DAB 40, strength 10, pixel 0.5, balance 4 | 25.98 | 0.777 | 6/8 | 0.037 / 0.071 / 0.217 / 0.507 |
  | 300 steps, DAB 40, strength 10, pixel 1, balance 8 | 25.87 | 0.773 | 5/8 | 0.038 / 0.069 / 0.204 / 0.498 |

  Longer or stronger membrane training draws 3+ at its true intensity but costs 0.3-0.8 dB of
  PSNR (about where the held-out PSNR target lies: these pairs read 1.2 dB above the held-out
  set) and pushes 2+ toward 3+; none keeps HER2 0 clean (the stray DAB on its cell borders is
  what the scorer reads as faint staining), the `balance` term included."""

#: The same calibration of the shipped stage-3 weights with gains allowed below 1, measured on the
#: held-out set with ``benchmarks/bench_builtin.py --gains`` (not shipped: the score target broke).
STAGE3_CALIB_TRIED = (
    '- Tried and not shipped, the same post-hoc calibration of this model (stage 3, weights unchanged) '
    'with gains allowed below 1 (`calibrate_dab(module, pairs, rounds, bounds=(0.1, 5.0))`, the same 8 '
    'calibration pairs): gains 0.164/1.091/1.067/1.293 for 0/1+/2+/3+ after one round, '
    '0.127/1.421/1.036/1.331 after two (the level-0 gain also reaches 1+ cases through the level map, '
    'which the second round compensates). On the held-out set below (`python benchmarks/bench_builtin.py '
    "--gains '[...]'`): one round gave membrane DAB OD 0.005 / 0.074 / 0.214 / 0.425 (HER2 0 now 34% "
    'under its 0.007, 3+ within 25%), PSNR 25.04 dB, SSIM 0.742, but the generated IHC scored right on '
    '13/16 (3 of 4 2+ read as 3+); two rounds met every membrane DAB target (0.007 / 0.081 / 0.219 / '
    '0.434), PSNR 24.98 dB, SSIM 0.741, but scored right on 11/16 (3 of 4 2+ as 3+, 2 of 4 1+ as 2+); one'
    ' round with 1+ and 2+ kept at 1 (0.164/1/1/1.293) still 13/16 (HER2 0 at 0.004). The 3+ gain reaches'
    " 2+ cases through the level map's 3+ share, and the model draws their membranes as a complete "
    '3+-like network, so any darkening turns them 3+; the score target (>= 14/16) broke each time, so not'
    ' shipped.'
)

TARGETS = {"scored": 14, "psnr": 24.8, "ssim": 0.73, "membrane_dab_rel": 0.25, "tile_512_s": 1.0}


def targets(mc: dict) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for the issue's targets, from a model card record."""
    h = mc["heldout"]["model"]
    out = [(f"rule-based score of the generated IHC = truth on >= {TARGETS['scored']}/16",
            f"{h['her2_scored_correct']}/{h['n']}", h["her2_scored_correct"] >= TARGETS["scored"]),
           (f"PSNR >= {TARGETS['psnr']} dB", f"{h['psnr']:.2f} dB", h["psnr"] >= TARGETS["psnr"]),
           (f"SSIM >= {TARGETS['ssim']}", f"{h['ssim']:.3f}", h["ssim"] >= TARGETS["ssim"])]
    for lv, m in h["membrane_dab_by_level"].items():
        rel = abs(m["generated"] - m["real"]) / max(m["real"], 1e-9)
        out.append((f"membrane DAB OD at {lv} within 25% of truth",
                    f"{m['generated']:.3f} vs {m['real']:.3f} (off by {rel:.0%})",
                    rel <= TARGETS["membrane_dab_rel"]))
    quiet = mc.get("tile_512_quiet_s")
    t = mc["tile_512_s"] if quiet is None else min(quiet, mc["tile_512_s"])
    out.append((f"512 px tile < {TARGETS['tile_512_s']:g} s (2 threads)",
                f"{mc['tile_512_s']:.2f} s" + ("" if quiet is None else f" ({quiet:.2f} s on the quiet machine)"),
                t < TARGETS["tile_512_s"]))
    return out


def model_card_md(cfg: dict) -> str:
    from collections import Counter

    tr, mc = cfg["training"], cfg["model_card"]
    h, b = mc["heldout"]["model"], mc["heldout"]["baseline"]
    prev = mc.get("previous", {})
    s1 = tr["data"].get("stage1", {})
    s2 = tr["data"].get("stage2", {})
    rows = "\n".join(
        f"| {lv} | {h['per_level'][lv]['psnr']:.2f} | {h['per_level'][lv]['ssim']:.3f} | "
        f"{b['per_level'][lv]['psnr']:.2f} | {b['per_level'][lv]['ssim']:.3f} | {h['dab_od_by_level'][lv]:.4f} |"
        for lv in h["per_level"]
    )
    score_rows = []
    for lv in h["per_level"]:
        rr = [x for x in h["scored"] if x["true"] == lv]
        cells = []
        for k in ("generated", "real"):
            c = Counter(str(x[k]) for x in rr)
            cells += [", ".join(f"{n}x {v}" for v, n in sorted(c.items())), f"{sum(x[k] == lv for x in rr)}/{len(rr)}"]
        m = h["membrane_dab_by_level"][lv]
        score_rows.append(f"| {lv} | " + " | ".join(cells) + f" | {m['generated']:.3f} | {m['real']:.3f} |")
    score_rows = "\n".join(score_rows)
    md_ = h["membrane_dab_by_level"]
    low = [lv for lv, m in md_.items() if m["generated"] < 0.75 * m["real"]]
    under = ("The output's membranes are still paler than the real IHC's at " + ", ".join(low) +
             " (generated/real membrane DAB " + ", ".join(f"{md_[lv]['generated'] / max(md_[lv]['real'], 1e-9):.0%}"
                                                         for lv in low) +
             "): thin membrane DAB is only partly recovered there.") if low else ""
    high = [lv for lv, m in md_.items() if m["generated"] > 1.25 * m["real"]]
    if high:
        under += (" " if under else "") + ("The output's membranes are darker than the real IHC's at " +
                                           ", ".join(high) + " (generated/real membrane DAB " +
                                           ", ".join(f"{md_[lv]['generated'] / max(md_[lv]['real'], 1e-9):.0%}"
                                                     for lv in high) + ").")
    wrong = [x for x in h["scored"] if x["generated"] != x["true"]]
    if wrong:
        under += (" " if under else "") + "Misread: " + ", ".join(
            f"{x['name']} (truth {x['true']}) as {x['generated']}" for x in wrong) + "."
    target_rows = "\n".join(f"| {t} | {v} | {'met' if ok else '**missed**'} |" for t, v, ok in targets(mc))
    prev_line = ""
    if prev:
        prev_line = (f"\nThe previous built-in model (the same weights with the head's level map as trained, "
                     f"sharpness 1) on the same pairs: PSNR {prev['psnr']:.2f} dB, "
                     f"SSIM {prev['ssim']:.3f}, rule-based score of its output right on {prev['her2_scored_correct']}/16"
                     + (", membrane DAB OD " + ", ".join(f"{lv} {v['generated']:.3f}"
                                                         for lv, v in prev["membrane_dab_by_level"].items())
                        if prev.get("membrane_dab_by_level") else "") + ". " + EARLIER + "\n")
    loss = tr["loss"]
    dopt = loss.get("membrane_dab_options") or {}
    what = {"strength": "each pixel's weight grows by that much per unit of the truth's pooled DAB OD, so intense "
                        "3+ membranes dominate",
            "pixel": "the pixel DAB term, which pulls uncertain thin membranes toward the pale mean",
            "match": "per crop, the mean pooled DAB over the truth's membranes: the intensity the scorer averages",
            "balance": "per crop, the mean pooled DAB of the whole crop: stray DAB on a HER2 0 case costs too"}
    opts = ", ".join(f"`{k}` {dopt[k]:g} ({what[k]})" for k in what if dopt.get(k))
    stage3_ft = (
        f"- Stage 3 (the shipped weights): {tr['steps']} steps ({tr['epochs']} epochs of {tr['steps_per_epoch']}) fine-tuning "
        f"stage 2 on all pairs, the same crops, optimiser, schedule, L1/SSIM/focal terms and teacher forcing "
        f"({tr.get('teacher_forcing', 0):g}) as stage 2, seed {tr['seed']}, with the membrane DAB loss at weight "
        f"{loss.get('membrane_dab', 0):g} and the options {opts}.\n{STAGE3_TRIED}")
    sharp_rows = "\n".join(
        f"  | {row['sharpness']:g}{' (shipped)' if row['sharpness'] == cfg.get('cond_sharpness', 1.0) else ''} | "
        f"{row['scored']}/{row['n']} | " + " / ".join(f"{g:.3f}" for g, _ in row["membrane_dab"].values()) + " |"
        for row in mc.get("sharpness_tried", []))
    real_mem = " / ".join(f"{t:.3f}" for _, t in mc["sharpness_tried"][0]["membrane_dab"].values()) \
        if mc.get("sharpness_tried") else ""
    stage4 = (f"""- Stage 4 (this model, the stage-3 weights unchanged): the decoder's level map sharpened by
  `cond_sharpness` {cfg.get('cond_sharpness', 1.0):g} (the head's pooled logits times that factor before the softmax). The head's
  map is soft (its largest share is often 0.4-0.6), while teacher forcing taught the decoder each
  level from one-hot maps, so a soft map drew a pale mixture of levels (3+ at two thirds of its
  membrane DAB). The factor was chosen (`choose_sharpness`: most pairs scored right, then the
  smallest mean membrane DAB error) on 24 calibration pairs of 1024 px (seeds 700000-700007 and
  710000-710015, 6 per level), not on the held-out set; membrane DAB OD at 0 / 1+ / 2+ / 3+ (real
  {real_mem}):

  | sharpness | scored right | membrane DAB OD |
  |---|---|---|
{sharp_rows}

  A sharper map cannot separate HER2 0 from 1+: the head confuses them (their synthetic H&E
  differs only slightly: 5% in nucleus size, 8% in nuclear hematoxylin, in pleomorphism and
  tumour density, each with a per-case jitter as large), and even with the true level 0 forced
  the decoder draws some stray border DAB (membrane DAB 0.012-0.039 on the three HER2 0 pairs
  of seeds 710000-710011, truth 0.007-0.008). On the 24 calibration pairs the level-0 share of the
  decoder's map averages 0.47-0.66 over the HER2 0 pairs and 0.36-0.72 over the 1+ pairs: the
  two overlap, so nothing keyed to the map can clean HER2 0 alone. Tried there and not shipped:
  a level-0 DAB gain alone (0.28, fitted on those pairs) brought HER2 0 to 0.007 (truth 0.008)
  but 1+ to 0.022 (truth 0.063), 4 of 6 1+ read as 0 (20/24 right, was 21/24); pooling the
  head's logits over 9, 15 or 31 cells instead of 5 left HER2 0 at 0.031-0.034 (20-21/24); a
  fine-tune of this model with a one-sided term on HER2 0 crops (the output's pooled DAB above
  the truth's by over 0.01 OD, weight 8-20, 150-600 steps, otherwise the stage-3 recipe) brought
  HER2 0 to 0.005-0.008 and 2+/3+ to 0.18-0.21/0.46-0.51, but 1+ to 0.017-0.020, 17-18/24 right:
  the network as a whole does not tell the two apart either.

  Tried later and not shipped, a *case head*: a linear classifier (multinomial logistic
  regression, L2 0.01, L-BFGS) on statistics of the whole input window (the mean of each encoder
  stage, the SD of the three strided ones, the dense head's mean logits: 352 numbers,
  standardised), fitted on the 256 training H&E of 512 px with the network frozen. It reads the
  level far better than the dense head: 89% right on the training images, 22/24 on the 24
  calibration pairs (every HER2 0 right, two 1+ read as 0), where the dense head's tile means give
  the HER2 0 pairs a level-0 probability of only 0.44-0.62. With the decoder conditioned on its
  softmax (sharpened by 3, one level per window): 21/24 scored right on the calibration pairs; on
  the held-out set 15/16, PSNR 25.16 dB, SSIM 0.739, membrane DAB OD 0.017 / 0.069 / 0.219 / 0.481
  (real 0.007 / 0.074 / 0.184 / 0.510): every target but HER2 0 (2.4x). The reason is the decoder:
  forcing the true level in changes its membranes little (the 0.012-0.039 above, against
  0.013-0.046 with its own map on the same three pairs), since it reads the level from the
  encoder's skip features as much as from the condition, and a fine-tune that always feeds it the
  true level (teacher forcing 1, the crop-mean balance term at 4, 300 steps, the case head
  refitted after it) left HER2 0 at 0.027 on the calibration pairs. A level-0 DAB gain under the
  case head's condition (one calibration round: 0.318 / 1.52 / 1.33 / 1.11) gave 23/24 and 0.005 /
  0.050 / 0.195 / 0.548 on the calibration pairs but 13/16 and 0.000 / 0.096 / 0.255 / 0.540 on
  the held-out set. Why HER2 0 is the hard level: the scorer counts a cell's membrane only above
  its faint threshold, and the real HER2 0 has faint staining on about 5% of its tumour cells, at
  random; which cells is not visible in the H&E, so a deterministic generator draws their
  expectation, a faint yellow network on every cell close to that threshold (seen on HER2 0 pair
  700000 with level 0 forced, beside its real IHC), and any gain moves all the cells across the
  threshold together. Matching 0.007 means drawing faint membranes on a few cells and none on the
  rest, which takes a model that samples (an adversarial or diffusion generator) rather than a
  better gain. The case head was not shipped: it leaves that target missed, and one level per
  window makes the output depend on the whole window, so the tile engine would feather windows at
  half-tile stride on slides (4x the windows per tile) for one more pair right in 16.

  Tried after that and not shipped, the adversarial route: the shipped weights fine-tuned for
  300 more steps by the stage-3 recipe (learning rate 2e-4, seed 21) with a conditional PatchGAN
  term (pix2pix's 70 px discriminator, 32 filters, trained from scratch alongside) of weight 0.3
  or 1, against the same fine-tune without it, on the 24 calibration pairs: HER2 0 membrane DAB
  0.042 and 0.049 against 0.036 without it (the shipped model 0.031, truth 0.008), 3+ 0.300 and
  0.376 against 0.456 (truth 0.534), 18/24 and 15/24 scored right against 17/24 (the shipped
  model 21/24). The discriminator does not teach the generator to stain a few cells and leave the
  rest clean: the generator has no noise input, so it cannot pick cells at random, and it draws
  more faint DAB on every cell instead. Sampling needs a noise input that the decoder cannot
  ignore (or a diffusion model), which this architecture lacks. A loss that does not care which
  cells are stained, only how many and how strongly (the L1 between the sorted pooled DAB values
  of the output and of the truth in each crop, weight 5 or 20 inside the DAB term, the same
  fine-tune otherwise), brought HER2 0 down only a little: 0.028 and 0.026 against 0.036, while
  3+ rose to 0.559 and 0.614 and 2+ began to read as 3+ (18/24 and 17/24 right).

  What the HER2 0 target takes (a later turn's analysis), which corrects the sampling argument
  above. Per cell, on the 6 HER2 0 calibration pairs, the scorer finds stained membrane sectors
  on 10-12 % of the real IHC's tumour cells (mean intensity 0.065-0.072 OD) and on 26-79 % of
  the generated IHC's (0.051-0.061 OD); on the 6 1+ pairs, 35-87 % real (0.087-0.098) and 18-93 %
  generated (0.051-0.079). The model draws both levels at the same faint intensity and varies the
  share of cells, and its HER2 0 shares span the 1+ range: the excess is the two levels confused,
  not a faint wash on every cell, so no intensity transform separates them (a uniform DAB dead
  zone, 0.01-0.03 OD subtracted before the scorer, left HER2 0 at 0.021-0.028, 19-20/24 right, and
  cost up to 1.2 dB). And a sampling generator would not escape the confusion either: how well
  *any* model can tell HER2 0 from the H&E is bounded by the synthetic tissue itself, whose
  levels differ in the H&E only through per-case morphology parameters with overlapping
  jitter. `python scripts/her2_information_limit.py` gives an oracle the exact parameters of
  10,000 HER2 0 cases (the two stain intensities times the case's stain gain, as the image shows
  them) and the Bayes posterior over the levels: it puts 3.1 % on 1+ on average, so a calibrated
  generator (least squares, or a sampler of the right conditional distribution) with perfect
  knowledge of the case would draw 0.0093 OD at HER2 0, above the target band (0.0054-0.0090
  around the real 0.0072); a hard-deciding one, the most probable level's membranes, 0.0084,
  inside it, by reading 98.2 % of the HER2 0 cases right where 97.3 % is the least the band
  allows. With the tumour-density cue hidden (in the image it is mixed with the random tissue
  layout) the oracle gets 0.0107 and 0.0092, both outside. The target therefore needs a
  near-oracle, hard case-level decision (a whole-image level fed to the decoder, like the case
  head above, which read every calibration HER2 0 right but misreads 2 of 24 pairs) and a decoder
  that draws level 0 clean under it; the dense head, reading 80 px at a time, confuses 2 of 6
  calibration HER2 0 pairs with 1+.

  That route, tried on the same turn and not shipped: the case head above (refitted, 91 % right
  on the training images), its most probable level fed to the decoder as a hard one-hot
  condition, and the decoder fine-tuned for 300 steps from the shipped weights by the stage-3
  recipe (learning rate 2e-4, seed 21) with teacher forcing 1 (always the true level) and a
  one-sided term on the HER2 0 samples (the output's pooled DAB above the truth's by more than
  0.01 OD, weight 0, 1, 3, 10 or 30). On the 24 calibration pairs, membrane DAB OD at 0 / 1+ /
  2+ / 3+ (real 0.008 / 0.063 / 0.206 / 0.534) and pairs scored right:

  | one-sided weight | scored right | membrane DAB OD |
  |---|---|---|
  | 0 | 21/24 | 0.030 / 0.047 / 0.170 / 0.541 |
  | 1 | 23/24 | 0.008 / 0.039 / 0.165 / 0.540 |
  | 3 | 23/24 | 0.002 / 0.035 / 0.162 / 0.543 |
  | 10 | 22/24 | 0.000 / 0.031 / 0.158 / 0.544 |
  | 30 | 21/24 | 0.000 / 0.023 / 0.150 / 0.539 |

  At weight 0 the decoder still draws 1+ membranes on two HER2 0 pairs that the case head reads
  as 0 (it takes the level from the encoder's skip features as well as from the condition); the
  term cleans HER2 0 and pales 1+ with it. Weight 1 centred HER2 0 on the calibration pairs, but
  on the held-out set it gave 15/16 scored right (one 2+ read as 3+), PSNR 25.20 dB, SSIM 0.744,
  membrane DAB OD 0.003 / 0.060 / 0.243 / 0.534 (real 0.007 / 0.074 / 0.184 / 0.510): HER2 0
  57 % under and 2+ 32 % over, two targets missed instead of one. The band at HER2 0 (+-0.0018
  OD) is narrower than the shift between the two sets of pairs, so a weight tuned on one does
  not hold on the other; and the case head would still need the tile engine to pass each tile
  a whole-image level (a context pass over the slide) to stay seam-free.""" if sharp_rows else "")
    if cfg.get("dab_gain"):
        stage3 = (f"- Stage 3, DAB calibration: the output's DAB concentration times a per-level gain mixed by the "
                  f"level map (`dab_gain` {cfg['dab_gain']} for 0/1+/2+/3+, ramped in between DAB OD 0.04 and "
                  "0.12), fitted on 8 calibration pairs of 1024 px (seeds 700000-700007).")
    else:
        stage3 = ("- Tried and not shipped, post-hoc calibration of stage 2 (`--calibrate`): per-level DAB gains of "
                  "the output (model option "
                  "`dab_gain`) fitted on 8 calibration pairs of 1024 px (seeds 700000-700007) so that the scorer's "
                  "membrane DAB of the output matches the real IHC's. With the one-round gains 1.00/1.74/1.76/2.95 "
                  "the held-out set below gave: generated IHC scored right on 11/16 (every 3+ now right, but 3 of "
                  "4 2+ read as 3+ and 2 of 4 1+ as 2+), PSNR 23.50 dB, SSIM 0.727, membrane DAB OD within 25% "
                  "at 0, 1+ and 3+ (2+ 47% high): worse PSNR/SSIM than stage 2, so not shipped; stage 3 "
                  "instead trains the intensity into the network.\n" + STAGE3_CALIB_TRIED)
    dom = cfg.get("domain")
    dom_txt = ""
    if dom:
        dom_txt = f"""
## Out-of-domain warning
The config records the training domain (`"domain"`): mean and covariance of six colour and
texture statistics (`napari_bci.models.domain.FEATURES`: hematoxylin and eosin mean and SD,
deconvolution residual SD, fine texture) of its {dom['n']} training H&E images. `napari-bci
generate` prints a one-line warning and the Virtual IHC widget shows a notification and a note
when an input's Mahalanobis distance from them exceeds {dom['threshold']:g}. Measured when the
check was made: the package's synthetic samples 1.2-3.9, every real H&E tried (CMU-1-Small-Region,
the test-data H&E images, the 8 MIST H&E tiles) 9-50.
"""
    return f"""# Model card: `builtin` (HER2-level-aware virtual IHC generator)

> **Trained on synthetic tissue. A demonstration default, not a clinical model.** It has never
> seen a real slide and says so: on real H&E the CLI and the widget warn that the input is out
> of its domain. For real tissue load a published BCI model (BCIStainer or ASP weights) or
> train on the BCI dataset (see [training.md](training.md)) and load your checkpoint with `--model PATH`.

## What it is
- Architecture `level_aware` (`napari_bci.models.level_aware`): a compact U-Net-style
  encoder-decoder (stride-2 encoder {'/'.join(str(c) for c in cfg['channels'])} channels, {cfg['n_blocks']} residual blocks at 1/8
  resolution, bilinear decoder with skips, BatchNorm) whose encoder feeds a dense HER2-level
  head (1/16 resolution); the head's level map, its logits averaged over {cfg.get('cond_pool', 1)}x{cfg.get('cond_pool', 1)} head cells
  (80 px, 40 um) and sharpened by {cfg.get('cond_sharpness', 1.0):g} before the softmax, modulates every residual block and every decoder stage down to
  full resolution (FiLM), in the spirit of BCIStainer. The tile's level is the mean of the
  head's logits (`predict_her2`).
- {mc['parameters']:,} parameters, {mc['size_mb']:.1f} MB (float32 safetensors). A 512x512 tile takes
  {mc.get('tile_512_quiet_s', QUIET_TILE_S):.2f} s on this 2-core CPU when it is quiet (median of 5 runs, 2 threads; the classical
  baseline 0.03 s); when the card was written, with other jobs on the 2 cores (load average
  {mc.get('load_average', '?')}), it took {mc['tile_512_s']:.2f} s.
- Input: H&E RGB at 20x (0.5 um/px); output: HER2 IHC RGB of the same size; tile {cfg['tile']},
  halo {cfg['halo']} px.

## Training data and procedure
- {tr['data']['train_pairs']} synthetic pairs of {tr['data']['size']}x{tr['data']['size']} px from
  `napari_bci.samples.synthetic.make_pair` as of commit {tr['data'].get('sample_generator', '?')} (seeds {tr['data']['train_seeds'][0]}-{tr['data']['train_seeds'][1]},
  HER2 0, 1+, 2+, 3+ cycled), the H&E warped onto the IHC frame with the known registration
  truth (as BCI aligned its pairs); only fully valid crops are used.
- Stage 1 (the first built-in model's recipe): {s1.get('steps', '?')} steps from a random initialisation on the first
  {s1.get('train_pairs', '?')} pairs (seeds {'-'.join(str(x) for x in s1.get('train_seeds', []))}), batch {s1.get('batch', '?')}, {s1.get('crop', '?')} px crops, Adam lr {s1.get('lr', '?')},
  PyramidPix2pix L1 + {s1.get('ssim_weight', '?')} x (1 - SSIM) + {s1.get('focal_weight', '?')} x focal loss of the head.
- Stage 2: {s2.get('steps', '?')} steps ({s2.get('epochs', '?')} epochs) fine-tuning stage 1 on all pairs, batch {s2.get('batch', '?')},
  {s2.get('crop', '?')}x{s2.get('crop', '?')} crops with flips/rotations, Adam lr {s2.get('lr', '?')} (beta1 0.5), constant then
  linearly decayed over the second half. Loss: PyramidPix2pix L1 at full, 1/2, 1/4, 1/8 scale (each
  weight {loss['pyramid_l1_weights'][0]:g}) + {s2.get('ssim_weight', '?')} x (1 - SSIM) + {s2.get('dab_weight', '?')} x membrane DAB loss
  (`napari_bci.train.losses.MembraneDabLoss`: L1 of the DAB optical density max-pooled over 5x5 px,
  5x weight on the truth's membranes, + pixel DAB L1 on them: the scorer reads a ring sector's
  maximum DAB, so a thin membrane a pixel off still counts instead of being averaged away) +
  {s2.get('focal_weight', '?')} x focal loss; teacher forcing {s2.get('teacher_forcing', '?')} (that fraction of samples
  conditions the decoder on the true level, so the decoder learns to draw each level's membranes).
  Seed {s2.get('seed', '?')}, 31.2 min wall time. It drew the membranes where the real IHC has them but too
  pale (3+ at 30% of the real membrane DAB, read as 2+).
{stage3_ft}
  No adversarial term in any stage (GAN weight {loss['gan']:g}): a PatchGAN step costs 2.7x a generator
  step on this shared 2-core CPU, which the training budget did not allow.
{stage4}
{stage3}
- Device {tr['device']}, stage 3 {tr['wall_s'] / 60:.1f} min wall time (2 cores shared with other jobs),
  torch {tr['torch']}. Reproduce with `python scripts/train_builtin.py` (all four stages); the
  shipped run took the stage-3 weights of commit 7e2d220 (`--stage3-weights`), which had
  fine-tuned the stage-2 built-in weights (`--init-stage3`), which had fine-tuned the first
  built-in weights, stage 1's output.

## Targets (issue 14), measured on the held-out set below
| target | measured | |
|---|---|---|
{target_rows}

Printed by `python benchmarks/bench_builtin.py` (one run).

How far these figures carry (`python benchmarks/bench_builtin.py --wide 16`: 16 fresh pairs per
level of 1024 px, seeds 930000-930015, 931000-931015, 932000-932015, 933000-933015, in no other
set; this model as shipped). The held-out set's 16 pairs are a small sample, and on 64 fresh
pairs two of the targets that it meets are missed as well:

| HER2 | generated IHC scored right | read as | tumour cells with faint or stronger membranes, generated / real | membrane DAB OD, generated / real |
|---|---|---|---|---|
| 0 | 15/16 | 0 15x, 1+ 1x | 3.8% (0.2-22.4%) / 2.4% (0.0-3.8%) | 0.021 / 0.008 |
| 1+ | 11/16 | 0 1x, 1+ 11x, 2+ 4x | 50.0% (4.5-86.9%) / 45.8% (17.7-58.2%) | 0.067 / 0.068 |
| 2+ | 10/16 | 1+ 1x, 2+ 10x, 3+ 5x | 80.9% (50.7-98.9%) / 76.3% (46.0-87.9%) | 0.186 / 0.193 |
| 3+ | 16/16 | 3+ 16x | 88.2% (67.0-97.1%) / 85.9% (70.7-95.8%) | 0.376 / 0.531 |

52/64 scored right (81 %, against the 14/16 = 88 % target) and 3+ membranes 29 % paler than
the real ones (the target allows 25 %); 1+ and 2+ membrane DAB stay within 4 %, the real IHC
scores right on 64/64. The errors are level confusions between neighbours, mostly upward (1+
drawn as 2+, 2+ as 3+). The dense head decides the level from 80 px at a time, but a wider
decision does not remove these errors (below). At HER2 0 the
excess membrane DAB sits mostly in cells that the scorer counts as unstained (one or two of
their ring sectors just reach its 0.04 OD threshold: 49 % of the tumour cells of pair 900000
against 13 % in its real IHC), so 15 of 16 HER2 0 cases still show faint staining on at most
8 % of their tumour cells, as the real ones do (up to 4 %); but one case (930006, 22 %) reads
as 1+, the HER2-low call that a HER2 0 case must not get.

Is the level decision what limits the score? Measured with `python scripts/context_head_experiment.py`
(nothing there changes this model): a *context head*, a multinomial logistic regression on encoder
statistics over a sliding window of 16 x 16 head cells (256 px; the window means of every encoder
stage, the SDs of the strided ones and the dense head's mean logits, fitted on the 256 training
H&E with the network frozen; 74 % of the training cells right). Convolutional, it would need a
halo of 128 px more, not feathered windows. It reads the image-mean level far better than the
dense head: 15/16 on the held-out set (dense head 13/16) and 59/64 on the 64 fresh pairs above
(dense head 49/64: it reads 8 of the 16 1+ as 0, yet this model's IHC scores 11 of the 16 1+ right).
The virtual IHC drawn under its map (softmax of its logits times 3) scores *worse*:

| decoder, under the context head's map | held-out scored right | 64 fresh pairs scored right | membrane DAB OD on the fresh pairs, 0 / 1+ / 2+ / 3+ (real 0.008 / 0.068 / 0.193 / 0.531) |
|---|---|---|---|
| this model's | 10/16 | 50/64 (0 as 1+ 1x, 1+ as 2+ 5x, 2+ as 3+ 8x) | 0.021 / 0.072 / 0.210 / 0.455 |
| fine-tuned 600 steps on the true level, one-sided term 0.5 (`--finetune 600 --one-sided 0.5`) | 10/16 | 49/64 (1+ as 2+ 6x, 2+ as 3+ 8x, 1+ as 0 1x) | 0.003 / 0.076 / 0.247 / 0.487 |

(The fine-tune alone takes 3 min on 2 cores: only the decoder learns, on crops of 128 px always
conditioned on the true level.) Under a confident, mostly correct level the decoder draws 1+ and
2+ membranes that the scorer reads a level up; the shipped model's soft 80 px map mixes in the
neighbouring levels and so pales them, which is why it scores better than its own head reads.
So a case-level decision alone (the route the analyses above proposed) does not reach the score
target. The decoder's membranes are off per case, not per level: the same fine-tune without the
one-sided term drew 1+ at 0.045 on the calibration pairs (real 0.063) but 0.097 on the held-out
set (real 0.074), so no per-level gain corrects both. What is left to try is a decoder whose
membrane intensity and completeness follow the case's H&E as the real IHC does (for example a
loss on the scorer's own per-cell reading), under a context decision like this one.

That loss, tried next and not shipped: `CellReadingLoss` (`napari_bci.train.losses`) runs the
scorer once on each training IHC, keeps its tumour cells' ring sectors and stain model, and reads
the output there as the scorer does (its smoothing, maximum filter and sector maxima, the faint
threshold softened to a sigmoid of 0.005 OD; with a hard threshold it gives the scorer's per-cell
intensities). Per crop it compares the sorted per-cell intensities and completeness of output and
truth, and the soft shares of cells that the scorer counts as stained, weak-moderate, and
weak-moderate or intense with a complete membrane: how many cells and how strongly, not which.
The same decoder fine-tune as above (600 steps, true level) with this term added, on the held-out
set, under the context head's map and under the model's own (dense) map:

| loss besides L1 / SSIM | held-out scored right, context map / dense map | membrane DAB OD, dense map, 0 / 1+ / 2+ / 3+ (real 0.007 / 0.074 / 0.184 / 0.510) |
|---|---|---|
| stage-3 DAB loss, cell reading 40 / 4 / 0 | 10/16 / 11/16 | 0.001 / 0.077 / 0.259 / 0.454 |
| DAB loss at 10, cell reading 80 / 8 / 0 | 10/16 / 10/16 | 0.001 / 0.078 / 0.249 / 0.450 |
| DAB loss at 20, cell reading 40 / 4 / 20 | 10/16 / 10/16 | 0.003 / 0.080 / 0.242 / 0.445 |
| DAB loss without `strength`, cell reading 40 / 4 / 20 (`--finetune 600 --cell 40,4,20 --strength 0`, `--map dense`) | 10/16 / 10/16 | 0.002 / 0.081 / 0.236 / 0.435 |

The same six pairs are misread in every run but one (the first row's dense map reads 900001
right), as in the fine-tune without the term (1+ pairs 900001, 900005, 900013 as 2+; 2+ pairs
900002, 900006, 900014 as 3+), and the term does not fall
during training, so it is not the loss that keeps the decoder from the scorer's reading. The
real IHC sits under a cutoff in every 1+ and 2+ pair: the real 2+ pairs have intense membranes
on 5-6 % of their tumour cells, where 3+ takes complete intense ones on more than 10 %, and the
real 1+ pairs weak-moderate ones on 4-5 %; the shipped model draws intense membranes on 32 % and
14 % of the tumour cells of the two 2+ pairs it reads as 3+ (900002, 900014). Even on training
images (512 px; the first 8 1+ and 7 2+ ones that the scorer reads at their level) the shipped
model's IHC scores 5 of the 8 1+ and 4 of the 7 2+ right, the third row's decoder 3 and 4: the network does not fit the scorer's reading on the data it
learnt from. Which cells of a case are a class higher, and how many, is not something this
encoder's features carry (compare the information limit above, for HER2 0); with the encoder
frozen no decoder loss supplies it. Nor does training the encoder with it at this budget: the
whole network fine-tuned the same way (600 steps, the fourth row's loss plus the head's focal
loss; a one-off variant of the script, not committed) scores 10/16 under its own map, PSNR 24.77
dB, SSIM 0.741, membrane DAB 0.005 / 0.092 / 0.268 / 0.456, the same six pairs misread. Every
fine-tune conditioned on the true level misreads them, while the shipped model (half its samples
on its own soft map) reads four of the six right: what is left is a longer joint training on its
own map with this term (CPU hours here, minutes on a GPU), or a generator that samples.

## Evaluation (held-out synthetic pairs, different seeds)
{h['n']} pairs of 1024x1024 px (seeds {mc['heldout_seeds'][0]}-{mc['heldout_seeds'][1]}, 4 per level; sample generator
as of commit {mc['sample_generator']}),
the aligned H&E in (whole image), compared with the real synthetic IHC on the valid region; BCI-exact PSNR
(data range 255) and SSIM (7x7 uniform window on colour uint8, mean over channels).

| | PSNR (dB) | SSIM | HER2 accuracy (head) |
|---|---|---|---|
| `builtin` | **{h['psnr']:.2f}** | **{h['ssim']:.3f}** | {h['her2_accuracy']:.2f} |
| `baseline` (classical stain mapping) | {b['psnr']:.2f} | {b['ssim']:.3f} | - |
{prev_line}
Per level:

| HER2 | PSNR | SSIM | baseline PSNR | baseline SSIM | mean DAB OD of output |
|---|---|---|---|---|---|
{rows}

## HER2 level of the generated IHC
The rule-based ASCO/CAP scorer (`napari_bci.her2.score`, 0.5 um/px) on the generated IHC and on
the real (synthetic ground-truth) IHC of the same pairs; membrane DAB OD: the scorer's per-cell
membrane intensity averaged over its tumour cells (`napari_bci.train.loop.membrane_dab`).

| HER2 | scored generated IHC | correct | scored real IHC | correct | membrane DAB OD, generated | real |
|---|---|---|---|---|---|---|
{score_rows}

Scored generated IHC: {h['her2_scored_correct']}/{h['n']} correct; real IHC: {h['her2_real_correct']}/{h['n']}.
{under}

Test subset ({mc['test_subset']['model']['n']} pairs of {mc['test_subset_size']} px, seeds {mc['test_subset_seeds'][0]}-{mc['test_subset_seeds'][1]},
frozen in `{mc['test_subset_file']}` and checked by `tests/test_builtin.py`): PSNR {mc['test_subset']['model']['psnr']:.2f} dB, SSIM
{mc['test_subset']['model']['ssim']:.3f} (baseline {mc['test_subset']['baseline']['psnr']:.2f} / {mc['test_subset']['baseline']['ssim']:.3f}).
{dom_txt}
## Limits
- Synthetic tissue only: real H&E differs in texture, colour, artefacts and in how (weakly) it
  encodes HER2 status. On real 20x BCI pairs the previous built-in model gave a lavender wash
  without DAB (16.1 dB / 0.53); the numbers above say nothing about real slides (the BCI
  challenge's best real-data figures are about 22.9 dB / 0.57).
- The level comes from the H&E morphology of the case (nucleus size, hyperchromasia,
  pleomorphism in the synthetic tissue); which individual cell is stained is not visible in
  the H&E, so the model draws each level's typical membranes, not the real cell-by-cell pattern.
- The slide demo (`napari-bci demo`, since this model a 3+ whole-slide sample): on its tumour
  view the level head reads 3+ (0.01 / 0.04 / 0.34 / 0.60 for 0 / 1+ / 2+ / 3+) and the model draws
  the membrane network of every tumour cell, ochre and more diffuse than the real dark-brown DAB
  (README screenshots, `--zoom 3` for the close-up). On the 2+ sample (`--her2 2+`) the head reads
  its tumour view as 0-1+ (0.43 / 0.39 / 0.16 / 0.02) and the virtual IHC shows only faint
  yellowish cell borders where the real IHC is brown, also at its strong-DAB spot (level-0
  x, y = 12432, 12960: head 1+): the demo shows 3+ by default for that reason.
- Not for diagnosis.
"""


def domain_record(train_pairs) -> dict:
    """The training domain (colour/texture statistics of the training H&E) for the
    out-of-domain warning (napari_bci.models.domain)."""
    from napari_bci.models.domain import domain_stats

    return domain_stats([p.he for p in train_pairs], source="synthetic")


def scored_outputs(module, ps, real: dict) -> list[tuple[int, str, float, float]]:
    """The model as it runs on each calibration pair's valid box, scored by the rule-based scorer:
    (true level, scored level, membrane DAB of the output, of the real IHC) per pair; ``real``
    caches the real IHC's membrane DAB by pair name."""
    import torch

    from napari_bci.her2 import score

    out = []
    for p in ps:
        y0, y1, x0, x1 = T.valid_box(p.valid, p.ihc.shape[:2], 16)
        he, gt = p.he[y0:y1, x0:x1], p.ihc[y0:y1, x0:x1]
        if p.name not in real:
            real[p.name] = T.membrane_dab(score(gt, mpp=0.5))
        x = torch.from_numpy(np.ascontiguousarray(he)).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.inference_mode():
            img, _ = module(x)
        gen = score(img[0].add(1).mul(127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy(), mpp=0.5)
        out.append((p.level, gen.her2, T.membrane_dab(gen), real[p.name]))
    return out


def calibrate_dab(module, ps, rounds: int = 1, bounds=(1.0, 5.0)) -> list[float]:
    """Per-level DAB gains (stage 3): the factor that makes the scorer's mean membrane DAB of the
    output (the model as it runs, its own level map mixing the gains) match the real IHC's,
    averaged over the calibration pairs of each true level (``rounds`` > 1 refines it)."""
    gains = [1.0] * len(HER2_LEVELS)
    real: dict = {}
    for it in range(rounds):
        module.dab_gain = list(gains)
        ratio: dict[int, list[float]] = {}
        for level, _, gen, truth in scored_outputs(module, ps, real):
            ratio.setdefault(level, []).append(truth / max(gen, 1e-4))
        gains = [float(np.clip(gains[k] * np.mean(ratio[k]), *bounds)) if k in ratio else gains[k]
                 for k in range(len(gains))]
        print(f"DAB calibration round {it + 1}: gains {[round(g, 3) for g in gains]}", file=sys.stderr)
    module.dab_gain = [round(g, 4) for g in gains]
    return module.dab_gain


def choose_sharpness(module, ps, candidates=SHARPNESS) -> tuple[float, list[dict]]:
    """Stage 4: the level-map sharpness (``cond_sharpness``) under which the rule-based score of
    the output is right on the most calibration pairs, ties broken by the smaller mean relative
    error of the membrane DAB per level. Returns (choice, one row per candidate)."""
    real: dict = {}
    rows = []
    for c in candidates:
        module.cond_sharpness = float(c)
        right, mem = 0, {}
        for level, her2, gen, truth in scored_outputs(module, ps, real):
            right += her2 == HER2_LEVELS[level]
            mem.setdefault(level, []).append((gen, truth))
        by_level = {HER2_LEVELS[k]: (float(np.mean([a for a, _ in v])), float(np.mean([b for _, b in v])))
                    for k, v in sorted(mem.items())}
        err = float(np.mean([abs(g - t) / max(t, 1e-9) for g, t in by_level.values()]))
        rows.append({"sharpness": float(c), "scored": int(right), "n": len(ps), "membrane_dab": by_level,
                     "mean_rel_error": err})
        print(f"sharpness {c:g}: scored right {right}/{len(ps)}, membrane DAB "
              + " / ".join(f"{g:.3f} ({t:.3f})" for g, t in by_level.values()), file=sys.stderr)
    best = max(rows, key=lambda row: (row["scored"], -row["mean_rel_error"]))
    module.cond_sharpness = best["sharpness"]
    return best["sharpness"], rows


def figures(m: dict) -> dict:
    """The figures of a held-out evaluation that the card compares with the previous model's."""
    return {k: m[k] for k in ("psnr", "ssim", "her2_scored_correct", "membrane_dab_by_level", "her2_accuracy")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "src" / "napari_bci" / "models" / "weights"),
                    help="where builtin.safetensors/json go")
    ap.add_argument("--card", default=str(ROOT / "docs" / "model_card.md"))
    ap.add_argument("--cache", default="/tmp/napari_bci_builtin_cache", help="synthetic data cache and run dir")
    ap.add_argument("--steps", type=int, default=None, help="override the step count (smoke runs)")
    ap.add_argument("--stop-at", type=int, default=None,
                    help="stop at this step (of the planned schedule) and ship that checkpoint")
    ap.add_argument("--fixture", default=str(FIXTURE), help="where the frozen test subset goes")
    ap.add_argument("--data-only", action="store_true", help="only render and cache the data")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the shipped run)")
    ap.add_argument("--calibrate", action="store_true",
                    help="stage 3, per-level DAB gains (tried, not shipped: see the model card)")
    ap.add_argument("--gains", default=None, metavar="JSON",
                    help="stage-3 DAB gains computed beforehand (skips the calibration)")
    ap.add_argument("--eval-cache", default=None, metavar="DIR",
                    help="cache the rendered held-out pairs here (default: render them fresh)")
    ap.add_argument("--previous", default=None, metavar="JSON",
                    help="the previous model's held-out figures, computed beforehand (figures)")
    ap.add_argument("--init", default=None,
                    help="stage-1 weights to fine-tune (skips stage 1; stage 2 of the built-in model "
                         "fine-tuned the first built-in weights, which stage 1 reproduces)")
    ap.add_argument("--init-stage3", default=None, metavar="W",
                    help="stage-2 weights to fine-tune in stage 3 (skips stages 1-2; the shipped run "
                         "fine-tuned the stage-2 built-in weights)")
    ap.add_argument("--stage3-weights", default=None, metavar="W",
                    help="trained stage-3 weights (skips stages 1-3; the shipped run took those of "
                         "commit 7e2d220, its JSON config beside them)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    t0 = time.time()
    train_pairs, val_pairs = pairs(TRAIN, cache), pairs(VAL, cache)
    print(f"data ready in {time.time() - t0:.0f} s", file=sys.stderr)
    if args.data_only:
        return 0
    data = {"source": "synthetic (napari_bci.samples.synthetic.make_pair, aligned by its registration truth)",
            "train_pairs": TRAIN["n"], "size": TRAIN["size"], "mpp": 0.5,
            "train_seeds": [TRAIN["seed"], TRAIN["seed"] + TRAIN["n"] - 1],
            "val_pairs": VAL["n"], "val_seeds": [VAL["seed"], VAL["seed"] + VAL["n"] - 1],
            "sample_generator": samples_commit()}
    data["stage1"] = {"train_pairs": STAGE1["n"], "train_seeds": [TRAIN["seed"], TRAIN["seed"] + STAGE1["n"] - 1],
                      **{k: v for k, v in STAGE1["hp"].items() if k != "arch"}}
    data["stage2"] = {k: v for k, v in HP.items() if k not in ("arch", "model_options")}
    init2 = args.init_stage3
    if args.stage3_weights:
        weights3 = Path(args.stage3_weights)
    elif init2 is None:
        init = args.init
        if init is None:
            s1 = cache / "stage1"
            T.train(train_pairs[: STAGE1["n"]], val_pairs, s1, name="builtin-stage1", device="cpu",
                    resume=(s1 / "checkpoint.json").is_file(), progress=True, **STAGE1["hp"])
            init = s1 / "model.safetensors"
        s2 = cache / "run"
        T.train(train_pairs, val_pairs, s2, name="builtin-stage2", device="cpu", data_info=data, init=init,
                resume=(s2 / "checkpoint.json").is_file(), progress=True, **HP)
        init2 = s2 / "model.safetensors"
    if not args.stage3_weights:
        weights3 = stage3(args, train_pairs, val_pairs, data, init2, cache)
    finish(args, weights3, train_pairs, cache)
    return 0


def stage3(args, train_pairs, val_pairs, data, init2, cache) -> Path:
    """Stage 3 (fine-tuning stage 2); returns the exported weights."""
    hp = dict(STAGE3)
    if args.steps:
        hp["steps"] = args.steps
        hp["epochs"] = min(hp["epochs"], args.steps)
    run = cache / ("run3" if not args.steps else f"run3_{args.steps}")
    rep = T.train(train_pairs, val_pairs, run, name="builtin", device="cpu", data_info=data, init=init2,
                  resume=(run / "checkpoint.json").is_file(), stop_at=args.stop_at, progress=True, **hp)
    if rep.get("stopped"):  # a run cut short on purpose (--stop-at): export the checkpoint as is
        import torch

        ck = json.loads((run / "checkpoint.json").read_text())
        cfg = dict(ck["config"])
        G = T.build_generator(cfg)
        G.load_state_dict(torch.load(run / "checkpoint.pt", weights_only=True)["G"])
        G.eval()
        last = ck["history"][-1] if ck["history"] else {}
        cfg["training"] = {"data": data, "steps": ck["step"], "planned_steps": ck["total_steps"],
                           "note": f"stopped at step {ck['step']} of {ck['total_steps']} (--stop-at); the "
                                   "learning rate followed the schedule of the full run",
                           "epochs": math.ceil(ck["step"] / math.ceil(hp["steps"] / hp["epochs"])),
                           "steps_per_epoch": math.ceil(hp["steps"] / hp["epochs"]), "batch": hp["batch"],
                           "crop": hp["crop"], "lr": hp["lr"],
                           "loss": {"pyramid_l1_weights": [25.0] * 4, "gan": hp["gan_weight"],
                                    "ssim": hp["ssim_weight"], "membrane_dab": hp["dab_weight"],
                                    "membrane_dab_options": hp["dab_options"], "focal": hp["focal_weight"]},
                           "teacher_forcing": hp["teacher_forcing"],
                           "seed": hp["seed"], "device": "cpu", "wall_s": ck.get("wall_s", 0.0),
                           "torch": torch.__version__}
        cfg["metrics"] = {k: last[k] for k in ("psnr", "ssim", "her2_accuracy", "n") if k in last}
        cfg["history"] = ck["history"]
        T.export_model(G, cfg, run / "model.safetensors")
    return run / "model.safetensors"


def finish(args, weights3: Path, train_pairs, cache) -> None:
    """Stage 4 (the level map's sharpness), the held-out evaluation, the export and the card."""
    from napari_bci.models.level_aware import load_weights

    gen = load_weights(weights3, device="cpu", name="builtin")
    gen.module.eval()
    heldout, subset = pairs(HELDOUT, args.eval_cache), pairs(TEST_SUBSET, None)
    gen.module.cond_sharpness = 1.0
    previous = (json.loads(Path(args.previous).read_text()) if args.previous and Path(args.previous).is_file()
                else r(figures(evaluate(gen, heldout, score=True)["model"])))
    sharp, tried = choose_sharpness(gen.module, pairs(CALIB, cache) + pairs(CALIB2, cache))
    gen.config["cond_sharpness"] = sharp
    if args.gains:  # computed beforehand by calibrate_dab on the same pairs
        gen.module.dab_gain = json.loads(Path(args.gains).read_text())
        gen.config["dab_gain"] = gen.module.dab_gain
    elif args.calibrate:
        gen.config["dab_gain"] = calibrate_dab(gen.module, pairs(CALIB, cache))
    save_fixture(subset, Path(args.fixture))
    cfg = dict(gen.config)
    held = evaluate(gen, heldout, score=True)
    sub = evaluate(gen, subset)
    n_params = sum(p.numel() for p in gen.module.parameters())
    cfg.update(
        name="builtin",
        description="HER2-level-aware generator trained on synthetic tissue (demonstration default, not clinical)",
        model_card={
            "heldout": r(held), "heldout_seeds": [HELDOUT["seed"], HELDOUT["seed"] + HELDOUT["n"] - 1],
            "heldout_size": HELDOUT["size"],
            "test_subset": r(sub), "test_subset_seeds": [TEST_SUBSET["seed"], TEST_SUBSET["seed"] + TEST_SUBSET["n"] - 1],
            "test_subset_size": TEST_SUBSET["size"], "test_subset_file": "tests/data/builtin_subset.npz",
            "sample_generator": samples_commit(),
            "parameters": n_params, "size_mb": round(weights3.stat().st_size / 2**20, 2),
            "tile_512_s": round(tile_time(gen), 3), "load_average": round(os.getloadavg()[0], 1),
            "tile_512_quiet_s": QUIET_TILE_S,
            "warning": "trained on synthetic tissue; a demonstration default, not a clinical model",
        },
    )
    cfg["model_card"]["previous"] = previous
    cfg["model_card"]["sharpness_tried"] = r(tried)
    cfg["domain"] = domain_record(train_pairs)
    cfg["metrics"] = {"psnr": cfg["model_card"]["heldout"]["model"]["psnr"],
                      "ssim": cfg["model_card"]["heldout"]["model"]["ssim"],
                      "her2_accuracy": cfg["model_card"]["heldout"]["model"]["her2_accuracy"],
                      "set": f"{HELDOUT['n']} held-out synthetic pairs at {HELDOUT['size']} px"}
    out = Path(args.out)
    if args.steps and out == ROOT / "src" / "napari_bci" / "models" / "weights":
        out = weights3.parent / "export"
    T.export_model(gen.module, cfg, out / "builtin.safetensors")
    card = Path(args.card) if not args.steps else out / "model_card.md"
    card.parent.mkdir(parents=True, exist_ok=True)
    card.write_text(model_card_md(cfg))
    print(json.dumps({"out": str(out), "metrics": cfg["metrics"],
                      "baseline": {k: held["baseline"][k] for k in ("psnr", "ssim")},
                      "dab_od_by_level": held["model"]["dab_od_by_level"],
                      "tile_512_s": cfg["model_card"]["tile_512_s"]}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
