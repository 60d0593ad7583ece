"""pix2pix / PyramidPix2pix generator architectures with the reference state-dict layout.

The module trees (and therefore the ``state_dict`` key names, e.g. ``model.1.weight``,
``model.10.conv_block.5.weight``, ``model.model.1.model.3.model.2.running_mean``) are those
of ``models/networks.py`` in pytorch-CycleGAN-and-pix2pix, which the BCI PyramidPix2pix code
reuses, so users' ``latest_net_G.pth`` files load as they are. Implemented independently here
with only the options that change the weights: ``ngf``, ``norm`` (batch / instance / none),
``use_dropout``, number of residual blocks / U-Net depth, padding type.

:func:`infer_config` reads those options back from a state dict's keys and shapes;
:func:`build_from_state_dict` builds and loads strictly, and explains a mismatch.
"""

from __future__ import annotations

import re
from typing import Callable

from ..errors import ModelError

ARCH_DEFAULTS = {
    "resnet_9blocks": {"kind": "resnet", "n_blocks": 9},
    "resnet_6blocks": {"kind": "resnet", "n_blocks": 6},
    "unet_256": {"kind": "unet", "num_downs": 8},
    "unet_128": {"kind": "unet", "num_downs": 7},
}

_custom_archs: dict[str, Callable[[dict], object]] = {}


def register_arch(name: str, builder: Callable[[dict], object]) -> None:
    """Make ``{"arch": name}`` configs buildable: ``builder(config) -> torch.nn.Module``."""
    _custom_archs[name] = builder


def _nn():
    import torch.nn as nn

    return nn


def norm_factory(norm: str, *, family: str = "", option: str = "norm"):
    """``(factory(channels) -> module, conv bias)`` for the pix2pix/CUT ``norm`` option (the
    convolutions before an affine-free instance norm keep their bias, as upstream)."""
    nn = _nn()
    if norm == "batch":
        return (lambda c: nn.BatchNorm2d(c, affine=True, track_running_stats=True)), False
    if norm == "instance":
        return (lambda c: nn.InstanceNorm2d(c, affine=False, track_running_stats=False)), True
    if norm == "none":
        return (lambda c: nn.Identity()), False
    raise ModelError(f"{family}unknown {option} '{norm}' (batch, instance or none)")


def pad_layers(padding_type: str, *, family: str = ""):
    """``(padding modules, conv padding)`` of a 3x3 convolution for a pix2pix/CUT ``padding_type``."""
    nn = _nn()
    if padding_type == "reflect":
        return [nn.ReflectionPad2d(1)], 0
    if padding_type == "replicate":
        return [nn.ReplicationPad2d(1)], 0
    if padding_type == "zero":
        return [], 1
    raise ModelError(f"{family}unknown padding type '{padding_type}'")


def _resnet_block(dim: int, norm_layer, use_bias: bool, use_dropout: bool, padding_type: str):
    nn = _nn()

    class ResnetBlock(nn.Module):
        def __init__(self):
            super().__init__()
            layers = []
            pad, p = pad_layers(padding_type)
            layers += pad + [nn.Conv2d(dim, dim, 3, padding=p, bias=use_bias), norm_layer(dim), nn.ReLU(True)]
            if use_dropout:
                layers.append(nn.Dropout(0.5))
            pad, p = pad_layers(padding_type)
            layers += pad + [nn.Conv2d(dim, dim, 3, padding=p, bias=use_bias), norm_layer(dim)]
            self.conv_block = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv_block(x)

    return ResnetBlock()


def resnet_generator(input_nc=3, output_nc=3, ngf=64, norm="batch", use_dropout=False, n_blocks=9,
                     padding_type="reflect"):
    """ResNet generator (Johnson et al.): 7x7 conv, 2 stride-2 downsamplings, ``n_blocks``
    residual blocks, 2 transposed-conv upsamplings, 7x7 conv, tanh."""
    nn = _nn()
    norm_layer, use_bias = norm_factory(norm)

    class ResnetGenerator(nn.Module):
        def __init__(self):
            super().__init__()
            m = [nn.ReflectionPad2d(3), nn.Conv2d(input_nc, ngf, 7, padding=0, bias=use_bias),
                 norm_layer(ngf), nn.ReLU(True)]
            for i in range(2):
                mult = 2**i
                m += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=use_bias),
                      norm_layer(ngf * mult * 2), nn.ReLU(True)]
            for _ in range(n_blocks):
                m.append(_resnet_block(ngf * 4, norm_layer, use_bias, use_dropout, padding_type))
            for i in range(2):
                mult = 2 ** (2 - i)
                m += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1,
                                         output_padding=1, bias=use_bias),
                      norm_layer(ngf * mult // 2), nn.ReLU(True)]
            m += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7, padding=0), nn.Tanh()]
            self.model = nn.Sequential(*m)

        def forward(self, x):
            return self.model(x)

    return ResnetGenerator()


