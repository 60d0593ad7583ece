"""Benchmarks of the built-in model and the training losses (run: ``python benchmarks/bench_train.py``).

1. Built-in model: seconds per 512x512 tile through the generator interface (target < 1 s on
   this 2-core CPU), against PyramidPix2pix's ResNet-9 generator (ngf 64, BCI's release
   architecture) and the classical baseline on the same tile, measured in the same run.
2. Pyramid L1: the stride-2 composed-kernel octave against four successive blurs + subsampling
   (the reference formulation), forward + backward on a training batch; also checks equality.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def median_time(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def bench_tile(threads: int = 2) -> None:
    from napari_bci.models import architectures
    from napari_bci.models.base import TorchGenerator
    from napari_bci.models.baseline import BaselineGenerator
    from napari_bci.models.registry import load_generator
    from napari_bci.samples.synthetic import make_pair

    torch.set_num_threads(threads)
    tile = make_pair("2+", 512, seed=3).he[None]
    builtin = load_generator("builtin", device="cpu")
    r9 = TorchGenerator(architectures.build({"arch": "resnet_9blocks", "ngf": 64, "norm": "batch"}),
                        name="resnet_9blocks", device="cpu", predicts_her2=False)
    t_b = median_time(lambda: builtin(tile), 5)
    t_r = median_time(lambda: r9(tile), 2)
    t_c = median_time(lambda: BaselineGenerator()(tile), 5)
    n_b = sum(p.numel() for p in builtin.module.parameters())
    n_r = sum(p.numel() for p in r9.module.parameters())
    print(f"512x512 tile, {threads} threads:")
    print(f"  builtin         {t_b:7.3f} s  ({n_b / 1e6:.2f} M params)  target < 1 s: {'OK' if t_b < 1 else 'MISSED'}")
    print(f"  resnet_9blocks  {t_r:7.3f} s  ({n_r / 1e6:.2f} M params)  builtin is {t_r / t_b:.1f}x faster")
    print(f"  baseline        {t_c:7.3f} s  (classical, no weights)   builtin / baseline = {t_b / t_c:.1f}x")


def bench_pyramid() -> None:
    from napari_bci.train.losses import PyramidL1, gaussian_blur

    def reference(fake, real):  # four successive 3x3 blurs then [::2, ::2], per octave
        total = torch.nn.functional.l1_loss(fake, real) * 25
        for _ in range(3):
            for _ in range(4):
                fake, real = gaussian_blur(fake), gaussian_blur(real)
            fake, real = fake[:, :, ::2, ::2], real[:, :, ::2, ::2]
            total = total + 25 * torch.nn.functional.l1_loss(fake, real)
        return total

    torch.manual_seed(0)
    x = torch.rand(8, 3, 128, 128, requires_grad=True)
    y = torch.rand(8, 3, 128, 128)
    ours = PyramidL1()
    with torch.no_grad():
        a, b = float(ours(x, y)[0]), float(reference(x, y))
    t_ref = median_time(lambda: reference(x, y).backward(), 5)
    t_ours = median_time(lambda: ours(x, y)[0].backward(), 5)
    print(f"pyramid L1 (batch 8 x 128 px, fwd+bwd): reference {t_ref * 1e3:.1f} ms, ours {t_ours * 1e3:.1f} ms "
          f"-> {t_ref / t_ours:.1f}x faster; |difference| {abs(a - b):.2e}")


if __name__ == "__main__":
    bench_tile()
    bench_pyramid()
