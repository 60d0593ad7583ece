"""Subcommands of this package (see napari_bci.cli): ``evaluate`` and ``ssim``."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    """Add this package's subcommands to the ``napari-bci`` parser."""
    from ..cli import add_json_flag

    p = sub.add_parser(
        "evaluate",
        help="compare a folder of generated IHC with the ground truth (BCI PSNR/SSIM + tolerant metrics)",
        description="Match files by name (BCI names NNNNN_{train,test}_{level}.png give the per-level "
        "breakdown) and report n, mean and std of every metric, overall and per HER2 level.",
    )
    p.add_argument("--pred", required=True, help="folder of generated images")
    p.add_argument("--gt", required=True, help="folder of ground-truth images (same file names)")
    p.add_argument("--csv", metavar="F", help="also write one row per image to this CSV file")
    p.add_argument("--mpp", type=float, default=None,
                   help="microns per pixel for the cell-scale smoothing (default 0.5, BCI's 20x)")
    p.add_argument("--bci-only", action="store_true", help="only PSNR and SSIM (faster)")
    p.add_argument("--device", default=None, help="torch device for SSIM (cpu, cuda, ...)")
    add_json_flag(p)
    p.set_defaults(func=run_evaluate)

    q = sub.add_parser("ssim", help="local SSIM map of two images, written as a float32 TIFF")
    q.add_argument("a", help="first image (e.g. generated)")
    q.add_argument("b", help="second image (e.g. ground truth), same size")
    q.add_argument("--out", required=True, metavar="MAP.tif", help="output TIFF (float32, H x W)")
    q.add_argument("--window", choices=("uniform", "gaussian"), default="uniform",
                   help="7x7 uniform (skimage default, BCI) or 11x11 Gaussian sigma 1.5 (Wang et al.)")
    q.add_argument("--device", default=None, help="torch device (cpu, cuda, ...)")
    add_json_flag(q)
    q.set_defaults(func=run_ssim)


def run_evaluate(args) -> dict:
    from ..errors import InputError
    from .evaluate import evaluate_folders, json_safe, write_csv

    if args.mpp is not None and not args.mpp > 0:
        raise InputError("--mpp", f"must be positive, got {args.mpp}")
    if args.csv:
        csv_parent = Path(args.csv).resolve().parent
        if not csv_parent.is_dir():
            raise InputError(args.csv, f"folder {csv_parent} does not exist")
    summary, rows = evaluate_folders(args.pred, args.gt, mpp=args.mpp, tolerant=not args.bci_only,
                                     device=args.device)
    if args.csv:
        write_csv(args.csv, rows)
        summary["csv"] = str(args.csv)
    return json_safe(summary)


def run_ssim(args) -> dict:
    from .ssim import ssim_map_file

    return ssim_map_file(args.a, args.b, args.out, kind=args.window, device=args.device)
