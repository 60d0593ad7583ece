"""Comparison of generated and real IHC: BCI-exact PSNR/SSIM, local SSIM maps (torch),
misalignment-tolerant DAB and colour metrics, and folder evaluation."""

from .pair import METRIC_HELP, METRIC_KEYS, compare_pair
from .ssim import ssim_map, ssim_mean
from .tolerant import dab_metrics, delta_e, tolerant_metrics

# Last, so that the name ``ssim`` is the BCI function, not the ``.ssim`` submodule (all
# submodules are imported above, so importing them later does not rebind it).
from .bci import mean_over_images, psnr, ssim  # noqa: E402

__all__ = [
    "METRIC_HELP",
    "METRIC_KEYS",
    "compare_pair",
    "dab_metrics",
    "delta_e",
    "mean_over_images",
    "psnr",
    "ssim",
    "ssim_map",
    "ssim_mean",
    "tolerant_metrics",
]