def unet_generator(input_nc=3, output_nc=3, num_downs=8, ngf=64, norm="batch", use_dropout=False):
    """U-Net generator built from nested skip-connection blocks, innermost first
    (input size must be a multiple of ``2**num_downs``)."""
    nn = _nn()
    import torch

    norm_layer, use_bias = norm_factory(norm)
    if num_downs < 5:
        raise ModelError(f"unet needs at least 5 downsamplings, got {num_downs}")

    class UnetSkipConnectionBlock(nn.Module):
        def __init__(self, outer_nc, inner_nc, input_nc=None, submodule=None, outermost=False,
                     innermost=False, use_dropout=False):
            super().__init__()
            self.outermost = outermost
            input_nc = outer_nc if input_nc is None else input_nc
            downconv = nn.Conv2d(input_nc, inner_nc, 4, stride=2, padding=1, bias=use_bias)
            if outermost:
                up = nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, stride=2, padding=1)
                layers = [downconv, submodule, nn.ReLU(True), up, nn.Tanh()]
            elif innermost:
                up = nn.ConvTranspose2d(inner_nc, outer_nc, 4, stride=2, padding=1, bias=use_bias)
                layers = [nn.LeakyReLU(0.2, True), downconv, nn.ReLU(True), up, norm_layer(outer_nc)]
            else:
                up = nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, stride=2, padding=1, bias=use_bias)
                layers = [nn.LeakyReLU(0.2, True), downconv, norm_layer(inner_nc), submodule,
                          nn.ReLU(True), up, norm_layer(outer_nc)]
                if use_dropout:
                    layers.append(nn.Dropout(0.5))
            self.model = nn.Sequential(*layers)

        def forward(self, x):
            if self.outermost:
                return self.model(x)
            return torch.cat([x, self.model(x)], 1)

    class UnetGenerator(nn.Module):
        def __init__(self):
            super().__init__()
            block = UnetSkipConnectionBlock(ngf * 8, ngf * 8, innermost=True)
            for _ in range(num_downs - 5):
                block = UnetSkipConnectionBlock(ngf * 8, ngf * 8, submodule=block, use_dropout=use_dropout)
            block = UnetSkipConnectionBlock(ngf * 4, ngf * 8, submodule=block)
            block = UnetSkipConnectionBlock(ngf * 2, ngf * 4, submodule=block)
            block = UnetSkipConnectionBlock(ngf, ngf * 2, submodule=block)
            self.model = UnetSkipConnectionBlock(output_nc, ngf, input_nc=input_nc, submodule=block,
                                                 outermost=True)

        def forward(self, x):
            return self.model(x)

    return UnetGenerator()


def arch_names() -> list[str]:
    return list(ARCH_DEFAULTS) + list(_custom_archs)


def size_multiple(config: dict) -> int:
    """Input H, W must be divisible by this."""
    kind = _kind(config)
    if kind == "unet":
        return 2 ** int(config.get("num_downs", ARCH_DEFAULTS.get(config["arch"], {}).get("num_downs", 8)))
    if kind == "resnet":
        return 4
    return int(config.get("multiple", 1))


def receptive_radius(config: dict) -> int:
    """Half the receptive field in input pixels (the halo that makes tiling exact for
    convolution-only models; U-Nets see their whole input)."""
    kind = _kind(config)
    if kind == "resnet":
        n = int(config.get("n_blocks", 9))
        # 7x7 (3) + two stride-2 3x3 (1 + 2) + blocks (2 convs x 1 px x stride 4)
        # + two transposed 3x3 (4 + 2) + 7x7 (3), rounded up
        return 16 + n * 8
    if kind == "unet":
        return size_multiple(config) // 2
    return int(config.get("halo", 32))


def _kind(config: dict) -> str:
    arch = config.get("arch", "")
    if arch in ARCH_DEFAULTS:
        return ARCH_DEFAULTS[arch]["kind"]
    if re.fullmatch(r"resnet_\d+blocks", arch):
        return "resnet"
    if re.fullmatch(r"unet_\d+", arch):
        return "unet"
    return "custom"


def build(config: dict):
    """A ``torch.nn.Module`` from a config dict (see :mod:`napari_bci.models.base`)."""
    arch = config.get("arch")
    if not arch:
        raise ModelError("model config has no 'arch'")
    kind = _kind(config)
    common = dict(input_nc=int(config.get("input_nc", 3)), output_nc=int(config.get("output_nc", 3)),
                  ngf=int(config.get("ngf", 64)), norm=config.get("norm", "batch"),
                  use_dropout=bool(config.get("use_dropout", False)))
    if kind == "resnet":
        n = config.get("n_blocks") or ARCH_DEFAULTS.get(arch, {}).get("n_blocks") or int(arch[7:-6])
        return resnet_generator(n_blocks=int(n), padding_type=config.get("padding_type", "reflect"), **common)
    if kind == "unet":
        n = config.get("num_downs") or ARCH_DEFAULTS.get(arch, {}).get("num_downs")
        if not n:
            size = int(arch[5:])
            n = size.bit_length() - 1
        return unet_generator(num_downs=int(n), **common)
    if arch not in _custom_archs and re.fullmatch(r"[a-z_][a-z0-9_]*", arch):
        module = "cut" if arch.startswith("cut_") else "bcistainer" if arch.startswith("bcistainer_") else arch
        try:
            __import__(f"napari_bci.models.{module}")
        except ImportError:
            pass
    if arch not in _custom_archs:
        raise ModelError(f"unknown architecture '{arch}' (known: {', '.join(arch_names())})")
    return _custom_archs[arch](config)


