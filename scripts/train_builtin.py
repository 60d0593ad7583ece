#!/usr/bin/env python
"""Train the built-in model shipped in the package (``napari-bci generate --model builtin``).

Reproducible: fixed seeds for the data (synthetic pairs from ``napari_bci.samples.synthetic``,
aligned with their registration truth), the initialisation and every training crop. Steps:

1. training set: 128 pairs of 512x512 px at 0.5 um/px (20x), the four HER2 levels cycled,
   seeds 1000-1127; per-epoch validation: 8 pairs of 512 px, seeds 500000-500007;
2. training (``napari_bci.train.loop.train``) of the ``level_aware`` architecture;
3. model card: metrics on a held-out set of 16 pairs of 1024x1024 px (4 per level, seeds
   900000-900015) for the model and for the classical ``baseline`` generator, the mean DAB OD of
   the output per level, the HER2 accuracy of the level head, and the figures of the small
   test subset (4 pairs of 384 px, seeds 910000-910003, frozen in tests/data/builtin_subset.npz)
   that ``tests/test_builtin.py`` checks;
4. writes ``src/napari_bci/models/weights/builtin.{safetensors,json}`` and
   ``docs/model_card.md``.

Run from the repository root: ``python scripts/train_builtin.py`` (15-45 min on 2 shared CPU cores, one thread;
``--steps 20`` for a smoke run into ``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from napari_bci.train import loop as T  # noqa: E402

TRAIN = {"n": 128, "size": 512, "seed": 1000}
VAL = {"n": 8, "size": 512, "seed": 500_000}
HELDOUT = {"n": 16, "size": 1024, "seed": 900_000}
TEST_SUBSET = {"n": 4, "size": 384, "seed": 910_000}
FIXTURE = ROOT / "tests" / "data" / "builtin_subset.npz"
HP = {"arch": "level_aware", "steps": 800, "epochs": 8, "batch": 8, "crop": 128, "lr": 1e-3,
      "ssim_weight": 10.0, "gan_weight": 0.0, "focal_weight": 2.0, "seed": 0,
      "model_options": {"channels": [12, 24, 48, 96], "n_blocks": 3, "head_channels": 48}}


def pairs(spec: dict, cache: Path | None, progress: bool = True):
    return T.synthetic_pairs(spec["n"], spec["size"], seed=spec["seed"], cache_dir=cache, progress=progress)


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


def evaluate(gen, ps) -> dict:
    from napari_bci.models.baseline import BaselineGenerator

    model = T.evaluate_pairs(gen.module, ps, multiple=16, device=gen.device)
    base = T.evaluate_pairs(None, ps, multiple=16, generator=BaselineGenerator())
    return {"model": model, "baseline": {k: base[k] for k in ("n", "psnr", "ssim", "per_level", "dab_od_by_level")}}


def r(x, n=4):
    if isinstance(x, dict):
        return {k: r(v, n) for k, v in x.items()}
    if isinstance(x, float):
        return round(x, n)
    return x


def model_card_md(cfg: dict) -> str:
    tr, mc = cfg["training"], cfg["model_card"]
    h, b = mc["heldout"]["model"], mc["heldout"]["baseline"]
    rows = "\n".join(
        f"| {lv} | {h['per_level'][lv]['psnr']:.2f} | {h['per_level'][lv]['ssim']:.3f} | "
        f"{b['per_level'][lv]['psnr']:.2f} | {b['per_level'][lv]['ssim']:.3f} | {h['dab_od_by_level'][lv]:.4f} |"
        for lv in h["per_level"]
    )
    return f"""# Model card: `builtin` (HER2-level-aware virtual IHC generator)

> **Trained on synthetic tissue. A demonstration default, not a clinical model.** It has never
> seen a real slide; it shows what the pipeline does and gives the viewer something sensible to
> run offline. For real H&E, train on the BCI dataset (see [training.md](training.md)) and load
> your checkpoint with `--model PATH`.

