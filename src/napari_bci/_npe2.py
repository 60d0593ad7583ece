"""The npe2 front end (commands named in ``napari.yaml``): the reader (slides, patches, BCI
folders), the pyramidal OME-TIFF writer with its save-generated-layer hook, and sample data.

The only module outside ``widgets/`` that may use napari; the core never imports it.

Errors: the reader function raises :class:`~napari_bci.errors.InputError` ("<file>: <problem>");
napari wraps it in ``ReaderPluginError`` whose message ends with that line, and its GUI shows
it in the reader dialog / a notification while the viewer keeps running. Writers raise
:class:`BCIError`, not ``ValueError``: napari treats a ``ValueError`` from a writer as "no writer
found" and would hide the message.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from .io.layers import HE, IHC_TRUTH, generated_name, image_layer
from .io.slide import is_slide_file


def _is_ihc_name(p: Path) -> bool:
    parts = [s.lower() for s in p.parts[-3:-1]]
    if "ihc" in parts:
        return True
    if "he" in parts:
        return False
    stem = p.name.lower()
    return any(k in stem for k in ("ihc", "her2", "dab"))


def get_reader(path: str | list[str]) -> Callable | None:
    """npe2 reader hook: a reader function for slides, patches and BCI folders, else None."""
    from .io.bci import is_bci_folder

    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths:
        return None
    for p in map(Path, paths):
        if p.is_dir():
            if not is_bci_folder(p):
                return None
        elif not is_slide_file(p):
            return None
    return read_paths


#: napari's dask chunk cache (default: a tenth of RAM, which a long session fills with slide
#: tiles it never shows again): at most this, and at most 1/16 of RAM.
DASK_CACHE_BYTES = 1 << 30


def dask_cache_budget() -> int:
    """Bytes of napari's dask cache once the plugin opens slides: min(1 GiB, RAM / 16)."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows)
        return DASK_CACHE_BYTES
    return int(min(DASK_CACHE_BYTES, ram // 16))


def bound_dask_cache() -> None:
    """Resize napari's dask cache to :func:`dask_cache_budget` (``view``, ``demo`` and the reader)."""
    from napari.utils import resize_dask_cache

    resize_dask_cache(dask_cache_budget())


def read_paths(path: str | list[str]) -> list[tuple]:
    """Layer data for each path (a BCI patch or folder brings its partner).

    Tiles that cannot be decoded show as white with one warning each (``open_slide``'s fill
    mode: a damaged tile must not stop a review), and napari's dask cache is bounded.
    """
    bound_dask_cache()
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    out: list[tuple] = []
    for p in map(Path, paths):
        out.extend(read_bci_folder(p) if p.is_dir() else read_file(p))
    return out


def slide_layer(slide, name: str, role: str, her2: str | None = None, **extra: Any) -> tuple:
    """One image LayerDataTuple for a :class:`Slide` (a single small level becomes numpy)."""
    levels = slide.levels if len(slide.levels) > 1 else [slide.levels[0].compute()]
    return image_layer(levels, name, mpp=slide.mpp, role=role, path=str(slide.path), fmt=slide.format,
                       her2=her2, extra_metadata={"downsamples": slide.downsamples, **extra})


def read_file(p: Path) -> list[tuple]:
    """A slide or patch; a BCI patch also yields its partner (H&E first); a virtual IHC file
    (:mod:`napari_bci.io.provenance`) opens as a generated layer."""
    from .io import provenance
    from .io.bci import find_ihc_partner, parse_bci_name
    from .io.slide import open_slide

    made = provenance.read(p)
    if made and made.get("virtual_ihc"):  # written by `napari-bci generate` (or the viewer's writer)
        return [slide_layer(open_slide(p, on_error="fill"), generated_name(str(made.get("model"))), "generated",
                            model=made.get("model"), source=made.get("source"),
                            out_of_domain=made.get("out_of_domain"))]
    bci = parse_bci_name(p.name)
    partner = find_ihc_partner(p) if bci else None
    is_ihc = _is_ihc_name(p)
    her2 = bci.her2 if bci else None
    main = slide_layer(open_slide(p, on_error="fill"), IHC_TRUTH if is_ihc else HE, "ihc" if is_ihc else "he", her2)
    if partner is None:
        return [main]
    other = slide_layer(open_slide(partner, on_error="fill"), HE if is_ihc else IHC_TRUTH, "he" if is_ihc else "ihc", her2)
    return [other, main] if is_ihc else [main, other]


def read_bci_folder(p: Path, index: int = 0) -> list[tuple]:
    """The pair ``index`` of a BCI folder as "H&E" and "IHC (ground truth)" layers.

    One pair, not a stack: the other widgets work on 2-D images; the Slides widget steps through
    the pairs. Metadata ``bci`` holds the dataset root, the pair index and the pair count.
    """
    from .io.bci import open_bci_folder
    from .io.slide import open_slide

    ds = open_bci_folder(p)
    pair = ds[index]
    info = {"bci": {"root": str(ds.root), "index": index, "count": len(ds), "name": pair.name,
                    "split": pair.split}}
    layers = [slide_layer(open_slide(pair.he_path, on_error="fill"), HE, "he", pair.her2, **info)]
    if pair.ihc_path is not None:
        layers.append(slide_layer(open_slide(pair.ihc_path, on_error="fill"), IHC_TRUTH, "ihc", pair.her2, **info))
    return layers


def write_ome_tiff(path: str, data: Any, attributes: dict) -> list[str]:
    """npe2 single-layer writer: an RGB image layer (one array or its levels) as pyramidal OME-TIFF.

    Errors are raised as :class:`BCIError`, not ``ValueError``: napari treats a ``ValueError``
    from a writer as "no writer found" and would hide the message.
    """
    from collections.abc import Sequence

    import numpy as np

    from .errors import BCIError
    from .io.patches import to_rgb8
    from .io.writers import write_pyramid

    from .generate.batch import can_complete_layer

    meta = attributes.get("metadata") or {}
    if can_complete_layer(meta):  # a generated layer: the whole slide, computing its missing tiles
        return save_generated(path, data, meta)
    mpp = meta.get("mpp")
    if mpp is None:
        units = [str(u) for u in (attributes.get("units") or ())]
        scale = attributes.get("scale") or (1.0, 1.0)
        if units and all(u in ("µm", "um", "micrometer", "micron") for u in units[-2:]):
            mpp = float(scale[-1])
    levels = list(data) if isinstance(data, Sequence) else [data]  # napari's MultiScaleData is a Sequence
    try:
        fixed = []
        for a in levels:
            if not (a.ndim == 3 and a.shape[2] == 3 and a.dtype == np.uint8):
                a = to_rgb8(a if hasattr(a, "map_blocks") else np.asarray(a), attributes.get("name", path))
            fixed.append(a)
        made = None
        if meta.get("role") == "generated":  # a virtual IHC keeps saying what made it
            from .io.provenance import record

            made = record(meta.get("model") or "unknown", meta.get("source_path") or meta.get("source"),
                          meta.get("out_of_domain"))
        write_pyramid(path, fixed if len(fixed) > 1 else fixed[0], mpp=mpp, name=attributes.get("name"),
                      provenance=made)
    except ValueError as e:
        raise BCIError(str(e) if str(path) in str(e) else f"{path}: {e}") from e
    return [str(path)]


def save_generated(path: str, data: Any, meta: dict) -> list[str]:
    """Write a generated layer as a whole slide (:func:`napari_bci.generate.batch.save_generated_layer`,
    computing the tiles the viewer has not), with napari's progress bar."""
    from napari.utils import progress

    from .errors import BCIError
    from .generate.batch import save_generated_layer

    bar = progress(total=0, desc=f"Saving {Path(path).name}")

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    try:
        return save_generated_layer(path, data, meta, progress=update)
    except ValueError as e:
        raise BCIError(str(e)) from e
    finally:
        bar.close()


# -- sample data ----------------------------------------------------------------------------------
def pair_layers(her2: str, size: int = 1024, seed: int = 0, mpp: float = 0.5) -> list[tuple]:
    """A synthetic BCI-style pair as two layer tuples."""
    from .samples.synthetic import make_pair

    pair = make_pair(her2=her2, size=size, seed=seed, mpp=mpp)
    t = pair.truth
    common = dict(mpp=t.mpp, fmt="synthetic", her2=t.her2, extra_metadata={"truth": t, "seed": seed})
    return [
        image_layer(pair.he, HE, role="he", **common),
        image_layer(pair.ihc, IHC_TRUTH, role="ihc", **common),
    ]


def bci_0() -> list[tuple]:
    return pair_layers("0")


def bci_1() -> list[tuple]:
    return pair_layers("1+")


def bci_2() -> list[tuple]:
    return pair_layers("2+")


def bci_3() -> list[tuple]:
    return pair_layers("3+")


def wsi_pair(size: int = 16384, seed: int = 0, her2: str = "2+") -> list[tuple]:
    """The lazy synthetic whole-slide pair (multiscale layers)."""
    from .samples.wsi import make_wsi_pair

    w = make_wsi_pair(size=size, seed=seed, her2=her2)
    common = dict(mpp=w.mpp, fmt="synthetic", her2=w.her2, extra_metadata={"truth": w, "seed": seed})
    return [
        image_layer(w.he_levels, HE, role="he", **common),
        image_layer(w.ihc_levels, IHC_TRUTH, role="ihc", **common),
    ]


def cmu_small() -> list[tuple]:
    """The real CMU-1-Small-Region H&E slide shipped with the package."""
    from .io.slide import open_slide
    from .samples import CMU_SMALL

    return [slide_layer(open_slide(CMU_SMALL), HE, "he")]
