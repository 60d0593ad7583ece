"""Subcommands ``models`` and ``generate``: argparse stays here; the work is keyword calls into
:mod:`.batch` (slides and folders) and :mod:`.tiles` (single images). The model is loaded once
and a slide opened once per run."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..cli import add_json_flag
from ..errors import BCIError, InputError

#: Largest ``--tile``: the engine's windows and the OME-TIFF tile size stay within bounds the
#: writer and the models handle (a 16k x 16k RGB window is 768 MB).
MAX_TILE = 16384


def register(sub) -> None:
    """Add ``models`` and ``generate`` to the parser."""
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
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: mean of 7 flips/rotations (BCIStainer's; 7x the compute)")
    p.add_argument("--model-config", default=None, metavar="FILE",
                   help="options of a checkpoint: JSON, a BCIStainer training YAML or a CUT/pix2pix train_opt.txt")
    p.add_argument("--mpp", type=float, default=None, metavar="UM",
                   help="pixel size of PNG/JPEG input in micrometres (they carry none); warns when far from the model's")
    add_json_flag(p)
    _add_batch_arguments(p)
    p.set_defaults(func=run_generate)


def _add_batch_arguments(p: argparse.ArgumentParser) -> None:
    """Whole-slide and distributed options of ``napari-bci generate``."""
    g = p.add_argument_group("whole slides and cohorts")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="compute tiles on a local dask cluster of N worker processes (1 thread each)")
    g.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="join an existing dask scheduler (e.g. tcp://host:8786 from dask-jobqueue)")
    g.add_argument("--on-error", choices=("stop", "skip"), default="stop",
                   help="a slide tile or a folder's image that cannot be read: stop (default), or fill the "
                        "tile white / list the image under failed, and go on")
    g.add_argument("--level", type=int, default=None, help="generate at this pyramid level "
                   "(default: the level matching the model's magnification)")
    g.add_argument("--no-resume", dest="resume", action="store_false",
                   help="ignore tiles kept from an interrupted run (and outputs already in OUTDIR)")
    g.add_argument("--all-tiles", dest="tissue", action="store_false",
                   help="generate every tile, not only tissue (the default skips white background)")
    g.add_argument("--compression", default="jpeg", help="OME-TIFF tile compression: jpeg (default), "
                   "zlib, zstd, lzw, webp or none")
    g.add_argument("--quality", type=int, default=90, help="JPEG/WebP quality (default 90)")
    g.add_argument("--layout", choices=("subifd", "pages"), default="subifd",
                   help="subifd: OME-TIFF with SubIFD levels (QuPath, Bio-Formats, napari; default); "
                        "pages: levels as top-level pages (OpenSlide's generic-tiff sees every level)")
    g.add_argument("--keep-parts", action="store_true", help="keep the tile store OUT.parts after success")
    g.add_argument("--window", type=int, default=None, help="dask: most tasks in flight (default 4 per worker)")
    g.add_argument("--tiles-per-task", type=int, default=1, help="dask: tiles per task (default 1)")
    g.add_argument("--task-resources", type=_resources, default=None, metavar="NAME=N[,...]",
                   help="dask: resources each task needs, e.g. GPU=1 (workers started with --resources GPU=1)")


def _resources(text: str) -> dict:
    try:
        return {k.strip(): float(v) for k, v in (kv.split("=") for kv in text.split(",") if kv.strip())}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=N[,NAME=N], got {text!r}") from None


def run_models(args) -> dict:
    from ..models.checkpoints import families
    from ..models.registry import available

    return {"models": available(), "families": families()}


def _check_numbers(args) -> None:
    """Bad numeric options fail before any work, with one line each."""
    if args.tile is not None and not 16 <= args.tile <= MAX_TILE:
        raise InputError(None, f"--tile {args.tile}: must be between 16 and {MAX_TILE}")
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError(None, f"--batch-size {args.batch_size}: must be at least 1")
    for flag in ("workers", "window", "tiles_per_task"):
        v = getattr(args, flag, None)
        if v is not None and v < 1:
            raise InputError(None, f"--{flag.replace('_', '-')} {v}: must be at least 1")
    if args.level is not None and args.level < 0:
        raise InputError(None, f"--level {args.level}: must be 0 or more")
    if not 1 <= args.quality <= 100:
        raise InputError(None, f"--quality {args.quality}: must be between 1 and 100")
    if args.mpp is not None and not 0.01 <= args.mpp <= 100:
        raise InputError(None, f"--mpp {args.mpp}: must be between 0.01 and 100 micrometres per pixel")


def _slide_options(args) -> dict:
    """The keyword arguments of :func:`.batch.generate_slide` / ``generate_folder`` given on the
    command line."""
    c = args.compression
    return dict(device=None if args.device == "auto" else args.device, level=args.level, tile=args.tile,
                batch_size=args.batch_size, workers=args.workers, scheduler=args.scheduler,
                on_error=args.on_error, resume=args.resume, tissue=args.tissue,
                compression=None if c in (None, "none", "None", "") else c, quality=args.quality,
                keep_parts=args.keep_parts, window=args.window, tiles_per_task=args.tiles_per_task,
                layout=args.layout, resources=args.task_resources)


def _slide_out(src: Path, out: Path) -> Path:
    from .batch import OME_SUFFIXES

    if out.is_dir():
        return out / (src.name.split(".")[0] + ".ome.tif")
    if not out.name.lower().endswith(OME_SUFFIXES + (".tif", ".tiff")):
        raise InputError(out, "whole-slide output must be an OME-TIFF (name ending in .ome.tif)")
    return out


def run_generate(args) -> dict:
    from ..models.registry import default_generator_name, load_generator
    from . import batch

    src = Path(args.input)
    out = Path(args.out)
    if not src.exists():
        raise InputError(src, "no such file or folder")
    _check_numbers(args)
    files = None
    if src.is_dir():
        files = batch.folder_files(src)
        if not files:
            raise InputError(src, "folder holds no images (.png, .jpg, .tif)")
        if out.exists() and not out.is_dir():
            raise InputError(out, "output for a folder must be a folder")
    model = args.model or default_generator_name()
    distributed = bool(args.workers) or bool(args.scheduler)
    kwargs = {}
    if distributed and (args.tta or args.model_config):
        raise InputError(None, "--tta and --model-config do not reach --workers/--scheduler workers yet: "
                               "run without them, or put the config beside the checkpoint")
    if args.model_config:
        if not Path(model).expanduser().exists():
            raise InputError(args.model_config, f"--model-config applies to checkpoint files, not the registered model '{model}'")
        kwargs["config"] = args.model_config
    gen = load_generator(model, device="cpu" if distributed else args.device, **kwargs)
    if args.tta:
        from ..models.base import with_tta

        gen = with_tta(gen)
    try:
        if files is not None:
            warning = mpp_warning(gen, args.mpp, src)
            if warning:
                print(f"warning: {warning}", file=sys.stderr)
            opts = _slide_options(args)
            opts.pop("resources")
            rep = batch.generate_folder(files, model, out, generator=gen,
                                        warn=lambda m: print(f"warning: {m}", file=sys.stderr), **opts)
            return rep | ({"warning": warning} if warning else {})
        return _run_file(args, model, gen, src, out)
    except KeyboardInterrupt:
        kept = (f"finished outputs (and an unfinished slide's tiles) are kept in {out}" if files is not None
                else f"finished tiles are kept in {batch.parts_dir(out)}")
        err = BCIError(f"{out}: interrupted; {kept}, run the same command again to resume")
        err.exit_code = 130
        raise err from None


def _run_file(args, model, gen, src: Path, out: Path) -> dict:
    import numpy as np

    from ..io.provenance import record
    from ..io.slide import open_slide
    from ..io.writers import write_image_atomic
    from ..models.domain import check_generator_domain
    from . import batch
    from .tiles import generate_image

    with open_slide(src) as slide:
        domain = check_generator_domain(gen, slide.levels[0])
        if domain:
            print(f"warning: {src}: {domain}", file=sys.stderr)
        # a PNG/JPEG asked for by name is one image, however large (it is held in memory)
        as_image = slide.native_levels == 1 and out.suffix.lower() in (".png", ".jpg", ".jpeg")
        if (batch.is_pyramid(slide) and not as_image) or out.name.lower().endswith(batch.OME_SUFFIXES):
            return batch.generate_slide(slide, model, _slide_out(src, out), generator=gen,
                                        provenance=record(gen.name, src, domain), **_slide_options(args))
        if out.is_dir():
            out = out / (src.stem + ".png")
        if not out.parent.is_dir():
            raise InputError(out.parent, "output folder does not exist")
        image = np.asarray(slide.levels[0])
        mpp = slide.mpp
    mpp = args.mpp if args.mpp is not None else mpp
    warning = mpp_warning(gen, mpp, src)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    t0 = time.perf_counter()
    res, eng = generate_image(gen, image, tile=args.tile, batch_size=args.batch_size)
    write_image_atomic(out, res, quality=args.quality, provenance=record(gen.name, src, domain))
    dt = time.perf_counter() - t0
    result = {"n": 1, "out": str(out), "model": gen.name, "device": gen.device, "shape": list(res.shape[:2]),
              "mpp": mpp, "tiles": eng.computed, "seconds": round(dt, 3), "tta": bool(args.tta)}
    result.update(her2_level(eng, res, mpp))
    if result.get("her2_agree") is False:
        print(f"note: {result['her2_compare']}", file=sys.stderr)
    if warning:
        result["warning"] = warning
    if domain:
        result["out_of_domain"] = domain
    return result


def mpp_warning(gen, mpp: float | None, src) -> str | None:
    """A line when the input's pixel size is far (over 1.5x) from the model's training one."""
    want = getattr(gen, "mpp", None)
    if mpp is None or want is None or not mpp > 0:
        return None
    ratio = float(mpp) / float(want)
    if 1 / 1.5 <= ratio <= 1.5:
        return None
    return (f"{src}: input at {mpp:g} um/px but '{gen.name}' was trained at {want:g} um/px "
            f"({ratio:.2g}x): resample the image to the model's magnification for trustworthy output")


def her2_level(engine, output=None, mpp: float | None = None) -> dict:
    """The generator's own HER2 level (BCIStainer's head) on the central native window of the
    engine's image, and beside it the rule-based level of the generated ``output`` (when given)
    with whether the two agree; empty for generators without a level head."""
    from ..models.base import HER2_CLASSES

    probs = engine.predict_her2()
    if probs is None:
        return {}
    out = {"her2_level": HER2_CLASSES[int(probs.argmax())],
           "her2_probabilities": {c: round(float(p), 4) for c, p in zip(HER2_CLASSES, probs)}}
    if output is not None:
        from ..her2 import score
        from ..her2.learned import compare

        cmp = compare(score(output, mpp=mpp or 0.5), probs)
        out.update(her2_rule=cmp["rule_display"], her2_agree=cmp["agree"], her2_compare=cmp["text"])
    return out
