"""PSNR and SSIM exactly as the BCI challenge's ``evaluate.py`` computes them.

BCI (bupt-ai-cz/BCI, ``PyramidPix2pix/evaluate.py``) reads both images as 8-bit colour,
calls ``skimage.metrics.peak_signal_noise_ratio(fake, real)`` (data range from uint8: 255) and
``structural_similarity(fake, real, multichannel=True)`` (7x7 uniform window, sample
covariance, K1 0.01, K2 0.03, the per-channel means averaged), and reports the plain mean of
the per-image values. Channel order (BGR there, RGB here) changes neither number.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


def _check(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"images differ in shape: {pred.shape} vs {gt.shape}")
    if pred.dtype != np.uint8 or gt.dtype != np.uint8:
        raise ValueError(f"BCI metrics need uint8 images, got {pred.dtype} and {gt.dtype}")
    return pred, gt


def psnr(pred: np.ndarray, gt: np.ndarray) -> float:
    """PSNR in dB with data range 255 (``inf`` for identical images)."""
    pred, gt = _check(pred, gt)
    mse = np.mean((pred.astype(np.float64) - gt.astype(np.float64)) ** 2)
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(255.0**2 / mse))


def ssim(pred: np.ndarray, gt: np.ndarray, *, fast: bool = True) -> float:
    """BCI's SSIM of two ``H x W x 3`` uint8 images.

    ``fast`` uses the torch implementation (:func:`napari_bci.metrics.ssim.ssim_map`, equal to
    skimage within ~1e-6 on the mean); ``fast=False`` calls scikit-image itself.
    """
    pred, gt = _check(pred, gt)
    if not fast:
        from skimage.metrics import structural_similarity

        return float(
            structural_similarity(pred, gt, channel_axis=-1 if pred.ndim == 3 else None, data_range=255)
        )
    from .ssim import ssim_map, ssim_mean

    return ssim_mean(ssim_map(pred, gt, kind="uniform", data_range=255.0), "uniform")


def mean_over_images(values: Iterable[float]) -> float:
    """BCI's aggregate: the plain arithmetic mean (``sum / len``)."""
    v = list(values)
    if not v:
        raise ValueError("no values to average")
    return float(sum(v) / len(v))
