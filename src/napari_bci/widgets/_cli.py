"""``napari-bci demo`` and ``napari-bci view``: open napari (imported lazily)."""

from __future__ import annotations

from ..levels import HER2_LEVELS

SAMPLES = ("bci-0", "bci-1+", "bci-2+", "bci-3+", "wsi-pair", "cmu-small")


def check_screenshot_target(path: str | None) -> None:
    """InputError (one line, exit 2) unless a screenshot can be saved at ``path``: checked
    before napari starts, so a bad target never leaves a window open."""
    if path is None:
        return
    from ..errors import InputError
    from ..io.writers import check_writable

    if not path.lower().endswith((".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")):
        raise InputError(path, "screenshot must be an image file (.png, .jpg, .tif)")
    check_writable(path)


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="open napari on the embedded default: synthetic H&E/IHC whole-slide pair, built-in model, all widgets",
    )
    p.add_argument("--size", type=int, default=16384, help="level-0 size of the synthetic slide (default 16384)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--her2", default="3+", choices=list(HER2_LEVELS),
                   help="HER2 level of the synthetic slide (default 3+: membranes on every tumour cell)")
    p.add_argument("--model", default=None, help="generator for the Virtual IHC widget (default: builtin)")
    p.add_argument("--no-generate", action="store_true", help="do not start follow-the-view generation")
    p.add_argument("--zoom", type=float, default=0.5,
                   help="start zoom in screen px per slide px (default 0.5; 2 shows membranes up close)")
    p.add_argument("--real", action="store_true",
                   help="the real CMU-1-Small-Region H&E slide instead (the built-in model is out of its "
                        "domain there and says so)")
    p.add_argument("--screenshot", metavar="PNG", help="save a screenshot of the window and exit")
    p.set_defaults(func=run_demo)

    p = sub.add_parser("view", help="open slides, patches or BCI folders (and samples) in napari")
    p.add_argument("paths", nargs="*", metavar="PATH")
    p.add_argument("--sample", action="append", choices=SAMPLES, default=[], help="also open a sample (repeatable)")
    p.add_argument("--model", default=None, help="generator preselected in the Virtual IHC widget")
    p.add_argument("--screenshot", metavar="PNG", help="save a screenshot of the window and exit")
    p.set_defaults(func=run_view)


def run_demo(args):
    from ..errors import InputError

    check_screenshot_target(args.screenshot)
    if not args.zoom > 0:
        raise InputError(None, f"--zoom {args.zoom}: must be positive")
    from .._npe2 import bound_dask_cache
    from .app import launch_demo, launch_real_demo

    bound_dask_cache()
    if args.real:
        launch_real_demo(model=args.model, generate=not args.no_generate, screenshot=args.screenshot)
        return
    launch_demo(
        zoom=args.zoom,
        size=args.size,
        seed=args.seed,
        her2=args.her2,
        model=args.model,
        generate=not args.no_generate,
        screenshot=args.screenshot,
    )


def run_view(args):
    from pathlib import Path

    from ..errors import InputError
    from .._npe2 import get_reader

    check_screenshot_target(args.screenshot)
    layers = []  # read before napari starts, so bad input fails fast with one line
    for p in args.paths:
        if not Path(p).exists():
            raise InputError(p, "no such file or directory")
        reader = get_reader(str(p))
        if reader is None:
            raise InputError(p, "not a supported slide, image or BCI dataset folder")
        layers.extend(reader(str(p)))
    from .._npe2 import bound_dask_cache
    from .app import launch_view

    bound_dask_cache()  # also with samples only (the reader bounds it for paths)
    launch_view(layers, samples=args.sample, model=args.model, screenshot=args.screenshot)
