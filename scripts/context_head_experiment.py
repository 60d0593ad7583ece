#!/usr/bin/env python
"""Does a wider-context level decision make the built-in model's virtual IHC score right? A measurement.

The built-in model's dense head decides the HER2 level from 80 px at a time. This script fits a
*context head* on the shipped network, frozen: a multinomial logistic regression (L2 ``--l2``,
L-BFGS) on statistics of the encoder over a sliding window of ``--window`` x ``--window`` head
cells (16 px each): the mean of every encoder stage, the SD of the three strided ones and the
dense head's mean logits (352 numbers, standardised), fitted on cells of the 256 training H&E
images. It stays convolutional (one decision per 1/16-resolution cell), so the tile engine could
run it with a halo of half the window.

It reports how often the image-mean level of each head is right, and then (``--score``) scores
the virtual IHC drawn with the context head's softmax (times ``--sharpness``) as the decoder's
condition, optionally after fine-tuning only the decoder for ``--finetune`` steps on the training
pairs (crops of 128 px, batch 8, always conditioned on the true level, the stage-3 loss, Adam 2e-4,
beta1 0.5, linear decay over the second half, seed 21) with a one-sided term on HER2 0 crops
(``--one-sided`` x 100 x the mean excess of the output's pooled DAB over the truth's beyond
0.01 OD) and (``--cell``) the scorer's per-cell reading of the output on the truth's tumour
cells (:class:`~napari_bci.train.losses.CellReadingLoss`, weights for intensity, completeness and
class shares; ``--strength`` replaces the membrane DAB loss's). The figures are in
docs/model_card.md. Nothing here changes the shipped model.

Run from the repository root, e.g. ``python scripts/context_head_experiment.py --score --finetune
600 --one-sided 0.5 --sets heldout,wide`` (about 15 min on 2 cores).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "scripts")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import train_builtin as B  # noqa: E402
from napari_bci.models.level_aware import load_builtin  # noqa: E402
from napari_bci.train import loop as T  # noqa: E402
from napari_bci.train.losses import CellReadingLoss  # noqa: E402

#: encoder stages whose window mean (all) and SD (the strided ones) the context head reads, with the
#: pooling that brings each to the head's 1/16 grid
STAGES = (("enc0", 16), ("enc1", 8), ("enc2", 4), ("enc3", 2))


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 127.5 - 1


def encode(m, x: torch.Tensor):
    """:meth:`~napari_bci.models.level_aware.LevelAwareGenerator.encode`'s ``(skips, dense)`` and
    the per-cell statistics ``(1, C, H/16, W/16)``: cell means of each stage, of the squares of
    the strided ones, and the dense logits."""
    skips, dense = m.encode(x)
    gh, gw = dense.shape[-2:]
    maps = dict(zip((name for name, _ in STAGES), skips))
    cells = [F.avg_pool2d(maps[n], k)[..., :gh, :gw] for n, k in STAGES]
    cells += [F.avg_pool2d(maps[n] ** 2, k)[..., :gh, :gw] for n, k in STAGES[1:]]
    return (skips, dense), torch.cat(cells + [dense.float()], 1)


def window_features(cells: torch.Tensor, m, window: int) -> torch.Tensor:
    """Mean of every stage, SD of the strided ones and the mean dense logits over each cell's window."""
    widths = [getattr(m, n)[0].out_channels for n, _ in STAGES]
    n_mean, n_sq = sum(widths), sum(widths[1:])
    a = F.avg_pool2d(cells, window, stride=1, padding=window // 2, count_include_pad=False)
    a = a[..., :cells.shape[-2], :cells.shape[-1]]
    mean, sq, logits = a[:, :n_mean], a[:, n_mean:n_mean + n_sq], a[:, n_mean + n_sq:]
    sd = (sq - mean[:, widths[0]:] ** 2).clamp(min=1e-8).sqrt()
    return torch.cat([mean, sd, logits], 1)


class ContextHead:
    """Standardisation + a linear map of :func:`window_features` to level logits per cell."""

    def __init__(self, m, window: int):
        self.m, self.window = m, window

    def fit(self, images, levels, l2: float) -> float:
        feats, ys = [], []
        for x, lv in zip(images, levels):
            f = window_features(encode(self.m, x)[1], self.m, self.window)[0][:, ::4, ::4]
            f = f.reshape(f.shape[0], -1).T
            feats.append(f)
            ys.append(torch.full((f.shape[0],), lv))
        X, y = torch.cat(feats), torch.cat(ys)
        self.mu, self.sd = X.mean(0), X.std(0) + 1e-6
        Xs = (X - self.mu) / self.sd
        self.lin = torch.nn.Linear(Xs.shape[1], 4)
        opt = torch.optim.LBFGS(self.lin.parameters(), max_iter=500, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(self.lin(Xs), y) + l2 * (self.lin.weight ** 2).sum() / 2
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return float((self.lin(Xs).argmax(1) == y).float().mean())

    def logits(self, cells: torch.Tensor) -> torch.Tensor:
        f = (window_features(cells, self.m, self.window) - self.mu.view(1, -1, 1, 1)) / self.sd.view(1, -1, 1, 1)
        return F.conv2d(f, self.lin.weight[:, :, None, None], self.lin.bias)


def finetune_decoder(m, images, targets, levels, steps: int, one_sided: float, rings=None,
                     cell_weights=(40.0, 4.0, 20.0), strength: float | None = None) -> None:
    """Only the decoder learns; the encoder and both heads stay as they are (eval mode throughout).
    ``rings`` (each target's :meth:`~napari_bci.train.losses.CellReadingLoss.rings`) adds the scorer's
    per-cell reading as a loss term with ``cell_weights`` (intensity, completeness, fractions);
    ``strength`` replaces the stage-3 membrane DAB loss's."""
    from napari_bci.train.losses import MembraneDabLoss, PyramidL1, dab_od, ssim_loss

    torch.manual_seed(21)
    rng = np.random.default_rng(21)
    decoder = ("blocks", "up2", "up1", "up0", "out")
    params = [p.requires_grad_(True) for n, p in m.named_parameters() if n.split(".")[0] in decoder]
    opt = torch.optim.Adam(params, lr=2e-4, betas=(0.5, 0.999))
    options = dict(B.STAGE3["dab_options"], **({} if strength is None else {"strength": strength}))
    pyramid, dab, cell = PyramidL1(), MembraneDabLoss(**options), CellReadingLoss(*cell_weights)
    crop, t0 = 128, time.time()
    with torch.enable_grad():
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = 2e-4 * min(1.0, 2 * (steps - step) / steps)
            xs, ys, lv, keys, crop_rings = [], [], [], [], []
            for i in rng.integers(0, len(images), 8):
                x, y = images[i], targets[i]
                a = int(rng.integers(0, (x.shape[-2] - crop) // 16 + 1)) * 16
                b = int(rng.integers(0, (x.shape[-1] - crop) // 16 + 1)) * 16
                k = int(rng.integers(0, 4))
                xc, yc = (torch.rot90(t[..., a:a + crop, b:b + crop], k, (2, 3)) for t in (x, y))
                flip = rng.random() < 0.5
                if flip:
                    xc, yc = xc.flip(3), yc.flip(3)
                if rings is not None:
                    kc = torch.rot90(rings[i]["key"][a:a + crop, b:b + crop], k, (0, 1))
                    keys.append(kc.flip(1) if flip else kc)
                    crop_rings.append(rings[i])
                xs.append(xc)
                ys.append(yc)
                lv.append(levels[i])
            x, y, lv = torch.cat(xs), torch.cat(ys), torch.tensor(lv)
            with torch.no_grad():
                skips, _ = m.encode(x)
            cond = F.one_hot(lv, 4).float()[:, :, None, None].expand(-1, -1, crop // 16, crop // 16)
            fake = m.decode(skips, cond)
            loss = pyramid(fake, y)[0] + B.HP["ssim_weight"] * ssim_loss(fake, y) + B.STAGE3["dab_weight"] * dab(fake, y)
            if rings is not None:
                loss = loss + cell(fake, y, keys, crop_rings)
            zero = lv == 0
            if one_sided and bool(zero.any()):
                pf, pr = (F.max_pool2d(dab_od(t[zero]), 5, 1, 2) for t in (fake, y))
                loss = loss + one_sided * 100 * F.relu(pf - pr - 0.01).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 100 == 0:
                print(f"  fine-tune step {step}/{steps}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)


def evaluation_sets(names, cache: Path) -> dict:
    sets = {}
    for name in names:
        if name == "calibration":
            sets[name] = B.pairs(B.CALIB, cache, progress=False) + B.pairs(B.CALIB2, cache, progress=False)
        elif name == "heldout":
            sets[name] = B.pairs(B.HELDOUT, cache, progress=False)
        elif name == "wide":
            sets[name] = sum((B.wide_pairs(16, i, cache) for i in range(len(B.HER2_LEVELS))), [])
        else:
            raise SystemExit(f"unknown set {name!r} (calibration, heldout, wide)")
    return sets


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--window", type=int, default=16, help="context window in head cells of 16 px")
    ap.add_argument("--l2", type=float, default=0.01)
    ap.add_argument("--sets", default="calibration,heldout,wide")
    ap.add_argument("--score", action="store_true", help="also score the virtual IHC (rule-based scorer)")
    ap.add_argument("--sharpness", type=float, default=3.0)
    ap.add_argument("--map", choices=("context", "dense"), default="context",
                    help="the level map the virtual IHC is drawn under (dense: the model's own)")
    ap.add_argument("--finetune", type=int, default=0, metavar="STEPS")
    ap.add_argument("--one-sided", type=float, default=0.0)
    ap.add_argument("--cell", default="", metavar="WI,WC,WF",
                    help="add the scorer's per-cell reading to the fine-tune (CellReadingLoss weights)")
    ap.add_argument("--strength", type=float, default=None, help="the fine-tune's membrane DAB strength")
    ap.add_argument("--cache", default="/tmp/napari_bci_builtin_cache")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    cache = Path(args.cache)
    m = load_builtin(device="cpu").module.eval()
    images, targets, levels, rings = [], [], [], []
    for p in B.pairs(B.TRAIN, cache, progress=False):
        he, ihc, valid = p.load()
        y0, y1, x0, x1 = T.valid_box(valid, ihc.shape[:2], m.multiple)
        images.append(to_tensor(he[y0:y1, x0:x1]))
        targets.append(to_tensor(ihc[y0:y1, x0:x1]))
        levels.append(p.level)
        if args.cell:
            rings.append(CellReadingLoss.rings(ihc[y0:y1, x0:x1]))
    torch.manual_seed(0)
    head = ContextHead(m, args.window)
    with torch.no_grad():
        acc = head.fit(images, levels, args.l2)
    print(f"context head, {args.window} x {args.window} cells: {acc:.1%} of the training cells right")
    if args.finetune:
        weights = tuple(float(w) for w in args.cell.split(",")) if args.cell else (0.0, 0.0, 0.0)
        finetune_decoder(m, images, targets, levels, args.finetune, args.one_sided,
                         rings if args.cell else None, weights, args.strength)
    for name, ps in evaluation_sets(args.sets.split(","), cache).items():
        readings = []  # (dense head's level, context head's level) per pair, in order

        def draw(he: np.ndarray) -> np.ndarray:
            (skips, dense), cells = encode(m, to_tensor(he[0]))
            logits = head.logits(cells)
            readings.append((int(dense.mean((2, 3)).argmax()), int(logits.mean((2, 3)).argmax())))
            cond = m.condition(dense) if args.map == "dense" else torch.softmax(logits * args.sharpness, 1)
            img = m.decode(skips, cond)[..., :he.shape[1], :he.shape[2]]
            return ((img[0].permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)[None]

        with torch.no_grad():
            res = T.evaluate_pairs(None, ps, multiple=m.multiple, generator=draw, score=args.score)
        dense_conf, ctx_conf = np.zeros((4, 4), int), np.zeros((4, 4), int)
        for p, (d, c) in zip(ps, readings):
            dense_conf[p.level, d] += 1
            ctx_conf[p.level, c] += 1
        print(f"{name} ({len(ps)} pairs): image-mean level right, dense head {np.trace(dense_conf)}, "
              f"context head {np.trace(ctx_conf)}; context head confusion (rows truth 0..3+):\n{ctx_conf}")
        if args.score:
            dab = res["membrane_dab_by_level"]
            print(f"  virtual IHC scored right {res['her2_scored_correct']}/{len(ps)}, PSNR {res['psnr']:.2f} dB, "
                  f"SSIM {res['ssim']:.3f}; membrane DAB OD generated / real: "
                  + ", ".join(f"{lv} {d['generated']:.3f} / {d['real']:.3f}" for lv, d in dab.items()))
            print("  misread: " + (", ".join(f"{r['name']} as {r['generated']}" for r in res["scored"]
                                             if r["generated"] != r["true"]) or "none"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
