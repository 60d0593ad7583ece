"""``napari-bci sample NAME --out DIR``: write a sample (images + ground truth) to disk."""

from __future__ import annotations

SAMPLES = ("bci-0", "bci-1+", "bci-2+", "bci-3+", "wsi-pair", "cmu-small")


def register(sub) -> None:
    """Add this package's subcommands to the ``napari-bci`` parser."""
    from napari_bci.cli import add_json_flag

    p = sub.add_parser(
        "sample",
        help="write a sample: synthetic H&E/IHC pair with ground truth, or the real CMU-1-Small-Region slide",
        description="bci-*: he.png, ihc.png, truth.json, transform.json(+.npz), cells.csv (1024x1024 by default); "
        "wsi-pair: he.ome.tif, ihc.ome.tif pyramids streamed tile by tile, truth.json, transform.json(+.npz); "
        "cmu-small: the real slide.",
    )
    p.add_argument("name", metavar="NAME", help="one of: " + ", ".join(SAMPLES))
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=None, help="level-0 size (bci-*: 1024, wsi-pair: 16384)")
    p.add_argument("--mpp", type=float, default=0.5, help="microns per pixel of the synthetic samples")
    add_json_flag(p)
    p.set_defaults(func=run_sample)


def _atomic_write_bytes(path, data: bytes) -> None:
    import os

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _png_bytes(rgb) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _cells_csv(cells) -> bytes:
    import io

    import numpy as np

    cols = ["he_x", "he_y", "ihc_x", "ihc_y", "tumour", "kind", "membrane_class", "completeness", "membrane_od",
            "nucleus_radius", "in_he", "in_ihc"]
    arr = np.column_stack([
        cells["centroid_he"], cells["centroid_ihc"], cells["tumour"].astype(int), cells["kind"],
        cells["membrane_class"], cells["completeness"], cells["membrane_od"], cells["nucleus_radius"],
        cells["in_he"].astype(int), cells["in_ihc"].astype(int),
    ])
    buf = io.StringIO()
    buf.write(",".join(cols) + "\n")
    for row in arr:
        buf.write(",".join(f"{v:.3f}" if i < 4 or i in (7, 8, 9) else f"{int(v)}" for i, v in enumerate(row)) + "\n")
    return buf.getvalue().encode()


def run_sample(args) -> dict:
    import json
    import shutil
    from pathlib import Path

    from ..errors import InputError

    name = args.name
    if name not in SAMPLES:
        raise InputError(name, f"unknown sample; choose one of {', '.join(SAMPLES)}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(out, "not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(out, f"cannot create the output directory ({e.strerror})") from None
    min_size = 512 if name == "wsi-pair" else 16
    if args.size is not None and args.size < min_size:
        raise InputError(f"--size {args.size}", f"must be at least {min_size} for {name}")
    if not args.mpp > 0:
        raise InputError(f"--mpp {args.mpp}", "must be positive")
    written: list[str] = []
    report: dict = {"sample": name, "out": str(out)}

    if name == "cmu-small":
        from . import CMU_SMALL

        dst = out / CMU_SMALL.name
        tmp = dst.with_name(f".{dst.name}.tmp")
        shutil.copyfile(CMU_SMALL, tmp)
        tmp.replace(dst)
        written.append(str(dst))
    elif name.startswith("bci-"):
        from .synthetic import make_pair

        her2 = name[4:]
        pair = make_pair(her2=her2, size=args.size or 1024, seed=args.seed, mpp=args.mpp)
        for fname, img in (("he.png", pair.he), ("ihc.png", pair.ihc)):
            _atomic_write_bytes(out / fname, _png_bytes(img))
            written.append(str(out / fname))
        tpath = out / "transform.json"
        pair.truth.transform.save(tpath)
        written += [str(tpath), str(tpath.with_suffix(".npz"))]
        _atomic_write_bytes(out / "cells.csv", _cells_csv(pair.truth.cells))
        written.append(str(out / "cells.csv"))
        truth = pair.truth.to_json()
        truth.update({"sample": name, "size": list(pair.he.shape[:2]), "transform_file": tpath.name,
                      "cells_file": "cells.csv", "he": "he.png", "ihc": "ihc.png"})
        _atomic_write_bytes(out / "truth.json", json.dumps(truth, indent=2).encode())
        written.append(str(out / "truth.json"))
        report.update(her2=truth["her2"], mpp=truth["mpp"], cells=truth["cells"])
    else:  # wsi-pair
        from ..io.writers import write_pyramid
        from .wsi import make_wsi_pair

        w = make_wsi_pair(size=args.size or 16384, seed=args.seed, mpp=args.mpp)
        for fname, levels in (("he.ome.tif", w.he_levels), ("ihc.ome.tif", w.ihc_levels)):
            write_pyramid(out / fname, list(levels), mpp=w.mpp, tile=w.tile, name=fname.split(".")[0])
            written.append(str(out / fname))
        tpath = out / "transform.json"
        w.transform.save(tpath)
        written += [str(tpath), str(tpath.with_suffix(".npz"))]
        truth = w.to_json()
        truth.update({"sample": name, "transform_file": tpath.name, "he": "he.ome.tif", "ihc": "ihc.ome.tif"})
        _atomic_write_bytes(out / "truth.json", json.dumps(truth, indent=2).encode())
        written.append(str(out / "truth.json"))
        report.update(her2=w.her2, mpp=w.mpp, levels=truth["levels"])
    report["files"] = written
    return report