## What it is
- Architecture `level_aware` (`napari_bci.models.level_aware`): a compact U-Net-style
  encoder-decoder (stride-2 encoder {'/'.join(str(c) for c in cfg['channels'])} channels, {cfg['n_blocks']} residual blocks at 1/8
  resolution, bilinear decoder with skips, BatchNorm) whose encoder feeds a HER2-level head;
  the head's level probabilities modulate the decoder (FiLM), in the spirit of BCIStainer. The
  head is dense (1/16 resolution), so tiles of one slide agree and tiling stays seam-free;
  the tile's level is the mean of its logits (`predict_her2`).
- {mc['parameters']:,} parameters, {mc['size_mb']:.1f} MB (float32 safetensors). A 512x512 tile takes
  {mc['tile_512_s']:.2f} s on this 2-core CPU (median of 5 runs, 2 threads, on a machine
  shared with other jobs).
- Input: H&E RGB at 20x (0.5 um/px); output: HER2 IHC RGB of the same size; tile {cfg['tile']},
  halo {cfg['halo']} px.

## Training data and procedure
- {tr['data']['train_pairs']} synthetic pairs of {tr['data']['size']}x{tr['data']['size']} px from
  `napari_bci.samples.synthetic.make_pair` as of commit {tr['data'].get('sample_generator', '?')} (seeds {tr['data']['train_seeds'][0]}-{tr['data']['train_seeds'][1]},
  HER2 0, 1+, 2+, 3+ cycled), the H&E warped onto the IHC frame with the known registration
  truth (as BCI aligned its pairs); only fully valid crops are used.
- {tr['steps']} steps ({tr['epochs']} epochs of {tr['steps_per_epoch']}), batch {tr['batch']},
  {tr['crop']}x{tr['crop']} crops with flips/rotations, Adam lr {tr['lr']} (beta1 0.5), constant then
  linearly decayed over the second half.
- Loss: PyramidPix2pix L1 at full, 1/2, 1/4, 1/8 scale (each weight
  {tr['loss']['pyramid_l1_weights'][0]:g}) + {tr['loss']['ssim']:g} x (1 - SSIM) + {tr['loss']['focal']:g} x focal loss
  of the HER2 head on the slide label; no adversarial loss (GAN weight {tr['loss']['gan']:g}: it costs
  PSNR/SSIM and CPU time).
- Seed {tr['seed']}, device {tr['device']}, {tr['wall_s'] / 60:.1f} min wall time, torch {tr['torch']}.
  Reproduce with `python scripts/train_builtin.py`.

## Evaluation (held-out synthetic pairs, different seeds)
{h['n']} pairs of 1024x1024 px (seeds {mc['heldout_seeds'][0]}-{mc['heldout_seeds'][1]}, 4 per level; sample generator
as of commit {mc['sample_generator']}),
the aligned H&E in, compared with the real synthetic IHC on the valid region; BCI-exact PSNR
(data range 255) and SSIM (7x7 uniform window on colour uint8, mean over channels).

| | PSNR (dB) | SSIM | HER2 accuracy (head) |
|---|---|---|---|
| `builtin` | **{h['psnr']:.2f}** | **{h['ssim']:.3f}** | {h['her2_accuracy']:.2f} |
| `baseline` (classical stain mapping) | {b['psnr']:.2f} | {b['ssim']:.3f} | - |

Per level (mean DAB optical density of the generated IHC rises with the level: no mode collapse):

| HER2 | PSNR | SSIM | baseline PSNR | baseline SSIM | DAB OD of output |
|---|---|---|---|---|---|
{rows}

Test subset ({mc['test_subset']['model']['n']} pairs of {mc['test_subset_size']} px, seeds {mc['test_subset_seeds'][0]}-{mc['test_subset_seeds'][1]},
frozen in `{mc['test_subset_file']}` and checked by `tests/test_builtin.py`): PSNR {mc['test_subset']['model']['psnr']:.2f} dB, SSIM
{mc['test_subset']['model']['ssim']:.3f} (baseline {mc['test_subset']['baseline']['psnr']:.2f} / {mc['test_subset']['baseline']['ssim']:.3f}).

