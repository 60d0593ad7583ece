"""Load generator checkpoints safely, whatever published family they come from.

Families (:data:`FAMILIES`), told apart by the file's keys, its config and the options beside it:

* ``pix2pix``: pix2pix/PyramidPix2pix ``latest_net_G.pth`` (ResNet or U-Net, see
  :mod:`napari_bci.models.architectures`);
* ``cut``: CUT / FastCUT / CPT / ASP / PSPStain ``latest_net_G.pth`` (antialiased ``filt``
  buffers, spectral-norm ``weight_orig``; :mod:`napari_bci.models.cut`);
* ``bcistainer``: BCIStainer ``model_best_psnr.pth``, an ``ema_pytorch.EMA`` state dict whose
  ``ema_model.*`` weights run (:mod:`napari_bci.models.bcistainer`).

Options come, first found wins, from ``config``/``--model-config FILE`` (our JSON, an upstream
BCIStainer YAML or a CUT/pix2pix ``train_opt.txt``), ``X.json`` beside ``X.pth``,
``train_opt.txt`` or a single ``*.yaml`` in the checkpoint's folder, else from the keys and
shapes. Also TorchScript files, ``.safetensors`` with a JSON config, a JSON config naming its
weights, and a folder holding one of those.

Safety: pickles load only through ``torch.load(..., weights_only=True)`` (anything needing code
execution raises :class:`~napari_bci.errors.CheckpointSecurityError`); tensors that view less
storage than they claim (stride 0) are refused, and the model a config describes is counted on
the meta device and refused above :data:`MAX_PARAMETERS` before anything is allocated.
"""

from __future__ import annotations

import json
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

from ..errors import CheckpointSecurityError, InputError, ModelError
from .architectures import build, infer_config as infer_pix2pix, load_state, receptive_radius, size_multiple
from .base import TorchGenerator

_NESTED = ("state_dict", "model", "netG", "G", "generator", "model_state_dict", "state")

#: largest model (parameters + buffers, elements) a checkpoint may describe: 4x BCIStainer CAHR
MAX_PARAMETERS = 250_000_000

#: loadable architecture families and what each needs (``napari-bci models --json``)
FAMILIES = {
    "pix2pix": {
        "archs": ["resnet_9blocks", "resnet_6blocks", "unet_256", "unet_128"],
        "files": "latest_net_G.pth (pytorch-CycleGAN-and-pix2pix / PyramidPix2pix), .safetensors + .json",
        "needs": "nothing: options are read from the keys (train_opt.txt beside it is used when present)",
        "window": None, "mpp": 0.5,
    },
    "cut": {
        "archs": ["resnet_4blocks", "resnet_6blocks", "resnet_9blocks"],
        "files": "latest_net_G.pth (CUT, FastCUT, CPT, ASP, PSPStain)",
        "needs": "nothing: options are read from the keys (train_opt.txt beside it is used when present)",
        "window": 1024, "mpp": 0.5,
    },
    "bcistainer": {
        "archs": ["basic", "cahr"],
        "files": "model_best_psnr.pth (BCIStainer, ema_pytorch.EMA state dict)",
        "needs": "the training YAML (e.g. configs/stainer_basic_cmp/exp3.yaml) beside it or as "
                 "--model-config: SimAM attention leaves no trace in the weights",
        "window": 1024, "mpp": 0.5,
    },
}

#: BCI and MIST patches: 20x, about 0.5 um/px (MIST: 0.4661)
BCI_MPP = 0.5


# -- reading --------------------------------------------------------------------------------------------
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
        with warnings.catch_warnings():  # torch warns about legacy pickles before refusing them
            warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        culprit = next((ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln), "")
        raise CheckpointSecurityError(
            f"{path}: refused to load: the checkpoint is a pickle that needs code execution"
            f"{' (' + culprit.rstrip('.') + ')' if culprit else ''}; only plain state dicts load safely "
            f"(re-save with torch.save(model.state_dict()) or as safetensors)"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError,
            TypeError, AttributeError) as e:
        if isinstance(e, FileNotFoundError):
            raise InputError(path, "no such checkpoint file") from e
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(path, f"not a readable PyTorch checkpoint ({first})") from e


