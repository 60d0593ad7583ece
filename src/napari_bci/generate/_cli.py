"""Subcommands ``models`` and ``generate``.

``generate`` hands whole slides (multi-level inputs, or ``--out`` ending in ``.ome.tif(f)``) to
``batch.run_slide``, and folders to ``batch.run_folder`` when ``batch.folder_request`` says the
folder needs it (BCI roots, slides, dask options); plain folders of patches run here.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from ..cli import add_json_flag
from ..errors import InputError

OME_SUFFIXES = (".ome.tif", ".ome.tiff")


def register(sub) -> None:
    """Add ``models`` and ``generate`` to the parser."""
    from . import batch

    p = sub.add_parser("models", help="list the available generators")
    add_json_flag(p)
    p.set_defaults(func=run_models)

    p = sub.add_parser("generate", help="virtual IHC for an image, a folder of images or a slide")
    p.add_argument("input", metavar="INPUT", help="an image, a folder of images, or a slide")
    p.add_argument("--model", default=None,
                   help="generator name (see `napari-bci models`) or checkpoint path; "
                        "default: builtin if installed, else baseline")
    p.add_argument("--out", required=True, help="output file (image) or folder (folder input)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--tile", type=int, default=None, help="tile size in pixels (default: the model's)")
    p.add_argument("--batch-size", type=int, default=None, help="tiles per forward pass")
    add_json_flag(p)
    batch.add_arguments(p)
    p.set_defaults(func=run_generate)


def run_models(args) -> dict:
    from ..models.registry import available

    return {"models": available()}


def _write_image_atomic(path: Path, arr) -> None:
    import imagecodecs
    import numpy as np

    suffix = path.suffix.lower()
    if suffix == ".png":
        data = imagecodecs.png_encode(np.ascontiguousarray(arr))
    elif suffix in (".jpg", ".jpeg"):
        data = imagecodecs.jpeg8_encode(np.ascontiguousarray(arr), level=95)
    elif suffix in (".tif", ".tiff"):
        import io

        import tifffile

        buf = io.BytesIO()
        tifffile.imwrite(buf, arr, photometric="rgb", compression="zlib")
        data = buf.getvalue()
    else:
        raise InputError(path, "unsupported output type (use .png, .jpg, .tif, or .ome.tif for slides)")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def generate_image(generator, image, *, tile=None, batch_size=None, cancel=None, progress=None):
    """Whole-image virtual IHC of an in-memory ``(H, W, 3)`` image through the tile engine."""
    from .cache import TileCache
    from .engine import TileEngine

    eng = TileEngine(generator, image, tile=tile, batch_size=batch_size, cache=TileCache(64 * 2**20))
    return eng.compute_all(cancel=cancel, progress=progress), eng


def _is_ome_out(out: str) -> bool:
    return out.lower().endswith(OME_SUFFIXES)


def run_generate(args) -> dict:
    from ..io.patches import IMAGE_SUFFIXES
    from ..models.registry import default_generator_name, load_generator

    src = Path(args.input)
    out = Path(args.out)
    if not src.exists():
        raise InputError(src, "no such file or folder")
    if args.tile is not None and args.tile < 16:
        raise InputError(None, f"--tile {args.tile}: must be at least 16")
    if src.is_dir():
        from . import batch  # BCI roots, folders of slides, dask options: batch.run_folder

        requested = batch.folder_request(args, src)
        if requested:
            args._batch_requested = True
        files = requested or sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                                    and not p.name.startswith("."))
        if not files:
            raise InputError(src, "folder holds no images (.png, .jpg, .tif)")
        if out.exists() and not out.is_dir():
            raise InputError(out, "output for a folder must be a folder")
    model = args.model or default_generator_name()
    gen = load_generator(model, device=args.device)
    if src.is_dir():
        return _run_folder(args, gen, files, out)
    return _run_file(args, gen, src, out)


def _run_file(args, gen, src: Path, out: Path) -> dict:
    from ..io.slide import open_slide

    with open_slide(src) as slide:
        is_slide = slide.native_levels > 1 or _is_ome_out(str(out))
        if is_slide:
            from . import batch

            return batch.run_slide(args, gen)
        image = slide.levels[0]
        mpp = slide.mpp
    if out.is_dir():
        out = out / (src.stem + ".png")
    if not out.parent.is_dir():
        raise InputError(out.parent, "output folder does not exist")
    import numpy as np

    t0 = time.perf_counter()
    res, eng = generate_image(gen, np.asarray(image), tile=args.tile, batch_size=args.batch_size)
    _write_image_atomic(out, res)
    dt = time.perf_counter() - t0
    return {"n": 1, "out": str(out), "model": gen.name, "device": gen.device, "shape": list(res.shape[:2]),
            "mpp": mpp, "tiles": eng.computed, "seconds": round(dt, 3)}


def _run_folder(args, gen, files: list[Path], out: Path) -> dict:
    import numpy as np
    from tqdm import tqdm

    from ..io.patches import read_patch

    if getattr(args, "_batch_requested", False):
        from . import batch

        return batch.run_folder(args, gen, files)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tiles = 0
    written, failed = [], []
    for f in tqdm(files, desc="generate", unit="image", file=sys.stderr, disable=not sys.stderr.isatty()):
        try:
            img = read_patch(f)
        except InputError as e:
            failed.append({"file": str(f), "error": str(e)})
            continue
        res, eng = generate_image(gen, np.asarray(img), tile=args.tile, batch_size=args.batch_size)
        tiles += eng.computed
        dst = out / (f.stem + ".png")
        _write_image_atomic(dst, res)
        written.append(dst.name)
    dt = time.perf_counter() - t0
    if failed and not written:
        raise InputError(files[0].parent, f"no image could be read ({failed[0]['error']})")
    return {"n": len(written), "out": str(out), "model": gen.name, "device": gen.device, "tiles": tiles,
            "seconds": round(dt, 3), "images_per_s": round(len(written) / dt, 3) if dt else None,
            "failed": failed}