## Limits
- Synthetic tissue only: real H&E differs in texture, colour, artefacts and in how (weakly) it
  encodes HER2 status. Expect poor results on real slides; the numbers above say nothing about
  them (the BCI challenge's best real-data figures are about 22.9 dB / 0.57).
- The level head sees one tile at a time (context about 1/4 mm); its accuracy is per tile.
- Not for diagnosis.
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "src" / "napari_bci" / "generate" / "weights"),
                    help="where builtin.safetensors/json go")
    ap.add_argument("--card", default=str(ROOT / "docs" / "model_card.md"))
    ap.add_argument("--cache", default="/tmp/napari_bci_builtin_cache", help="synthetic data cache and run dir")
    ap.add_argument("--steps", type=int, default=None, help="override the step count (smoke runs)")
    ap.add_argument("--stop-at", type=int, default=None,
                    help="stop at this step (of the planned schedule) and ship that checkpoint")
    ap.add_argument("--fixture", default=str(FIXTURE), help="where the frozen test subset goes")
    ap.add_argument("--data-only", action="store_true", help="only render and cache the data")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the shipped run)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    t0 = time.time()
    train_pairs, val_pairs = pairs(TRAIN, cache), pairs(VAL, cache)
    print(f"data ready in {time.time() - t0:.0f} s", file=sys.stderr)
    if args.data_only:
        return 0
    hp = dict(HP)
    if args.steps:
        hp["steps"] = args.steps
        hp["epochs"] = min(hp["epochs"], args.steps)
    run = cache / ("run" if not args.steps else f"run_{args.steps}")
    data = {"source": "synthetic (napari_bci.samples.synthetic.make_pair, aligned by its registration truth)",
            "train_pairs": TRAIN["n"], "size": TRAIN["size"], "mpp": 0.5,
            "train_seeds": [TRAIN["seed"], TRAIN["seed"] + TRAIN["n"] - 1],
            "val_pairs": VAL["n"], "val_seeds": [VAL["seed"], VAL["seed"] + VAL["n"] - 1],
            "sample_generator": samples_commit()}
    rep = T.train(train_pairs, val_pairs, run, name="builtin", device="cpu", data_info=data,
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
                                    "ssim": hp["ssim_weight"], "focal": hp["focal_weight"]},
                           "seed": hp["seed"], "device": "cpu", "wall_s": ck.get("wall_s", 0.0),
                           "torch": torch.__version__}
        cfg["metrics"] = {k: last[k] for k in ("psnr", "ssim", "her2_accuracy", "n") if k in last}
        cfg["history"] = ck["history"]
        T.export_model(G, cfg, run / "model.safetensors")

    from napari_bci.models.level_aware import load_weights

    gen = load_weights(run / "model.safetensors", device="cpu", name="builtin")
    heldout, subset = pairs(HELDOUT, None), pairs(TEST_SUBSET, None)  # fresh: never a stale cache
    save_fixture(subset, Path(args.fixture))
    cfg = dict(gen.config)
    held = evaluate(gen, heldout)
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
            "parameters": n_params, "size_mb": round((run / "model.safetensors").stat().st_size / 2**20, 2),
            "tile_512_s": round(tile_time(gen), 3),
            "warning": "trained on synthetic tissue; a demonstration default, not a clinical model",
        },
    )
    cfg["metrics"] = {"psnr": cfg["model_card"]["heldout"]["model"]["psnr"],
                      "ssim": cfg["model_card"]["heldout"]["model"]["ssim"],
                      "her2_accuracy": cfg["model_card"]["heldout"]["model"]["her2_accuracy"],
                      "set": f"{HELDOUT['n']} held-out synthetic pairs at {HELDOUT['size']} px"}
    out = Path(args.out)
    if args.steps and out == ROOT / "src" / "napari_bci" / "generate" / "weights":
        out = run / "export"
    T.export_model(gen.module, cfg, out / "builtin.safetensors")
    card = Path(args.card) if not args.steps else out / "model_card.md"
    card.parent.mkdir(parents=True, exist_ok=True)
    card.write_text(model_card_md(cfg))
    print(json.dumps({"out": str(out), "metrics": cfg["metrics"],
                      "baseline": {k: held["baseline"][k] for k in ("psnr", "ssim")},
                      "dab_od_by_level": held["model"]["dab_od_by_level"],
                      "tile_512_s": cfg["model_card"]["tile_512_s"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
