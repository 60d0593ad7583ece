"""Generator registry: built-ins, user registrations, third-party entry points, checkpoint files.

>>> from napari_bci.models.registry import available, load_generator
>>> [m["name"] for m in available()]          # doctest: +SKIP
['baseline', 'builtin', ...]
>>> gen = load_generator("baseline")           # or "builtin", a name, or a checkpoint path

Third-party packages add generators through the entry-point group ``napari_bci.generators``;
an entry point resolves to a :class:`~napari_bci.models.base.Generator` subclass or to a
factory ``f(device=None) -> Generator``. The entry point's name is the generator's name.

``builtin`` is the shipped HER2-level-aware model: ``models/weights/builtin.safetensors`` with
its config/model card ``builtin.json``, loaded by ``napari_bci.models.level_aware.load_builtin``
when that exists, else by the generic safetensors + JSON loader.
"""

from __future__ import annotations

import inspect
import json
import threading
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError, ModelError
from .base import Generator

ENTRY_POINT_GROUP = "napari_bci.generators"
WEIGHTS_DIR = Path(__file__).parent / "weights"
BUILTIN_WEIGHTS = WEIGHTS_DIR / "builtin.safetensors"
BUILTIN_CONFIG = WEIGHTS_DIR / "builtin.json"

_INFO_KEYS = ("tile", "halo", "mpp", "predicts_her2", "description")


@dataclass
class _Entry:
    name: str
    factory: Callable[..., Generator]
    info: dict = field(default_factory=dict)
    source: str = "registered"


_lock = threading.Lock()
_entries: dict[str, _Entry] = {}


def register(name: str, factory: Callable[..., Generator], *, replace: bool = False,
             source: str = "registered", **info: Any) -> None:
    """Register ``factory(device=None) -> Generator`` under ``name``.

    ``info`` (tile, halo, mpp, predicts_her2, description, ...) is what ``available()`` reports
    without building the generator.
    """
    with _lock:
        if name in _entries and not replace:
            raise ModelError(f"a generator named '{name}' is already registered")
        _entries[name] = _Entry(name, factory, dict(info), source)


def unregister(name: str) -> None:
    with _lock:
        _entries.pop(name, None)


def _call_factory(factory: Callable[..., Generator], device: str | None, **kwargs: Any) -> Generator:
    try:
        params = inspect.signature(factory).parameters
        accepts_device = "device" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):
        accepts_device = True
    gen = factory(device=device, **kwargs) if accepts_device else factory(**kwargs)
    if not isinstance(gen, Generator):
        raise ModelError(f"generator factory {factory!r} returned {type(gen).__name__}, not a Generator")
    if device is not None and not accepts_device:
        gen.to(device)
    return gen


# -- built-ins ----------------------------------------------------------------------------------
def _baseline_factory(device: str | None = None, **kwargs: Any) -> Generator:
    from .baseline import BaselineGenerator

    return BaselineGenerator(**kwargs)


def builtin_available() -> bool:
    return BUILTIN_WEIGHTS.is_file() and BUILTIN_CONFIG.is_file()


def _builtin_factory(device: str | None = None, **kwargs: Any) -> Generator:
    if not builtin_available():
        raise ModelError(
            f"the built-in model is not installed ({BUILTIN_WEIGHTS.name} and {BUILTIN_CONFIG.name} "
            f"missing in {WEIGHTS_DIR}); use --model baseline or a checkpoint file"
        )
    from .level_aware import load_builtin

    gen = load_builtin(device=device, **kwargs)
    if not isinstance(gen, Generator):
        raise ModelError(f"load_builtin returned {type(gen).__name__}, not a Generator")
    return gen


def _builtin_info() -> dict:
    if not builtin_available():
        return {"available": False, "error": f"weights not installed in {WEIGHTS_DIR}"}
    try:
        cfg = json.loads(BUILTIN_CONFIG.read_text())
    except (OSError, ValueError) as e:
        return {"available": False, "error": f"{BUILTIN_CONFIG}: unreadable config ({e})"}
    info = {k: cfg[k] for k in _INFO_KEYS if k in cfg}
    info.setdefault("description", "HER2-level-aware generator trained on synthetic tissue (demo default)")
    if "arch" in cfg:
        info["arch"] = cfg["arch"]
    return info


