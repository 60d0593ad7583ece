"""Subcommands of this package (see napari_bci.cli): ``napari-bci score``."""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    """Add this package's subcommands to the ``napari-bci`` parser."""
    from ..cli import add_json_flag

    p = sub.add_parser(
        "score",
        help="ASCO/CAP HER2 score (0/1+/2+/3+ or not assessable) of an IHC image, with per-region scores",
        description="Detect cells on a HER2 IHC image (or slide), classify their membrane DAB "
        "staining and report the ASCO/CAP 2018 score with the evidence, or why the image is not "
        "assessable. An H&E image is refused (exit 2).",
    )
    p.add_argument("ihc", metavar="IHC", help="IHC image or slide")
    p.add_argument("--regions", metavar="GEOJSON",
                   help="QuPath/GeoJSON polygons (level-0 pixels) to score separately")
    p.add_argument("--mpp", type=float, default=None, metavar="UM",
                   help="microns per pixel (default: the file's, else 0.5 with a warning)")
    p.add_argument("--cells", action="store_true", help="include per-cell measurements in the output")
    p.add_argument("--estimate-stains", action="store_true",
                   help="estimate the hematoxylin/DAB vectors per image (Macenko) instead of Ruifrok's")
    p.add_argument("--he", metavar="HE", default=None,
                   help="the H&E of the same section: adds the learned level of --model beside the "
                   "rule-based one (same pixel grid, e.g. the H&E a generated IHC was made from)")
    p.add_argument("--model", default="builtin",
                   help="generator with a HER2 head for --he (registry name or checkpoint; default builtin)")
    add_json_flag(p)
    p.set_defaults(func=run_score)


def run_score(args: argparse.Namespace) -> dict:
    from ..errors import InputError
    from ..io import provenance
    from .io import load_image, load_regions
    from .report import virtual_ihc_caveat
    from .scoring import score
    from .tiles import choose_level, image_context, read_rgb, score_map, score_polygon

    levels, file_mpp = load_image(args.ihc)
    if args.mpp is not None and not args.mpp > 0:
        raise InputError("--mpp", f"must be positive, got {args.mpp}")
    mpp = args.mpp or file_mpp or 0.5
    notes = [] if (args.mpp or file_mpp) else ["pixel size unknown (not in the file): 0.5 um/px assumed; "
                                                "give --mpp"]
    regions = load_regions(args.regions) if args.regions else []
    model, colours = image_context(levels, estimate_stains=bool(args.estimate_stains))
    if colours is not None:  # an H&E (or a grayscale image) given as the IHC: refuse
        raise InputError(args.ihc, f"{colours['reason']}; give the HER2 IHC (or a generated one)")
    kw = {"estimate_stains": bool(args.estimate_stains), "stain_model": model}
    li, ds, amp = choose_level(levels, mpp)
    h, w = levels[0].shape[:2]
    if (h / ds) * (w / ds) <= 2048 * 2048:
        overall = score(read_rgb(levels[li], 0, 0, int(w / ds) + 1, int(h / ds) + 1), amp, **kw)
        overall.centroid = overall.centroid * ds
    else:
        overall = score_map(levels, mpp, **kw).overall
    overall.warnings[:0] = notes
    d = overall.to_dict(per_cell=args.cells)
    out = {"file": str(args.ihc), "her2": d.pop("her2"), "display": d.pop("display"), **d}
    # a virtual IHC written by `napari-bci generate` says so (and whether its model was out of its domain)
    made = provenance.read(args.ihc)
    caveat = virtual_ihc_caveat({**made, "role": "generated"}) if made and made.get("virtual_ihc") else None
    if caveat:
        out["virtual_ihc"] = {k: made.get(k) for k in ("model", "source", "out_of_domain")}
        out["caveat"] = caveat
        print(f"note: {args.ihc}: {caveat}", file=sys.stderr)
    if args.he:
        out["learned"] = _learned(args, overall, mpp)
    out["regions"] = []
    for name, poly in regions:
        r = score_polygon(levels, poly, mpp, **kw)
        r.warnings[:0] = notes
        out["regions"].append({"name": name, **r.to_dict(per_cell=args.cells)})
    return out


def _learned(args, overall, mpp) -> dict:
    """The learned level of ``--model`` on the ``--he`` image, compared with the rule-based one."""
    from .io import load_image
    from .learned import compare, level_model, predict_map

    he_levels, he_mpp = load_image(args.he)
    model = level_model(args.model)
    if model is None:
        return compare(overall, None)
    lm = predict_map(he_levels, he_mpp or mpp, model)
    return compare(overall, lm.region() if lm is not None else None)
