"""``napari-bci train``: the command line of :mod:`napari_bci.train.loop`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..cli import add_json_flag
from ..errors import InputError
from .loop import ARCHS, read_bci_folder, synthetic_pairs, train


def register(sub) -> None:
    """Add ``napari-bci train`` to the CLI's subparsers."""
    p = sub.add_parser(
        "train", help="train a generator (PyramidPix2pix or HER2-level-aware) on BCI data or synthetic pairs",
        description="Train on a BCI-layout folder (HE/{train,test}, IHC/{train,test}) or on synthetic pairs "
                    "(DATAROOT 'synthetic' or --synthetic N). Writes OUT/model.safetensors + OUT/model.json "
                    "(loadable with --model OUT/model.safetensors) and a resumable checkpoint.",
    )
    p.add_argument("dataroot", nargs="?", default=None, metavar="DATAROOT",
                   help="BCI dataset folder, or 'synthetic'")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--arch", default="level_aware", choices=ARCHS)
    p.add_argument("--epochs", type=int, default=None, help="epochs (validation + checkpoint after each)")
    p.add_argument("--steps", type=int, default=None, help="total optimisation steps")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--crop", type=int, default=256, help="training crop size (px)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--l1-weight", type=float, default=25.0, help="weight of each pyramid L1 scale")
    p.add_argument("--ssim-weight", type=float, default=0.0)
    p.add_argument("--gan-weight", type=float, default=1.0, help="0 trains without the PatchGAN")
    p.add_argument("--focal-weight", type=float, default=1.0, help="HER2 head loss (level_aware)")
    p.add_argument("--dab-weight", type=float, default=0.0,
                   help="membrane DAB loss (max-pooled DAB OD L1, weighted on membranes)")
    p.add_argument("--teacher-forcing", type=float, default=0.0, metavar="P",
                   help="level_aware: fraction of samples whose decoder sees the true level")
    p.add_argument("--gan-ndf", type=int, default=64, help="PatchGAN filters in its first layer")
    p.add_argument("--init", default=None, metavar="SAFETENSORS",
                   help="start from these generator weights (same architecture) instead of random")
    p.add_argument("--norm", default="batch", choices=("batch", "instance", "none"), help="pix2pix archs")
    p.add_argument("--dropout", action="store_true", help="dropout in pix2pix generators")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="stop with a checkpoint at this step (continue later with --resume)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument("--workers", type=int, default=0, help="data-loading processes")
    p.add_argument("--synthetic", type=int, default=None, metavar="N", help="train on N synthetic pairs")
    p.add_argument("--synthetic-size", type=int, default=512, help="synthetic pair size (px)")
    p.add_argument("--val", type=int, default=8, help="validation pairs (held out / the test split)")
    p.add_argument("--name", default=None, help="model name (default: the output folder's name)")
    p.add_argument("--mpp", type=float, default=0.5, help="training magnification, um/px")
    add_json_flag(p)
    p.set_defaults(func=run_train)


def _check_out(out: Path) -> None:
    """The output folder can be made and written, before any data is built."""
    from ..io.writers import check_writable

    if out.exists() and not out.is_dir():
        raise InputError(out, "--out must be a folder")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(out, f"cannot create the output folder: {existing} is not a folder")
    try:
        check_writable(existing / "model.safetensors")  # nothing is created yet
    except InputError:
        raise InputError(out, f"cannot write the output folder: {existing} is not writable") from None


def run_train(args) -> dict:
    from ..models.device import set_cpu_threads

    set_cpu_threads(None)
    root = args.dataroot
    synthetic = args.synthetic
    if root is not None and root != "synthetic" and synthetic is not None:
        raise InputError(root, "give either a dataset folder or --synthetic N, not both")
    if root is None and synthetic is None:
        raise InputError(None, "give a DATAROOT folder, 'synthetic', or --synthetic N")
    for flag in ("batch", "val"):
        if getattr(args, flag) < (1 if flag == "batch" else 0):
            raise InputError(None, f"--{flag} must be positive")
    _check_out(Path(args.out))
    if root is None or root == "synthetic":
        n = synthetic if synthetic is not None else 32
        if n < 1:
            raise InputError(None, "--synthetic must be >= 1")
        size = args.synthetic_size
        if size < args.crop:
            raise InputError(None, f"--synthetic-size {size} is smaller than --crop {args.crop}")
        base = 1000 + 100_000 * args.seed
        train_pairs = synthetic_pairs(n, size, seed=base, progress=True)
        val_pairs = synthetic_pairs(args.val, size, seed=base + 50_000) if args.val else []
        data = {"source": "synthetic (napari_bci.samples.synthetic.make_pair, aligned by its registration truth)",
                "train_pairs": n, "train_seeds": [base, base + n - 1], "val_pairs": args.val,
                "val_seeds": [base + 50_000, base + 50_000 + args.val - 1], "size": size, "mpp": 0.5}
    else:
        if not Path(root).is_dir():
            raise InputError(root, "not a directory")
        train_pairs = read_bci_folder(root, "train")
        try:
            val_pairs = read_bci_folder(root, "test")
        except InputError:
            val_pairs = []
        if args.val < len(val_pairs):  # an evenly spread, deterministic subset
            idx = np.linspace(0, len(val_pairs) - 1, args.val).round().astype(int) if args.val else []
            val_pairs = [val_pairs[i] for i in idx]
        data = {"source": f"BCI folder {Path(root).resolve()}", "train_pairs": len(train_pairs),
                "val_pairs": len(val_pairs)}
    report = train(
        train_pairs, val_pairs, args.out, arch=args.arch, epochs=args.epochs, steps=args.steps, batch=args.batch,
        crop=args.crop, lr=args.lr, l1_weight=args.l1_weight, ssim_weight=args.ssim_weight,
        gan_weight=args.gan_weight, focal_weight=args.focal_weight, dab_weight=args.dab_weight,
        teacher_forcing=args.teacher_forcing, gan_ndf=args.gan_ndf, init=args.init, seed=args.seed, device=args.device,
        resume=args.resume, stop_at=args.stop_at, workers=args.workers, name=args.name, mpp=args.mpp, norm=args.norm,
        use_dropout=args.dropout, data_info=data,
        log=(lambda s: None) if getattr(args, "json", False) else None,
    )
    return report
