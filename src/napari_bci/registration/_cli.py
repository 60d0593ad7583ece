"""Subcommands of this package (see napari_bci.cli): ``register`` and ``transform``."""

from __future__ import annotations


def register(sub) -> None:
    """Add this package's subcommands to the ``napari-bci`` parser."""
    from napari_bci.cli import add_json_flag

    p = sub.add_parser(
        "register", help="align an H&E (moving) image onto an IHC (fixed) image",
        description="Register MOVING (H&E) onto FIXED (IHC) and write the transform (JSON, plus an .npz "
                    "displacement field for deformable results). The report gives landmark TRE, NCC and "
                    "mutual information before/after and the folded-pixel fraction.")
    p.add_argument("fixed", metavar="FIXED", help="the IHC image or slide (the reference frame)")
    p.add_argument("moving", metavar="MOVING", help="the H&E image or slide")
    p.add_argument("--out", required=True, metavar="T.json", help="transform file to write")
    p.add_argument("--method", choices=("landmarks", "auto", "deformable"), default=None,
                   help="landmarks (needs --landmarks), auto (a stain-invariant search over any rotation, the "
                        "flip and scales 0.5-2, refused with a message when unsure) or deformable "
                        "(landmark or auto initialisation, then a dense field). Default: deformable")
    p.add_argument("--landmarks", metavar="CSV",
                   help="point pairs, columns moving_x,moving_y,fixed_x,fixed_y in level-0 pixels")
    p.add_argument("--warp-out", metavar="PATH",
                   help="also write the H&E warped into the IHC frame (.ome.tif/.tif pyramid, or .png/.jpg)")
    p.add_argument("--engine", choices=("flow", "elastix"), default="flow",
                   help="deformable engine: flow (default, built in) or elastix (needs napari-bci[elastix])")
    p.add_argument("--model", choices=("projective", "affine", "similarity", "rigid"), default="projective",
                   help="landmark model (default projective)")
    p.add_argument("--ransac", action="store_true", help="drop outlier landmark pairs by RANSAC")
    p.add_argument("--seed", type=int, default=0)
    add_json_flag(p)
    p.set_defaults(func=run_register)

    t = sub.add_parser("transform", help="map points through a saved transform",
                       description="Map the CSV's moving_x,moving_y (H&E, level-0 px) into the IHC frame; "
                                   "with --inverse map fixed_x,fixed_y (or moving_x,moving_y when absent) "
                                   "back.")
    t.add_argument("transform", metavar="T.json")
    t.add_argument("points", metavar="POINTS.csv")
    t.add_argument("--inverse", action="store_true",
                   help="map fixed (IHC) points back to the moving (H&E) frame")
    add_json_flag(t)
    t.set_defaults(func=run_transform)


#: Smallest side (px) an automatic registration works on: its coarsest search is at 96 px.
MIN_SIDE = 64


def run_register(args) -> dict:
    import time
    from pathlib import Path

    from ..errors import InputError
    from .api import register as do_register
    from .features import RegistrationFailed
    from .images import read_pyramid
    from .landmarks import read_landmarks_csv

    t0 = time.perf_counter()
    out = Path(args.out)
    if not out.parent.exists():
        raise InputError(out, "cannot write: the directory does not exist")
    landmarks = read_landmarks_csv(args.landmarks) if args.landmarks else None
    method = args.method or "deformable"
    if method == "landmarks" and landmarks is None:
        raise InputError(args.out, "--method landmarks needs --landmarks CSV")
    if args.warp_out:
        _check_warp_out(Path(args.warp_out))
    fixed = read_pyramid(args.fixed)
    moving = read_pyramid(args.moving)
    for path, pyr in ((args.fixed, fixed), (args.moving, moving)):
        h, w = pyr.shape[:2]
        if method != "landmarks" and min(h, w) < MIN_SIDE:
            raise InputError(path, f"{w}x{h} px is too small to register automatically "
                                   f"(at least {MIN_SIDE} px a side; place landmarks instead)")
    try:
        res = do_register(fixed, moving, method=method, landmarks=landmarks, model=args.model,
                          ransac=args.ransac, engine=args.engine, seed=args.seed)
    except RegistrationFailed as e:
        if e.image is None:
            raise
        raise InputError({"fixed": args.fixed, "moving": args.moving}[e.image], str(e)) from e
    t = res.transform
    t.meta.update({"fixed": str(args.fixed), "moving": str(args.moving), "fixed_shape": list(fixed.shape),
                   "moving_shape": list(moving.shape), "fixed_mpp": fixed.mpp, "moving_mpp": moving.mpp})
    t.save(out)
    report = {"transform": str(out), "method": method, "matrix": t.matrix.tolist(),
              "field_shape": None if t.field is None else list(t.field.shape), "spacing": t.spacing}
    report.update({k: v for k, v in res.report.items() if k != "method"})
    if args.warp_out:
        report["warp_out"] = str(write_warped(args.warp_out, fixed, moving, t))
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


_PYRAMID = (".tif", ".tiff")
_FLAT = (".png", ".jpg", ".jpeg")


def _check_warp_out(path) -> None:
    from ..errors import InputError

    if path.suffix.lower() not in _PYRAMID + _FLAT:
        raise InputError(path, "--warp-out must end in .ome.tif, .tif, .png or .jpg")
    if not path.parent.exists():
        raise InputError(path, "cannot write: the directory does not exist")


def write_warped(path, fixed, moving, transform):
    """Write the moving image warped into the fixed frame (level 0), atomically; tile by tile for
    TIFF pyramids, so a whole slide is never held in memory."""
    import os
    from pathlib import Path

    import numpy as np

    from .warp import warp_region

    path = Path(path)
    H, W = fixed.shape
    if path.suffix.lower() in _PYRAMID:
        from ..io.writers import write_pyramid

        def tile(y, x, h, w):
            return warp_region(moving.levels[0], transform, (y, x), (h, w))

        return write_pyramid(path, tile, shape=(H, W), mpp=fixed.mpp)
    from skimage.io import imsave

    img = warp_region(moving.levels[0], transform, (0, 0), (H, W))
    tmp = path.with_name(".tmp-" + path.name)
    try:
        imsave(tmp, np.ascontiguousarray(img), check_contrast=False)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def run_transform(args) -> dict:
    import csv
    from pathlib import Path

    import numpy as np

    from ..errors import InputError
    from ..transform import Transform
    from .landmarks import _read_csv

    t = Transform.load(args.transform)
    path = Path(args.points)
    try:
        with open(path, newline="") as fh:
            header = [h.strip() for h in (next(csv.reader(fh), None) or [])]
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except UnicodeDecodeError:
        raise InputError(path, "not a text CSV file") from None
    cols = ("moving_x", "moving_y")
    if args.inverse and "fixed_x" in header and "fixed_y" in header:
        cols = ("fixed_x", "fixed_y")
    pts = _read_csv(path, cols, 2)[0]
    out = t.backward(pts) if args.inverse else t.forward(pts)
    if not np.isfinite(out).all():
        raise InputError(path, "some points map to infinity (outside the transform's domain)")
    return {"points": [[float(x), float(y)] for x, y in out], "inverse": bool(args.inverse),
            "n": int(len(out))}
