"""Every metric of one generated / ground-truth pair in one call (CLI, widget, region table)."""

from __future__ import annotations

import numpy as np

from . import bci
from .ssim import ssim_map, ssim_mean, window
from .tolerant import DEFAULT_SIGMA_UM, tolerant_metrics

#: Keys of :func:`compare_pair`'s result, in display order.
METRIC_KEYS = (
    "psnr",
    "ssim",
    "ssim_local",
    "dab_mae",
    "dab_bias",
    "dab_corr",
    "dab_pred",
    "dab_gt",
    "delta_e",
)

#: Short descriptions (tables, CSV headers, docs).
METRIC_HELP = {
    "psnr": "PSNR (dB), BCI exact",
    "ssim": "SSIM, BCI exact (7x7 uniform, mean over channels)",
    "ssim_local": "mean local SSIM inside the region (whole image: equals ssim)",
    "dab_mae": "mean |DAB OD pred - truth| after cell-scale smoothing",
    "dab_bias": "mean DAB OD pred - truth after smoothing",
    "dab_corr": "Pearson r of the smoothed DAB OD maps",
    "dab_pred": "mean smoothed DAB OD of the prediction",
    "dab_gt": "mean smoothed DAB OD of the ground truth",
    "delta_e": "mean CIEDE2000 colour difference after smoothing",
}


def _as_rgb_u8(img, what: str) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"{what}: expected an RGB image, got shape {a.shape}")
    if a.dtype != np.uint8:
        raise ValueError(f"{what}: expected uint8, got {a.dtype}")
    return a


def compare_pair(
    pred,
    gt,
    *,
    mpp: float | None = None,
    mask: np.ndarray | None = None,
    sigma_um: float = DEFAULT_SIGMA_UM,
    device: str | None = None,
    tolerant: bool = True,
    return_map: bool = False,
):
    """All metrics for ``pred`` (generated) against ``gt`` (real), both ``H x W x 3`` uint8.

    PSNR and SSIM are the BCI challenge's (whole array). ``mask`` (bool ``H x W``) restricts
    ``ssim_local`` and the tolerant metrics to a region (a polygon inside its bounding box).
    ``tolerant=False`` skips the DAB/colour metrics. With ``return_map`` returns
    ``(dict, local_ssim_map)``.
    """
    pred = _as_rgb_u8(pred, "prediction")
    gt = _as_rgb_u8(gt, "ground truth")
    if pred.shape != gt.shape:
        raise ValueError(f"images differ in shape: {pred.shape} vs {gt.shape}")
    if mask is not None and mask.shape != pred.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match the image {pred.shape[:2]}")
    out: dict = {"psnr": bci.psnr(pred, gt)}
    smap = ssim_map(pred, gt, kind="uniform", data_range=255.0, device=device)
    out["ssim"] = ssim_mean(smap, "uniform")
    if mask is None:
        out["ssim_local"] = out["ssim"]
    else:
        r = window("uniform").pad
        inner = np.zeros_like(mask)
        inner[r : mask.shape[0] - r, r : mask.shape[1] - r] = True
        m = mask & inner
        out["ssim_local"] = float(smap[m].mean(dtype=np.float64)) if m.any() else float("nan")
    if tolerant:
        out.update(tolerant_metrics(pred, gt, mpp=mpp, sigma_um=sigma_um, mask=mask))
    return (out, smap) if return_map else out