def _is_sd(obj: Any) -> bool:
    import torch

    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj: Any, path: Path) -> tuple[dict, bool]:
    """(state dict, whether it was an EMA wrapper's ``ema_model.*`` weights)."""
    from .bcistainer import unwrap_ema

    for _ in range(3):
        if _is_sd(obj):
            break
        if isinstance(obj, dict):
            for k in _NESTED:
                if k in obj and isinstance(obj[k], dict):
                    obj = obj[k]
                    break
            else:
                break
    if not _is_sd(obj):
        raise InputError(path, "checkpoint holds no generator state dict (expected name -> tensor)")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):  # saved from DataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    sd, ema = unwrap_ema(sd)
    if not sd:
        raise InputError(path, "EMA checkpoint holds no ema_model weights")
    return sd, ema


def check_tensors(sd: dict, path: Path, limit: int = MAX_PARAMETERS) -> None:
    """Refuse tensors that claim more elements than their storage holds (stride-0 or overlapping
    views: a tiny file posing as a huge model) and state dicts above ``limit`` elements."""
    total = 0
    for k, t in sd.items():
        n = t.numel()
        total += n
        if n > 1 and t.untyped_storage().nbytes() < n * t.element_size():
            raise InputError(path, f"tensor '{k}' of shape {tuple(t.shape)} views only "
                                   f"{t.untyped_storage().nbytes()} bytes (stride {tuple(t.stride())}): not a saved model")
    if total > limit:
        raise InputError(path, f"state dict holds {total:,} values, above the {limit:,} a generator may have")


