"""Metrics speed: torch local SSIM vs scikit-image, BCI metrics and tolerant metrics per pair.

Run: ``python benchmarks/bench_metrics.py [--threads N] [--repeat R]``. Prints times (best of R,
wall and process CPU) and ratios against scikit-image measured in the same run, on a real
1024x1024 RGB pair (CMU-1-Small-Region H&E vs a perturbed, 3 px shifted copy).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def best(fn, repeat: int) -> tuple[float, float]:
    fn()  # warm-up (imports, allocator)
    wall, cpu = [], []
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return min(wall), min(cpu)


def pair_1024() -> tuple[np.ndarray, np.ndarray]:
    import tifffile

    src = ROOT / "tests" / "data" / "CMU-1-Small-Region.svs"
    img = tifffile.imread(src)[..., :3] if src.exists() else None
    if img is None or min(img.shape[:2]) < 1024:
        from skimage import data

        img = np.tile(data.immunohistochemistry(), (2, 2, 1))
    a = np.ascontiguousarray(img[:1024, :1024])
    rng = np.random.default_rng(0)
    b = np.clip(a.astype(np.int16) + rng.normal(0, 12, a.shape), 0, 255).astype(np.uint8)
    return a, np.roll(b, 3, axis=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                    help="torch thread counts to time the SSIM map with (default: 1 2)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    import torch
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    sys.path.insert(0, str(ROOT / "src"))
    from napari_bci.metrics import compare_pair, psnr, ssim, ssim_map, tolerant_metrics

    a, b = pair_1024()
    print(f"pair {a.shape} uint8, torch {torch.__version__}, "
          f"cpus={os.cpu_count()}, load={os.getloadavg()[0]:.1f}")
    print(f"{'':34s}{'wall s':>9s}{'cpu s':>9s}{'ratio(wall)':>13s}{'ratio(cpu)':>12s}")

    def row(name, t, base=None):
        r = "" if base is None else f"{base[0] / t[0]:13.2f}{base[1] / t[1]:12.2f}"
        print(f"{name:34s}{t[0]:9.3f}{t[1]:9.3f}{r}")

    for kind, kw in (("uniform", {}),
                     ("gaussian", dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False))):
        sk = best(lambda: structural_similarity(a, b, channel_axis=-1, data_range=255, full=True, **kw), args.repeat)
        ref = structural_similarity(a, b, channel_axis=-1, data_range=255, full=True, **kw)[1]
        err = np.abs(ssim_map(a, b, kind=kind, reduce_channels=False) - ref).max()
        row(f"skimage SSIM map ({kind})", sk)
        print(f"  torch max |difference| to skimage: {err:.1e}")
        for n in args.threads:
            torch.set_num_threads(n)
            th = best(lambda: ssim_map(a, b, kind=kind, reduce_channels=False), args.repeat)
            row(f"torch SSIM map ({kind}), {n} thread(s)", th, sk)
    torch.set_num_threads(min(args.threads))

    sk = best(lambda: structural_similarity(a, b, channel_axis=-1, data_range=255), args.repeat)
    row("BCI SSIM, skimage", sk)
    row("BCI SSIM, napari_bci (torch)", best(lambda: ssim(a, b), args.repeat), sk)
    pk = best(lambda: peak_signal_noise_ratio(b, a, data_range=255), args.repeat)
    row("BCI PSNR, skimage", pk)
    row("BCI PSNR, napari_bci", best(lambda: psnr(a, b), args.repeat), pk)
    row("tolerant metrics (DAB + CIEDE2000)", best(lambda: tolerant_metrics(a, b, mpp=0.5), args.repeat))
    row("compare_pair (all metrics)", best(lambda: compare_pair(a, b, mpp=0.5), args.repeat))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        ref = structural_similarity(a, b, channel_axis=-1, data_range=255, full=True)[1]
        cu = best(lambda: ssim_map(a, b, device="cuda"), args.repeat)
        err = np.abs(ssim_map(a, b, device="cuda", reduce_channels=False) - ref).max()
        row(f"torch SSIM map (uniform, cuda) [max|d|={err:.1e}]", cu, sk)
    return 0


if __name__ == "__main__":
    sys.exit(main())
