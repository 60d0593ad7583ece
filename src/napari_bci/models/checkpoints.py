"""Load generator checkpoints safely.

Supported: pix2pix/PyramidPix2pix ``latest_net_G.pth`` state dicts (architecture inferred from
keys and shapes), TorchScript files, ``.safetensors`` with a JSON config (see
:mod:`napari_bci.models.base`), a JSON config naming its weights, and a folder holding one
of those. Pickles load only through ``torch.load(..., weights_only=True)``; anything that would
need code execution is refused with :class:`~napari_bci.errors.CheckpointSecurityError`.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

from ..errors import CheckpointSecurityError, InputError, ModelError
from .architectures import build, build_from_state_dict, load_state, receptive_radius, size_multiple
from .base import TorchGenerator

_NESTED = ("state_dict", "model", "netG", "G", "generator", "model_state_dict", "state")


def is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with readable errors."""
    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        culprit = next((ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln), "")
        raise CheckpointSecurityError(
            f"{path}: refused to load: the checkpoint is a pickle that needs code execution"
            f"{' (' + culprit.rstrip('.') + ')' if culprit else ''}; only plain state dicts load safely "
            f"(re-save with torch.save(model.state_dict()) or as safetensors)"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise InputError(path, "no such checkpoint file") from e
        raise InputError(path, f"not a readable PyTorch checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e


def _unwrap(obj: Any, path: Path) -> dict:
    import torch

    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        if isinstance(obj, dict):
            for k in _NESTED:
                if k in obj and isinstance(obj[k], dict):
                    obj = obj[k]
                    break
            else:
                break
    if not (isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise InputError(path, "checkpoint holds no generator state dict (expected name -> tensor)")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):  # saved from DataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _meta(config: dict, path: Path, overrides: dict) -> dict:
    kind_halo = receptive_radius(config) if config.get("arch") else 32
    meta = {
        "name": config.get("name") or (path.parent.name if path.stem.startswith("latest_net") else path.stem),
        "tile": int(config.get("tile", 256)),
        "halo": int(config.get("halo", min(kind_halo, 64))),
        "mpp": config.get("mpp"),
        "multiple": int(config.get("multiple", size_multiple(config) if config.get("arch") else 1)),
        "description": config.get("description", f"{config.get('arch', 'model')} from {path.name}"),
        # pix2pix ResNets/U-Nets have no HER2 head; other modules are probed once
        "predicts_her2": config.get("predicts_her2",
                                    False if str(config.get("arch", "")).startswith(("resnet_", "unet_")) else None),
    }
    meta.update({k: v for k, v in overrides.items() if v is not None})
    return meta


def _wrap(module, config: dict, path: Path, device: str | None, overrides: dict) -> TorchGenerator:
    return TorchGenerator(module, device=device, config=config, source=str(path), **_meta(config, path, overrides))


def _read_json(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(path, f"unreadable model config ({e})") from e
    if not isinstance(cfg, dict):
        raise InputError(path, "model config must be a JSON object")
    return cfg


def load_safetensors(path: Path, config: dict | None = None):
    """(state dict, config) from ``X.safetensors`` and ``X.json`` (or header metadata)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        sd = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(path, f"not a readable safetensors file ({e})") from e
    if config is None:
        side = path.with_suffix(".json")
        if side.is_file():
            config = _read_json(side)
        elif "config" in header:
            config = json.loads(header["config"])
    return sd, config


def load_checkpoint(path: str | Path, device: str | None = None, *, name: str | None = None,
                    tile: int | None = None, halo: int | None = None, mpp: float | None = None,
                    config: dict | None = None) -> TorchGenerator:
    """A :class:`TorchGenerator` from a checkpoint file or folder (see module docstring)."""
    import torch

    path = Path(path).expanduser()
    overrides = {"name": name, "tile": tile, "halo": halo, "mpp": mpp}
    if not path.exists():
        raise InputError(path, "no such checkpoint file")
    if path.is_dir():
        for cand in ("latest_net_G.pth", "latest_net_G.pt", "model.safetensors", "model.json"):
            if (path / cand).is_file():
                return load_checkpoint(path / cand, device, name=name, tile=tile, halo=halo,
                                       mpp=mpp, config=config)
        found = sorted(path.glob("*.safetensors")) + sorted(path.glob("*net_G*.pth"))
        if not found:
            raise InputError(path, "folder holds no latest_net_G.pth or *.safetensors checkpoint")
        return load_checkpoint(found[0], device, name=name, tile=tile, halo=halo, mpp=mpp, config=config)

    suffix = path.suffix.lower()
    if suffix == ".json":
        cfg = _read_json(path)
        weights = cfg.get("weights") or path.with_suffix(".safetensors").name
        wpath = (path.parent / weights).resolve()
        if not wpath.is_file():
            raise InputError(path, f"weights file '{weights}' named by the config does not exist")
        return load_checkpoint(wpath, device, name=name, tile=tile, halo=halo, mpp=mpp, config=cfg)

    if suffix == ".safetensors":
        sd, cfg = load_safetensors(path, config)
        if cfg is None:
            module, cfg = build_from_state_dict(sd)
        else:
            module = build(cfg)
            load_state(module, sd, cfg)
        return _wrap(module, cfg, path, device, overrides)

    if is_torchscript(path):
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as e:
            raise InputError(path, f"unreadable TorchScript file ({str(e).splitlines()[0]})") from e
        cfg = dict(config or {})
        side = path.with_suffix(".json")
        if not cfg and side.is_file():
            cfg = _read_json(side)
        return _wrap(module, cfg, path, device, overrides)

    sd = _unwrap(safe_torch_load(path), path)
    cfg = config
    if cfg is None and path.with_suffix(".json").is_file():
        cfg = _read_json(path.with_suffix(".json"))
    if cfg is not None and "arch" not in cfg:
        cfg = {**cfg, **_infer_or_raise(sd, path)}
    try:
        module, cfg = build_from_state_dict(sd, cfg)
    except ModelError as e:
        raise ModelError(f"{path}: {e}") from e
    return _wrap(module, cfg, path, device, overrides)


def _infer_or_raise(sd: dict, path: Path) -> dict:
    from .architectures import infer_config

    try:
        return infer_config(sd)
    except ModelError as e:
        raise ModelError(f"{path}: {e}") from e