def check_size(config: dict, path: Path, limit: int = MAX_PARAMETERS) -> int:
    """Parameters + buffers of the model ``config`` describes, counted on the meta device (nothing
    allocated); raises InputError above ``limit``."""
    import torch

    try:
        with torch.device("meta"):
            module = build(config)
    except (RuntimeError, ValueError, TypeError, OverflowError, MemoryError) as e:
        raise InputError(path, f"model config cannot be built ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    n = sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())
    if n > limit:
        opts = ", ".join(f"{k}={config[k]}" for k in ("arch", "ngf", "init_channels", "n_blocks", "num_downs",
                                                     "style_blocks", "full_size") if k in config)
        raise InputError(path, f"model config describes {n:,} parameters ({opts}), above the limit of "
                               f"{limit:,}: refused before allocating")
    return n


def _read_json(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(path, f"unreadable model config ({e})") from e
    if not isinstance(cfg, dict):
        raise InputError(path, "model config must be a JSON object")
    return cfg


def read_config_file(path: str | Path) -> dict:
    """A model config from JSON (ours), an upstream BCIStainer YAML, or a CUT/pix2pix
    ``train_opt.txt``; the result carries ``family`` when the file tells it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(path, "no such model config file")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _read_json(path)
    if suffix in (".yaml", ".yml"):
        import yaml

        from .bcistainer import from_upstream_yaml

        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise InputError(path, f"unreadable YAML config ({str(e).splitlines()[0]})") from e
        if not isinstance(raw, dict) or "G" not in raw:
            raise InputError(path, "YAML config has no 'G' section (expected a BCIStainer training config)")
        try:
            return {"family": "bcistainer", **from_upstream_yaml(raw)}
        except ModelError as e:
            raise InputError(path, str(e)) from e
    if suffix == ".txt":
        from .cut import read_train_opt

        try:
            opt = read_train_opt(path)
        except OSError as e:
            raise InputError(path, f"unreadable options file ({e})") from e
        if "netG" not in opt:
            raise InputError(path, "options file names no netG (expected a CUT/pix2pix train_opt.txt)")
        return {"train_opt": opt}
    raise InputError(path, "model config must be .json, .yaml (BCIStainer) or train_opt.txt (CUT/pix2pix)")


def _side_config(path: Path) -> dict | None:
    side = path.with_suffix(".json")
    if side.is_file():
        return _read_json(side)
    opt = path.parent / "train_opt.txt"
    if opt.is_file():
        return read_config_file(opt)
    yamls = sorted(path.parent.glob("*.yaml")) + sorted(path.parent.glob("*.yml"))
    if len(yamls) == 1:
        return read_config_file(yamls[0])
    return None


# -- families -------------------------------------------------------------------------------------------
def family_of(sd: dict, ema: bool = False) -> str:
    """``bcistainer``, ``cut`` or ``pix2pix`` from a state dict's keys."""
    from .cut import is_cut_layout

    if ema or ("inconv.conv.1.weight" in sd and any(k.startswith("decoder1.") for k in sd)):
        return "bcistainer"
    if is_cut_layout(sd):
        return "cut"
    return "pix2pix"


def _opt_config(opt: dict, family: str, path: Path) -> dict:
    from .cut import config_from_opt

    arch = str(opt.get("netG", ""))
    if family == "cut" or (str(opt.get("model", "")).lower() in ("cut", "cpt", "fastcut", "sincut") and arch.startswith("resnet")):
        try:
            return {"family": "cut", **config_from_opt(opt)}
        except ModelError as e:
            raise InputError(path, str(e)) from e
    cfg = {"family": "pix2pix", "arch": arch, "ngf": int(opt.get("ngf", 64)),
           "norm": str(opt.get("norm", opt.get("normG", "batch"))),
           "use_dropout": not bool(opt.get("no_dropout", False)),
           "input_nc": int(opt.get("input_nc", 3)), "output_nc": int(opt.get("output_nc", 3))}
    return cfg


def resolve_config(sd: dict, path: Path, config: dict | None, ema: bool = False) -> dict:
    """The full config (with ``family`` and ``arch``) for state dict ``sd`` read from ``path``."""
    from . import bcistainer, cut

    given = dict(config) if config is not None else (_side_config(path) or {})
    family = family_of(sd, ema)
    if "train_opt" in given:
        given = {**_opt_config(given.pop("train_opt"), family, path), **given}
    if given.get("family") == "cut" and family == "pix2pix":
        family = "cut"  # CUT with strided convs both ways and no spectral norm: pix2pix's layout
    if given.get("family") and given["family"] != family:
        raise ModelError(f"{path}: the weights are a {family} generator but the config describes "
                         f"a {given['family']} one")
    if family == "bcistainer":
        inferred = _infer(bcistainer.infer_config, sd, path)
        cfg = {**{k: v for k, v in inferred.items() if v is not None}, **given}
        unknown = [k for k in ("attention", "norm_type") if cfg.get(k) is None]
        if unknown:
            raise ModelError(
                f"{path}: BCIStainer checkpoint: {' and '.join(unknown)} cannot be read from the weights "
                f"(SimAM is parameter-free); give its training YAML with --model-config "
                f"(the released model: configs/stainer_basic_cmp/exp3.yaml) or a JSON like "
                f'{{"attention": true, "norm_type": "batch"}}')
        cfg["arch"] = f"bcistainer_{cfg.get('name', inferred['name'])}"
    elif family == "cut":
        inferred = _infer(cut.infer_config, sd, path)
        cfg = {**inferred, **given}
        if not str(cfg.get("arch", "")).startswith("cut_"):
            cfg["arch"] = f"cut_{cfg['arch']}"
    else:
        cfg = given if "arch" in given else {**given, **_infer(infer_pix2pix, sd, path)}
    cfg["family"] = family
    return cfg


def _infer(fn, sd: dict, path: Path) -> dict:
    try:
        return fn(sd)
    except ModelError as e:
        raise ModelError(f"{path}: {e}") from e


def _hint_infer(family: str):
    from . import bcistainer, cut

    return {"bcistainer": bcistainer.infer_config, "cut": cut.infer_config}.get(family, infer_pix2pix)


def build_and_load(sd: dict, cfg: dict, path: Path):
    """Count, build and strictly load; a mismatch is one ModelError line naming the family."""
    check_size(cfg, path)
    family = cfg.get("family", "pix2pix")
    module = build(cfg)
    try:
        load_state(module, sd, cfg, infer=_hint_infer(family))
    except ModelError as e:
        raise ModelError(f"{path}: {family} {e}") from e
    return module


# -- generator metadata ------------------------------------------------------------------------------
def _meta(config: dict, path: Path, overrides: dict) -> dict:
    family = config.get("family")
    arch = str(config.get("arch", ""))
    default_name = path.parent.name if path.stem.startswith(("latest_net", "model_best")) else path.stem
    meta: dict = {"name": config.get("name") if family != "bcistainer" else None}
    if family == "bcistainer":
        window = int(config.get("full_size", 1024))
        n1 = int(config.get("encoder1_blocks", 3))
        mult = max(2**n1, int(config.get("crop_size", 512)) // 2) if arch == "bcistainer_cahr" else 2**n1
        meta.update(tile=window, halo=0, window=window, window_dependent=True, multiple=mult,
                    predicts_her2=True, mpp=BCI_MPP,
                    description=f"BCIStainer {config.get('name', 'basic')} (style {config.get('style_type')}, "
                                f"SimAM {'on' if config.get('attention') else 'off'}) from {path.name}")
    elif family == "cut":
        from .cut import receptive_radius as cut_radius

        dependent = config.get("norm", "instance") == "instance"
        window = int(config.get("window", 1024))
        meta.update(tile=window if dependent else 512, halo=0 if dependent else min(cut_radius(config), 128),
                    window=window, window_dependent=dependent, multiple=2 ** int(config.get("n_downsampling", 2)),
                    predicts_her2=False, mpp=BCI_MPP,
                    description=f"CUT-family {arch[4:]} ({config.get('norm')} norm"
                                f"{', spectral norm' if config.get('weight_norm') == 'spectral' else ''}) from {path.name}")
    else:
        kind_halo = receptive_radius(config) if arch else 32
        meta.update(tile=256, halo=min(kind_halo, 64),
                    multiple=size_multiple(config) if arch else 1,
                    window_dependent=config.get("norm") == "instance",
                    description=f"{arch or 'model'} from {path.name}",
                    # pix2pix ResNets/U-Nets have no HER2 head; other modules are probed once
                    predicts_her2=False if arch.startswith(("resnet_", "unet_")) else None)
    for k in ("tile", "halo", "mpp", "multiple", "description", "predicts_her2", "window", "window_dependent"):
        if k in config and not (family == "bcistainer" and k == "predicts_her2"):
            meta[k] = config[k]
    meta["name"] = meta.get("name") or default_name
    meta["quantize"] = config.get("quantize", "truncate" if family in FAMILIES else "round")
    meta["family"] = family
    meta.update({k: v for k, v in overrides.items() if v is not None})
    return meta


def _wrap(module, config: dict, path: Path, device: str | None, overrides: dict) -> TorchGenerator:
    return TorchGenerator(module, device=device, config=config, source=str(path), **_meta(config, path, overrides))


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
            try:
                config = json.loads(header["config"])
            except ValueError as e:
                raise InputError(path, f"unreadable config in the safetensors header ({e})") from e
            if not isinstance(config, dict):
                raise InputError(path, "config in the safetensors header must be a JSON object")
    return sd, config


def load_checkpoint(path: str | Path, device: str | None = None, *, name: str | None = None,
                    tile: int | None = None, halo: int | None = None, mpp: float | None = None,
                    config: dict | str | Path | None = None) -> TorchGenerator:
    """A :class:`TorchGenerator` from a checkpoint file or folder (see module docstring);
    ``config`` is a dict or a config file (JSON, BCIStainer YAML, ``train_opt.txt``)."""
    import torch

    path = Path(path).expanduser()
    if isinstance(config, (str, Path)):
        config = read_config_file(config)
    overrides = {"name": name, "tile": tile, "halo": halo, "mpp": mpp}
    kw = dict(name=name, tile=tile, halo=halo, mpp=mpp, config=config)
    if not path.exists():
        raise InputError(path, "no such checkpoint file")
    if path.is_dir():
        for cand in ("latest_net_G.pth", "latest_net_G.pt", "model_best_psnr.pth", "model.safetensors", "model.json"):
            if (path / cand).is_file():
                return load_checkpoint(path / cand, device, **kw)
        found = sorted(path.glob("*.safetensors")) + sorted(path.glob("*net_G*.pth")) + sorted(path.glob("model_best_*.pth"))
        if not found:
            raise InputError(path, "folder holds no latest_net_G.pth, model_best_psnr.pth or *.safetensors checkpoint")
        return load_checkpoint(found[0], device, **kw)

    suffix = path.suffix.lower()
    if suffix == ".json":
        cfg = _read_json(path)
        weights = cfg.get("weights") or path.with_suffix(".safetensors").name
        wpath = (path.parent / str(weights)).resolve()
        if not wpath.is_file():
            raise InputError(path, f"weights file '{weights}' named by the config does not exist")
        return load_checkpoint(wpath, device, **{**kw, "config": config or cfg})

    if suffix == ".safetensors":
        sd, cfg = load_safetensors(path, config)
        sd, ema = _unwrap(sd, path)
        check_tensors(sd, path)
        if cfg is not None and "arch" in cfg and cfg.get("family") is None and not str(cfg["arch"]).startswith(("cut_", "bcistainer_")):
            check_size(cfg, path)  # our own archs (level_aware, pix2pix with a JSON): strict as given
            module = build(cfg)
            load_state(module, sd, cfg)
        else:
            cfg = resolve_config(sd, path, cfg if cfg is not None else {}, ema)
            module = build_and_load(sd, cfg, path)
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

    sd, ema = _unwrap(safe_torch_load(path), path)
    check_tensors(sd, path)
    cfg = resolve_config(sd, path, config, ema)
    return _wrap(build_and_load(sd, cfg, path), cfg, path, device, overrides)


def families() -> dict:
    """:data:`FAMILIES` (JSON-able copy)."""
    return json.loads(json.dumps(FAMILIES))