# -- inference from a state dict -----------------------------------------------------------------
def infer_config(sd: dict) -> dict:
    """Architecture and options of a pix2pix-layout state dict (raises ModelError if neither)."""
    keys = set(sd)
    if "model.model.0.weight" in keys:
        # the outermost block holds its submodule at index 1, the others at index 3
        depth = 0
        prefix, sub = "model.model.", "1.model."
        while any(k.startswith(prefix + sub) for k in keys):
            prefix, sub = prefix + sub, "3.model."
            depth += 1
        num_downs = depth + 1
        w0 = sd["model.model.0.weight"]
        second = "model.model.1.model."
        if second + "2.running_mean" in keys or second + "2.weight" in keys:
            norm = "batch"
        elif second + "1.bias" in keys:
            norm = "instance"
        else:
            norm = "none"
        up = sd.get("model.model.3.weight")
        size = 2**num_downs
        arch = {256: "unet_256", 128: "unet_128"}.get(size, f"unet_{size}")
        return {"arch": arch, "num_downs": num_downs, "ngf": int(w0.shape[0]), "input_nc": int(w0.shape[1]),
                "output_nc": int(up.shape[1]) if up is not None else 3, "norm": norm, "use_dropout": False}
    blocks = sorted({int(m.group(1)) for k in keys if (m := re.match(r"model\.(\d+)\.conv_block\.", k))})
    if "model.1.weight" in keys and blocks:
        w1 = sd["model.1.weight"]
        first = blocks[0]
        convs = sorted({int(m.group(1)) for k in keys
                        if (m := re.match(rf"model\.{first}\.conv_block\.(\d+)\.weight$", k))
                        and sd[k].ndim == 4})
        zero_pad = convs and convs[0] == 0
        if "model.2.running_mean" in keys or "model.2.weight" in keys:
            norm = "batch"
        elif "model.1.bias" in keys:
            norm = "instance"
        else:
            norm = "none"
        # second conv sits at 5 (reflect) / 3 (zero) without dropout, one later with dropout
        base = 3 if zero_pad else 5
        use_dropout = len(convs) >= 2 and convs[1] == base + 1
        last = max(int(m.group(1)) for k in keys if (m := re.match(r"model\.(\d+)\.weight$", k)))
        n = len(blocks)
        return {"arch": f"resnet_{n}blocks", "n_blocks": n, "ngf": int(w1.shape[0]),
                "input_nc": int(w1.shape[1]), "output_nc": int(sd[f"model.{last}.weight"].shape[0]),
                "norm": norm, "use_dropout": bool(use_dropout),
                "padding_type": "zero" if zero_pad else "reflect"}
    sample = ", ".join(sorted(keys)[:5])
    raise ModelError(f"not a pix2pix ResNet/U-Net generator state dict (first keys: {sample})")


def _ignorable(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def load_state(module, sd: dict, config: dict, infer: Callable[[dict], dict] | None = None) -> None:
    """Strict load; a mismatch raises one ModelError naming the keys and the likely option
    (what ``infer(sd)``, default :func:`infer_config`, reads from the weights differently)."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd and not _ignorable(k)]
    unexpected = [k for k in sd if k not in own and not _ignorable(k)]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        hint = ""
        try:
            inferred = (infer or infer_config)(sd)
            diff = {k: v for k, v in inferred.items() if v is not None and config.get(k, v) != v}
            if diff:
                hint = "; the checkpoint looks like " + ", ".join(f"{k}={v!r}" for k, v in diff.items())
                if "use_dropout" in diff:
                    hint += f" (dropout {'on' if inferred['use_dropout'] else 'off'})"
        except ModelError:
            pass
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch {_few(shapes)}")
        raise ModelError(f"checkpoint does not fit arch '{config.get('arch')}' "
                         f"({', '.join(f'{k}={v}' for k, v in config.items() if k in _OPTION_KEYS)}): "
                         + "; ".join(parts) + hint)
    filtered = {k: v for k, v in sd.items() if k in own}
    module.load_state_dict(filtered, strict=False)


#: options named in a mismatch message (pix2pix, CUT, BCIStainer)
_OPTION_KEYS = ("ngf", "norm", "use_dropout", "n_blocks", "num_downs", "n_downsampling", "no_antialias",
                "no_antialias_up", "weight_norm", "init_channels", "encoder1_blocks", "style_type",
                "style_linear", "style_blocks", "norm_type", "attention", "full_size", "dropout", "output_lowres")


def _few(items: list[str], n: int = 4) -> str:
    s = ", ".join(items[:n])
    return f"[{s}{', ...' if len(items) > n else ''}] ({len(items)})"


def build_from_state_dict(sd: dict, config: dict | None = None):
    """(module, config): ``config`` given -> build it and load strictly; else infer it from keys."""
    config = dict(config) if config else infer_config(sd)
    module = build(config)
    load_state(module, sd, config)
    return module, config
