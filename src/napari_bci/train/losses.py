"""Training losses: PyramidPix2pix's multi-scale L1, the GAN loss, focal loss, SSIM loss and the
membrane DAB loss.

All image tensors are ``(N, 3, H, W)`` in [-1, 1] (the pix2pix convention).

The pyramid L1 follows the BCI PyramidPix2pix code: L1 at full scale, then per octave four 3x3
Gaussian blurs (sigma 1, reflect border) and a 2x subsampling, with L1 at 1/2, 1/4 and 1/8 scale;
each term weighted 25.
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
    return _sep_conv(x, gaussian_kernel1d(size, sigma), stride=1)


def _sep_conv(x: torch.Tensor, k: torch.Tensor, stride: int = 1) -> torch.Tensor:
    n, c, h, w = x.shape
    k = k.to(x.device, x.dtype)
    t = k.numel()
    pad = t // 2
    y = F.pad(x.reshape(n * c, 1, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, t), stride=(1, stride))
    y = F.conv2d(y, k.view(1, 1, t, 1), stride=(stride, 1))
    return y.reshape(n, c, y.shape[-2], y.shape[-1])


def _octave_kernel(blurs: int) -> torch.Tensor:
    """The 3-tap sigma-1 Gaussian convolved with itself ``blurs`` times."""
    k = torch.ones(1, 1, 1)
    g = gaussian_kernel1d(3, 1.0).view(1, 1, 3)
    for _ in range(blurs):
        k = F.conv1d(F.pad(k, (2, 2)), g)
    return k.flatten()


def next_octave(x: torch.Tensor, blurs: int = 4) -> torch.Tensor:
    """One pyramid octave down: ``blurs`` 3x3 sigma-1 Gaussian blurs, then 2x subsampling.

    Computed as one blur with the composed (``2 * blurs + 1``)-tap kernel, evaluated only at the
    kept pixels (a stride-2 convolution): identical to the successive reflect-padded blurs
    (reflection commutes with a symmetric kernel), and several times cheaper."""
    if min(x.shape[-2:]) <= 2 * blurs:
        for _ in range(blurs):
            x = gaussian_blur(x)
        return x[:, :, ::2, ::2]
    return _sep_conv(x, _octave_kernel(blurs), stride=2)


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
                fake = next_octave(fake, self.blurs)
                with torch.no_grad():
                    real = next_octave(real, self.blurs)
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


def ssim(x: torch.Tensor, y: torch.Tensor, win: int = 7) -> torch.Tensor:
    """Differentiable mean SSIM of [-1, 1] images with a ``win`` x ``win`` uniform window, per
    channel, as skimage's ``structural_similarity`` computes it on the uint8 images (sample
    covariance, valid region only, K1 0.01, K2 0.03). SSIM is not shift-invariant, so the
    images are first mapped to [0, 1] (the 0..255 scale, divided by 255). Returns a scalar."""
    x, y = (x.float() + 1) / 2, (y.float() + 1) / 2
    data_range = 1.0
    def box(t):  # the 7x7 uniform filter, 'valid' region only (what skimage averages)
        return F.avg_pool2d(t, win, stride=1)

    npix = win * win
    cov_norm = npix / (npix - 1)
    ux, uy = box(x), box(y)
    uxx, uyy, uxy = box(x * x), box(y * y), box(x * y)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean()


def ssim_loss(fake: torch.Tensor, real: torch.Tensor, win: int = 7) -> torch.Tensor:
    """``1 - SSIM`` (see :func:`ssim`)."""
    return 1.0 - ssim(fake, real, win=win)


def psnr_torch(fake: torch.Tensor, real: torch.Tensor) -> float:
    """PSNR in dB of [-1, 1] tensors on the 0..255 scale (for progress display only)."""
    mse = F.mse_loss((fake.float() + 1) * 127.5, (real.float() + 1) * 127.5).item()
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def dab_od(x: torch.Tensor) -> torch.Tensor:
    """Differentiable DAB concentration ``(N, 1, H, W)`` (base-10 OD units, >= 0) of [-1, 1] RGB
    images: Beer-Lambert OD then Ruifrok-Johnston deconvolution with :data:`napari_bci.stain.HED_MATRIX`,
    as :func:`napari_bci.stain.dab` computes it on uint8 images."""
    from .. import stain

    inv = torch.linalg.inv(torch.as_tensor(stain.HED_MATRIX, dtype=torch.float64))[:, -1].to(torch.float32)
    i = ((x.float() + 1) * 127.5).clamp(min=1.0)
    od = -torch.log10(i / 255.0)
    return torch.einsum("nchw,c->nhw", od, inv.to(x.device)).clamp(min=0.0)[:, None]


class MembraneDabLoss(nn.Module):
    """L1 between the DAB OD maps of the output and the target, max-pooled over ``pool`` x ``pool``
    px and weighted ``membrane`` x more where the target has membrane DAB (pooled OD above
    ``faint``) and ``strength`` x more per unit of the target's pooled DAB OD (so intense 3+
    membranes weigh most), plus ``pixel`` x the plain pixel L1 of the DAB maps on those
    membranes, plus ``match`` x the per-sample difference of the mean pooled DAB over the
    target's membranes (the intensity the HER2 scorer averages), plus ``balance`` x the
    per-sample difference of the mean pooled DAB over the whole crop (so DAB drawn where the
    target has none, e.g. on a HER2 0 case, costs as much as DAB missing on a 3+ one).

    The max pooling is what the HER2 scorer reads (the maximum DAB of a ring sector): a thin
    membrane drawn a pixel off still counts, so the loss does not push uncertain thin membranes
    toward the pale mean, as pixel L1 does. ``strength=0, pixel=1, match=0, balance=0`` (the defaults) are
    the stage-2 loss of the built-in model."""

    def __init__(self, pool: int = 5, faint: float = 0.04, membrane: float = 4.0, strength: float = 0.0,
                 pixel: float = 1.0, match: float = 0.0, balance: float = 0.0):
        super().__init__()
        self.pool, self.faint, self.membrane = int(pool), float(faint), float(membrane)
        self.strength, self.pixel, self.match = float(strength), float(pixel), float(match)
        self.balance = float(balance)

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        df = dab_od(fake)
        with torch.no_grad():
            dr = dab_od(real)
        k = self.pool
        pf = F.max_pool2d(df, k, stride=1, padding=k // 2)
        pr = F.max_pool2d(dr, k, stride=1, padding=k // 2)
        mem = (pr > self.faint).float()
        w = 1.0 + self.membrane * mem + self.strength * pr
        loss = (w * (pf - pr).abs()).sum() / w.sum()
        if self.pixel:
            loss = loss + self.pixel * (mem * (df - dr).abs()).sum() / mem.sum().clamp(min=1.0)
        if self.match:
            n = mem.sum(dim=(1, 2, 3))
            has = n > 0
            if bool(has.any()):
                mf = (mem * pf).sum(dim=(1, 2, 3)) / n.clamp(min=1.0)
                mr = (mem * pr).sum(dim=(1, 2, 3)) / n.clamp(min=1.0)
                loss = loss + self.match * (mf - mr)[has].abs().mean()
        if self.balance:
            loss = loss + self.balance * (pf.mean(dim=(1, 2, 3)) - pr.mean(dim=(1, 2, 3))).abs().mean()
        return loss


class CellReadingLoss(nn.Module):
    """The HER2 scorer's per-cell membrane reading of the output, on the truth's tumour cells.

    :meth:`rings` runs the scorer (:func:`napari_bci.her2.scoring.analyse`) on a target IHC once
    and keeps each ring pixel's sector key, its tumour cells and its stain model. ``forward``
    then reads the output and the target as the scorer does (stain separation under that model,
    background-corrected DAB, the same smoothing and maximum filter, each ring sector's maximum)
    with the faint threshold softened by ``tau`` OD, and compares, per crop, over the tumour cells
    wholly inside it: the sorted per-cell intensities (``intensity`` x L1, the quantity whose
    tumour-cell mean is the membrane DAB of :func:`napari_bci.train.loop.membrane_dab`), the sorted
    completeness (``completeness`` x L1) and the soft shares of cells the scorer counts as stained,
    weak-moderate, intense-complete and weak-complete (``fractions`` x L1): which cells does not
    matter, only how many and how strongly. With ``tau`` -> 0 the intensities equal the scorer's."""

    def __init__(self, intensity: float = 40.0, completeness: float = 4.0, fractions: float = 20.0,
                 tau: float = 0.005):
        from ..her2.scoring import ScoreParams

        super().__init__()
        self.wi, self.wc, self.wf, self.tau = float(intensity), float(completeness), float(fractions), float(tau)
        self.params = ScoreParams()

    @staticmethod
    def rings(ihc, mpp: float = 0.5) -> dict:
        """The target's cells for :meth:`forward`: ``key`` (H, W) int64 sector key of each ring pixel
        (-1 elsewhere), ``counts`` ring pixels per cell, ``tumour`` per cell and the stain model."""
        import numpy as np

        from ..her2.cells import CellParams, cell_rings, ring_sectors
        from ..her2.scoring import analyse
        from ..her2.stains import stain_matrix

        cp = CellParams()
        cells, _, _, _, tumour, model = analyse(ihc, mpp, cell_params=cp)
        lab, inner = cell_rings(cells.nuclei, mpp, cp)
        yy, xx, key = ring_sectors(lab, inner, cells.centroid, cp.sectors)
        k = np.full(ihc.shape[:2], -1, np.int64)
        k[yy, xx] = key
        inv = np.linalg.inv(stain_matrix(*model.vectors)).astype(np.float32)[:, :2]
        return {"key": torch.from_numpy(k), "tumour": torch.from_numpy(np.asarray(tumour, bool)),
                "counts": torch.bincount(torch.from_numpy(key // cp.sectors), minlength=len(cells)),
                "white": torch.tensor(model.white, dtype=torch.float32), "inv": torch.from_numpy(inv.copy()),
                "crosstalk": float(model.crosstalk), "background": float(model.dab_background),
                "sectors": cp.sectors, "smooth_px": cp.dab_smooth_um / mpp,
                "reach_px": 2 * int(round(cp.membrane_reach_um / mpp)) + 1}

    @staticmethod
    def dab_map(x: torch.Tensor, r: dict) -> torch.Tensor:
        """``(H, W)`` DAB OD of one ``(1, 3, H, W)`` image as the scorer samples its rings."""
        i = ((x[0].float() + 1) * 127.5).clamp(min=1.0)
        od = (-torch.log10(i / r["white"].to(x.device).view(3, 1, 1))).clamp(min=0.0)
        hd = torch.einsum("chw,ck->khw", od, r["inv"].to(x.device))
        d = F.relu(F.relu(hd[1] - r["crosstalk"] * hd[0].clamp(min=0.0)) - r["background"])[None, None]
        s = r["smooth_px"]
        if s:
            d = gaussian_blur(d, 2 * int(3 * s + 0.5) + 1, s)
        k = r["reach_px"]
        return F.max_pool2d(d, k, 1, k // 2)[0, 0]

    def read(self, d: torch.Tensor, key: torch.Tensor, r: dict):
        """(intensity, completeness) per tumour cell wholly inside ``key``'s crop, or None."""
        m = key >= 0
        k, v = key[m], d[m]
        cell = k // r["sectors"]
        whole = (torch.bincount(cell, minlength=len(r["counts"])) == r["counts"]) & r["tumour"]
        keep = whole[cell]
        k, v = k[keep], v[keep]
        if k.numel() == 0:
            return None
        sectors, inv = torch.unique(k, return_inverse=True)
        s = torch.full((len(sectors),), -1.0, device=d.device).scatter_reduce(0, inv, v, "amax")
        _, c = torch.unique(sectors // r["sectors"], return_inverse=True)
        n = int(c.max()) + 1
        faint = self.params.faint
        on = torch.sigmoid((s - faint) / self.tau) if self.tau > 0 else (s >= faint).float()
        n_on = torch.zeros(n, device=d.device).index_add(0, c, on)
        n_sec = torch.zeros(n, device=d.device).index_add(0, c, torch.ones_like(on))
        total = torch.zeros(n, device=d.device).index_add(0, c, s * on)
        return total / n_on.clamp(min=1.0), n_on / n_sec

    def shares(self, reading) -> torch.Tensor:
        """Soft shares of the cells stained (completeness >= ``min_completeness``), weak-moderate or
        stronger, intense and complete, weak-moderate and complete (the scorer's ScoreParams)."""
        inten, comp = reading
        q = self.params
        on, full = torch.sigmoid((comp - q.min_completeness) / 0.05), torch.sigmoid((comp - q.complete) / 0.05)
        weak, intense = torch.sigmoid((inten - q.weak) / 0.02), torch.sigmoid((inten - q.intense) / 0.04)
        return torch.stack([on.mean(), (on * weak).mean(), (on * intense * full).mean(), (on * weak * full).mean()])

    def forward(self, fake: torch.Tensor, real: torch.Tensor, keys, rings) -> torch.Tensor:
        """``keys``: each sample's crop of its target's ``key`` (cropped and turned as the images);
        ``rings``: each sample's :meth:`rings`."""
        total, n = fake.new_zeros(()), 0
        for b, (key, r) in enumerate(zip(keys, rings)):
            out = self.read(self.dab_map(fake[b:b + 1], r), key, r)
            if out is None:
                continue
            with torch.no_grad():
                ref = self.read(self.dab_map(real[b:b + 1], r), key, r)
            total = total + self.wi * (out[0].sort().values - ref[0].sort().values).abs().mean()
            total = total + self.wc * (out[1].sort().values - ref[1].sort().values).abs().mean()
            if self.wf:
                total = total + self.wf * (self.shares(out) - self.shares(ref)).abs().sum()
            n += 1
        return total / max(n, 1)
