"""Subcommands of this package (see napari_bci.cli): ``napari-bci score``."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    """Add this package's subcommands to the ``napari-bci`` parser."""
    from ..cli import add_json_flag

    p = sub.add_parser(
        "score",
        help="ASCO/CAP HER2 score (0/1+/2+/3+) of an IHC image, with per-region scores",
        description="Detect cells on a HER2 IHC image (or slide), classify their membrane DAB "
        "staining and report the ASCO/CAP 2018 score with the evidence.",
    )
    p.add_argument("ihc", metavar="IHC", help="IHC image or slide")
    p.add_argument("--regions", metavar="GEOJSON",
                   help="QuPath/GeoJSON polygons (level-0 pixels) to score separately")
    p.add_argument("--mpp", type=float, default=None, metavar="UM",
                   help="microns per pixel (default: the file's, else 0.5)")
    p.add_argument("--cells", action="store_true", help="include per-cell measurements in the output")
    p.add_argument("--estimate-stains", action="store_true",
                   help="estimate the hematoxylin/DAB vectors per image (Macenko) instead of Ruifrok's")
    add_json_flag(p)
    p.set_defaults(func=run_score)


def run_score(args: argparse.Namespace) -> dict:
    from ..errors import InputError
    from .io import load_image, load_regions
    from .tiles import choose_level, score_map, score_polygon

    levels, file_mpp = load_image(args.ihc)
    if args.mpp is not None and not args.mpp > 0:
        raise InputError("--mpp", f"must be positive, got {args.mpp}")
    mpp = args.mpp or file_mpp or 0.5
    regions = load_regions(args.regions) if args.regions else []
    kw = {"estimate_stains": bool(args.estimate_stains)}
    _, ds, amp = choose_level(levels, mpp)
    h, w = levels[0].shape[:2]
    if (h / ds) * (w / ds) <= 2048 * 2048:
        from .scoring import score
        from .tiles import read_rgb

        li = choose_level(levels, mpp)[0]
        overall = score(read_rgb(levels[li], 0, 0, int(w / ds) + 1, int(h / ds) + 1), amp, **kw)
        overall.centroid = overall.centroid * ds
    else:
        overall = score_map(levels, mpp, **kw).overall
    out = overall.to_dict(per_cell=args.cells)
    out = {"file": str(args.ihc), **out, "regions": []}
    for name, poly in regions:
        r = score_polygon(levels, poly, mpp, **kw)
        out["regions"].append({"name": name, **r.to_dict(per_cell=args.cells)})
    return out
