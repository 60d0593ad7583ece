"""Training losses: PyramidPix2pix's multi-scale L1, the GAN loss, focal loss and SSIM loss.

All image tensors are ``(N, 3, H, W)`` in [-1, 1] (the pix2pix convention).

The pyramid L1 follows the BCI PyramidPix2pix code (DESIGN.md section 5): L1 at full scale,
then per octave four 3x3 Gaussian blurs (sigma 1, reflect border) and a 2x subsampling, with L1
at 1/2, 1/4 and 1/8 scale; each term weighted 25.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def gaussian_kernel1d(size: int = 3, sigma: float = 1.0) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, size: int = 3, sigma: float = 1.0) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding (kornia's ``gaussian_blur2d`` default)."""
    c = x.shape[1]
    k = gaussian_kernel1d(size, sigma).to(x.device, x.dtype)
    pad = size // 2
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, size).expand(c, 1, 1, size), groups=c)
    return F.conv2d(x, k.view(1, 1, size, 1).expand(c, 1, size, 1), groups=c)


def next_octave(x: torch.Tensor, blurs: int = 4) -> torch.Tensor:
    """One pyramid octave down: ``blurs`` 3x3 sigma-1 Gaussian blurs, then 2x subsampling."""
    for _ in range(blurs):
        x = gaussian_blur(x)
    return x[:, :, ::2, ::2]


class PyramidL1(nn.Module):
    """Sum over scales (full, 1/2, 1/4, 1/8) of ``weight * L1`` between blurred pyramids.

    ``forward`` returns ``(total, [per-scale unweighted L1])``.
    """

    def __init__(self, weights=(25.0, 25.0, 25.0, 25.0), blurs: int = 4):
        super().__init__()
        self.weights = tuple(float(w) for w in weights)
        self.blurs = blurs

    def forward(self, fake: torch.Tensor, real: torch.Tensor):
        terms = []
        total = fake.new_zeros(())
        for i, w in enumerate(self.weights):
            if i:
                if min(fake.shape[-2:]) < 4:
                    break
                fake, real = next_octave(fake, self.blurs), next_octave(real, self.blurs)
            l1 = F.l1_loss(fake, real)
            terms.append(l1)
            total = total + w * l1
        return total, terms


class GANLoss(nn.Module):
    """pix2pix GAN objective: ``"vanilla"`` (BCE with logits, pix2pix's default) or ``"lsgan"``."""

    def __init__(self, mode: str = "vanilla"):
        super().__init__()
        if mode not in ("vanilla", "lsgan"):
            raise ValueError(f"unknown GAN mode {mode!r}")
        self.mode = mode

    def forward(self, pred: torch.Tensor, target_is_real: bool) -> torch.Tensor:
        target = torch.ones_like(pred) if target_is_real else torch.zeros_like(pred)
        if self.mode == "lsgan":
            return F.mse_loss(pred.float(), target.float())
        return F.binary_cross_entropy_with_logits(pred.float(), target.float())


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               alpha: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-class focal loss (Lin et al. 2017): ``mean(-alpha_t (1 - p_t)^gamma log p_t)``.

    ``logits`` ``(N, C)``, ``target`` ``(N,)`` class indices; ``alpha`` optional ``(C,)`` weights.
    """
    logp = F.log_softmax(logits.float(), dim=1)
    logp_t = logp.gather(1, target.view(-1, 1)).squeeze(1)
    p_t = logp_t.exp()
    loss = -((1.0 - p_t) ** gamma) * logp_t
    if alpha is not None:
        loss = loss * alpha.to(loss.device)[target]
    return loss.mean()


def ssim(x: torch.Tensor, y: torch.Tensor, win: int = 7, data_range: float = 2.0) -> torch.Tensor:
    """Differentiable mean SSIM with a ``win`` x ``win`` uniform window, per channel, as
    skimage's ``structural_similarity`` computes it (sample covariance, valid region only,
    K1 0.01, K2 0.03); ``data_range`` 2 for [-1, 1] images. Returns a scalar."""
    x, y = x.float(), y.float()
    c = x.shape[1]
    k = torch.full((c, 1, win, win), 1.0 / win**2, device=x.device)
    npix = win * win
    cov_norm = npix / (npix - 1)
    ux, uy = F.conv2d(x, k, groups=c), F.conv2d(y, k, groups=c)
    uxx, uyy, uxy = F.conv2d(x * x, k, groups=c), F.conv2d(y * y, k, groups=c), F.conv2d(x * y, k, groups=c)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    # skimage crops (win - 1) // 2 at each border of the already-'valid'-sized map: here the
    # map is the valid convolution, which is the same region.
    return s.mean()


def ssim_loss(fake: torch.Tensor, real: torch.Tensor, win: int = 7) -> torch.Tensor:
    """``1 - SSIM`` (see :func:`ssim`)."""
    return 1.0 - ssim(fake, real, win=win)


def psnr_torch(fake: torch.Tensor, real: torch.Tensor) -> float:
    """PSNR in dB of [-1, 1] tensors on the 0..255 scale (for progress display only)."""
    mse = F.mse_loss((fake.float() + 1) * 127.5, (real.float() + 1) * 127.5).item()
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)
