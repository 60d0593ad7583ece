"""Subcommands of this package (see napari_bci.cli): ``napari-bci info``."""

from __future__ import annotations


def register(sub) -> None:
    """Add this package's subcommands to the ``napari-bci`` parser."""
    from napari_bci.cli import add_json_flag

    p = sub.add_parser("info", help="levels, microns per pixel and format of a slide, image or BCI folder",
                       description="Print a slide's pyramid levels [[h, w], ...], mpp (um/px or null) "
                                   "and format; for a BCI folder, its pair counts.")
    p.add_argument("path", metavar="PATH")
    add_json_flag(p)
    p.set_defaults(func=run_info)


def run_info(args) -> dict:
    from pathlib import Path

    path = Path(args.path)
    if path.is_dir():
        from .bci import open_bci_folder

        ds = open_bci_folder(path)
        return {"levels": [], "mpp": None, "format": "bci-folder", "path": str(ds.root), "pairs": len(ds),
                "unpaired": sum(p.ihc_path is None for p in ds), "her2": ds.counts(),
                "splits": {s: sum(p.split == s for p in ds) for s in ("train", "test")}}
    from .slide import open_slide

    with open_slide(path) as s:
        return s.info()