register("baseline", _baseline_factory, source="builtin", tile=512, halo=0, mpp=None,
         predicts_her2=False,
         description="classical stain-space mapping (hematoxylin kept, no DAB); weight-free floor")
register("builtin", _builtin_factory, source="builtin")


# -- entry points -------------------------------------------------------------------------------
def _entry_points() -> list[metadata.EntryPoint]:
    return list(metadata.entry_points(group=ENTRY_POINT_GROUP))


def _ep_factory(ep: metadata.EntryPoint) -> Callable[..., Generator]:
    def factory(device: str | None = None, **kwargs: Any) -> Generator:
        try:
            obj = ep.load()
        except Exception as e:  # a broken plugin must not break the others
            raise ModelError(f"generator plugin '{ep.name}' ({ep.value}) failed to import: {e}") from e
        return _call_factory(obj, device, **kwargs)

    return factory


def _ep_info(ep: metadata.EntryPoint) -> dict:
    dist = getattr(ep, "dist", None)
    info: dict = {"source": f"entry-point {dist.name if dist else ep.value}"}
    try:
        obj = ep.load()
    except Exception as e:
        info.update(available=False, error=f"failed to import {ep.value}: {e}")
        return info
    if inspect.isclass(obj) and issubclass(obj, Generator):
        info.update({k: getattr(obj, k) for k in _INFO_KEYS})
    else:
        info.update(getattr(obj, "info", None) or {})
    return info


def _all_entries() -> dict[str, _Entry]:
    with _lock:
        entries = dict(_entries)
    for ep in _entry_points():
        if ep.name not in entries:
            entries[ep.name] = _Entry(ep.name, _ep_factory(ep), {"_ep": ep}, "entry-point")
    return entries


# -- public API ---------------------------------------------------------------------------------
def available() -> list[dict]:
    """Info dicts for every known generator: name, tile, halo, mpp, predicts_her2, description,
    source, available (False with an ``error`` when it cannot be loaded here)."""
    out = []
    for name, e in _all_entries().items():
        if name == "builtin":
            info = _builtin_info()
        elif "_ep" in e.info:
            info = _ep_info(e.info["_ep"])
        else:
            info = dict(e.info)
        if not all(k in info for k in ("tile", "halo", "predicts_her2")) and info.get("available", True):
            try:  # ask the generator itself
                gen = _call_factory(e.factory, "cpu")
                info = {**gen.info(), **{k: v for k, v in info.items() if k not in _INFO_KEYS}}
            except Exception as ex:
                info.update(available=False, error=str(ex))
        row = {"name": name, "tile": info.get("tile"), "halo": info.get("halo"),
               "mpp": info.get("mpp"), "predicts_her2": bool(info.get("predicts_her2", False)),
               "description": info.get("description", ""), "source": info.get("source", e.source),
               "available": bool(info.get("available", True))}
        for k, v in info.items():
            row.setdefault(k, v)
        row.pop("_ep", None)
        out.append(row)
    return out


def names() -> list[str]:
    return list(_all_entries())


def default_generator_name() -> str:
    """``builtin`` when its weights are installed, else ``baseline``."""
    return "builtin" if builtin_available() else "baseline"


def load_generator(name_or_path: str | Path | Generator, device: str | None = None, **kwargs: Any) -> Generator:
    """A ready generator from a registered name, an entry-point name or a checkpoint path
    (pix2pix / CUT-family / BCIStainer ``.pth`` state dict or TorchScript, ``.safetensors``
    (+ ``.json``), a JSON config, or a folder holding ``latest_net_G.pth`` / ``model_best_psnr.pth``;
    ``config=`` a dict or a config file, see :func:`napari_bci.models.checkpoints.load_checkpoint`)."""
    if isinstance(name_or_path, Generator):
        return name_or_path.to(device) if device is not None else name_or_path
    key = str(name_or_path)
    entries = _all_entries()
    if key in entries and not Path(key).exists():
        return _call_factory(entries[key].factory, device, **kwargs)
    path = Path(key).expanduser()
    if path.exists():
        from .checkpoints import load_checkpoint

        return load_checkpoint(path, device=device, **kwargs)
    if path.suffix or "/" in key or "\\" in key:
        raise InputError(path, "no such checkpoint file")
    raise ModelError(f"unknown model '{key}'; known: {', '.join(sorted(entries))} (or give a checkpoint path)")
