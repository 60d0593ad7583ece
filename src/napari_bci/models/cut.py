"""CUT-family ResNet generators (CUT, FastCUT, CPT, ASP, PSPStain) with the upstream layout.

Independent implementation of the ``ResnetGenerator`` of the contrastive-unpaired-translation
code base that ASP (lifangda01/AdaptiveSupervisedPatchNCE, BSD-3) and PSPStain build on: a 7x7
conv, ``n_downsampling`` downsamplings (stride-1 conv + blur-pool ``Downsample`` with a fixed
``filt`` buffer, or a plain stride-2 conv with ``no_antialias``), ``n_blocks`` residual blocks,
as many upsamplings (``Upsample`` blur + conv, or a transposed conv with ``no_antialias_up``),
7x7 conv, tanh. Options: ``ngf``, ``normG`` (instance / batch / none), ``weight_norm``
(``spectral``: weights are stored as ``weight_orig`` with power-iteration vectors
``weight_u``/``weight_v``; at inference ``W = weight_orig / (u . W v)`` as torch's spectral norm
computes it in eval mode), ``no_dropout``, ``padding_type``.

Options come from the ``train_opt.txt`` beside the checkpoint (:func:`read_train_opt`) or are
read back from the keys and shapes (:func:`infer_config`). Key layout facts:
``tests/data/upstream_generator_keys.json``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ModelError
from .architectures import norm_factory, pad_layers

CUT_DEFAULTS = {"input_nc": 3, "output_nc": 3, "ngf": 64, "norm": "instance", "n_blocks": 9,
                "n_downsampling": 2, "no_antialias": False, "no_antialias_up": False,
                "weight_norm": "none", "use_dropout": False, "padding_type": "reflect"}

_BLUR = {1: [1.0], 2: [1.0, 1.0], 3: [1.0, 2.0, 1.0], 4: [1.0, 3.0, 3.0, 1.0]}


def _filter(size: int) -> torch.Tensor:
    """Normalised binomial filter, computed on the CPU even while a model is built on the meta
    device (meta arithmetic would pull in torch's compiler stack)."""
    a = torch.tensor(_BLUR[size], dtype=torch.float64, device="cpu")
    f = a[:, None] * a[None, :]
    return (f / f.sum()).float()


class Downsample(nn.Module):
    """3x3 binomial blur (reflect-padded) then stride 2, per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("filt", _filter(3)[None, None].repeat(channels, 1, 1, 1))
        self.pad = nn.ReflectionPad2d(1)

    def forward(self, x):
        return F.conv2d(self.pad(x), self.filt, stride=2, groups=x.shape[1])


class Upsample(nn.Module):
    """x2 upsampling by a transposed 4x4 binomial filter (replicate-padded), per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("filt", (_filter(4) * 4)[None, None].repeat(channels, 1, 1, 1))  # CPU (above)
        self.pad = nn.ReplicationPad2d(1)

    def forward(self, x):
        out = F.conv_transpose2d(self.pad(x), self.filt, stride=2, padding=2, groups=x.shape[1])
        return out[:, :, 1:-1, 1:-1]


class SpectralNormConv(nn.Module):
    """A conv whose weight is ``weight_orig / sigma`` with ``sigma = u . (W_mat v)`` from the
    stored vectors (no power iteration: torch's spectral norm in eval mode). Keys:
    ``weight_orig``, ``bias``, ``weight_u``, ``weight_v``, as ``nn.utils.spectral_norm`` saves."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.transposed = isinstance(conv, nn.ConvTranspose2d)
        self.dim = 1 if self.transposed else 0
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.output_padding = getattr(conv, "output_padding", 0)
        w = conv.weight.detach()
        self.weight_orig = nn.Parameter(w.clone())
        self.bias = conv.bias
        h = w.shape[self.dim]
        u, v = torch.empty(h), torch.empty(w.numel() // h)
        if not u.is_meta:  # meta: counted, not drawn
            u, v = F.normalize(u.normal_(), dim=0, eps=1e-12), F.normalize(v.normal_(), dim=0, eps=1e-12)
        self.register_buffer("weight_u", u)
        self.register_buffer("weight_v", v)

    def weight(self) -> torch.Tensor:
        w = self.weight_orig
        mat = (w.transpose(0, 1) if self.dim else w).reshape(w.shape[self.dim], -1)
        return w / torch.dot(self.weight_u, torch.mv(mat, self.weight_v))

    def forward(self, x):
        if self.transposed:
            return F.conv_transpose2d(x, self.weight(), self.bias, self.stride, self.padding,
                                      self.output_padding, self.groups, self.dilation)
        return F.conv2d(x, self.weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


def _wn(conv: nn.Module, spectral: bool) -> nn.Module:
    if not spectral:
        return conv
    return SpectralNormConv(conv)


class ResnetBlock(nn.Module):
    def __init__(self, dim, norm_layer, bias, use_dropout, padding_type, spectral):
        super().__init__()
        pad, p = pad_layers(padding_type, family="CUT: ")
        layers = pad + [_wn(nn.Conv2d(dim, dim, 3, padding=p, bias=bias), spectral), norm_layer(dim), nn.ReLU(True)]
        layers += [nn.Dropout(0.5)] if use_dropout else []
        pad, p = pad_layers(padding_type, family="CUT: ")
        layers += pad + [_wn(nn.Conv2d(dim, dim, 3, padding=p, bias=bias), spectral), norm_layer(dim)]
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv_block(x)


class CUTResnetGenerator(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        c = {**CUT_DEFAULTS, **config}
        norm_layer, bias = norm_factory(c["norm"], family="CUT: ", option="normG")
        sn = c["weight_norm"] == "spectral"
        if c["weight_norm"] not in ("spectral", "none"):
            raise ModelError(f"CUT: unknown weight_norm '{c['weight_norm']}' (none or spectral)")
        ngf, nd = int(c["ngf"]), int(c["n_downsampling"])
        m = [nn.ReflectionPad2d(3), _wn(nn.Conv2d(int(c["input_nc"]), ngf, 7, bias=bias), sn), norm_layer(ngf), nn.ReLU(True)]
        for i in range(nd):
            a = ngf * 2**i
            if c["no_antialias"]:
                m += [_wn(nn.Conv2d(a, 2 * a, 3, stride=2, padding=1, bias=bias), sn), norm_layer(2 * a), nn.ReLU(True)]
            else:
                m += [_wn(nn.Conv2d(a, 2 * a, 3, padding=1, bias=bias), sn), norm_layer(2 * a), nn.ReLU(True),
                      Downsample(2 * a)]
        dim = ngf * 2**nd
        m += [ResnetBlock(dim, norm_layer, bias, bool(c["use_dropout"]), c["padding_type"], sn)
              for _ in range(int(c["n_blocks"]))]
        for i in range(nd):
            a = ngf * 2 ** (nd - i)
            if c["no_antialias_up"]:
                m += [_wn(nn.ConvTranspose2d(a, a // 2, 3, stride=2, padding=1, output_padding=1, bias=bias), sn),
                      norm_layer(a // 2), nn.ReLU(True)]
            else:
                m += [Upsample(a), _wn(nn.Conv2d(a, a // 2, 3, padding=1, bias=bias), sn), norm_layer(a // 2), nn.ReLU(True)]
        m += [nn.ReflectionPad2d(3), _wn(nn.Conv2d(ngf, int(c["output_nc"]), 7), sn), nn.Tanh()]
        self.model = nn.Sequential(*m)
        self.config = c

    def forward(self, x):
        return self.model(x)


def build(config: dict) -> CUTResnetGenerator:
    cfg = dict(config)
    arch = cfg.get("arch", "")
    if "n_blocks" not in cfg and (m := re.fullmatch(r"(?:cut_)?resnet_(\d+)blocks", arch)):
        cfg["n_blocks"] = int(m.group(1))
    return CUTResnetGenerator(cfg)


# -- train_opt.txt ------------------------------------------------------------------------------------
def read_train_opt(path: str | Path) -> dict:
    """The ``key: value`` options of a CUT/pix2pix ``train_opt.txt`` (``[default: ...]`` dropped)."""
    opts: dict = {}
    for line in Path(path).read_text(errors="replace").splitlines():
        m = re.match(r"\s*([A-Za-z_][\w]*)\s*:\s*(.*?)\s*(?:\[default:.*\])?\s*$", line)
        if not m:
            continue
        k, v = m.group(1), m.group(2)
        low = v.lower()
        if low in ("true", "false"):
            val: object = low == "true"
        elif re.fullmatch(r"-?\d+", v):
            val = int(v)
        elif re.fullmatch(r"-?\d*\.\d+(e-?\d+)?", low):
            val = float(v)
        else:
            val = v
        opts[k] = val
    return opts


def config_from_opt(opt: dict) -> dict:
    """Generator config from CUT options (``netG``, ``normG``, ``ngf``, ...)."""
    arch = str(opt.get("netG", "resnet_9blocks"))
    if not re.fullmatch(r"resnet_\d+blocks", arch):
        raise ModelError(f"train_opt.txt: netG '{arch}' is not a CUT ResNet generator (resnet_4/6/9blocks)")
    cfg = {"arch": f"cut_{arch}", "n_blocks": int(arch[7:-6]), "ngf": int(opt.get("ngf", 64)),
           "norm": str(opt.get("normG", opt.get("norm", "instance"))),
           "input_nc": int(opt.get("input_nc", 3)), "output_nc": int(opt.get("output_nc", 3)),
           "no_antialias": bool(opt.get("no_antialias", False)),
           "no_antialias_up": bool(opt.get("no_antialias_up", False)),
           "weight_norm": str(opt.get("weight_norm", "none")),
           "use_dropout": not bool(opt.get("no_dropout", True)),
           "n_downsampling": int(opt.get("n_downsampling", 2))}
    if opt.get("direction") == "BtoA":
        cfg["direction"] = "BtoA"
    for k in ("name", "model", "CUT_mode", "crop_size", "load_size", "preprocess"):
        if k in opt:
            cfg[f"opt_{k}"] = opt[k]
    return cfg


def is_cut_layout(sd: dict) -> bool:
    """Antialiased blur buffers or spectral-norm weights: only the CUT code base writes these."""
    return any(k.endswith(".filt") or k.endswith(".weight_orig") for k in sd)


def infer_config(sd: dict) -> dict:
    """CUT generator options read back from keys and shapes (raises ModelError if not CUT-like)."""
    keys = set(sd)
    sn = any(k.endswith(".weight_orig") for k in keys)
    wk = "weight_orig" if sn else "weight"
    if f"model.1.{wk}" not in keys:
        raise ModelError("not a CUT ResnetGenerator state dict (no model.1 conv)")
    w1 = sd[f"model.1.{wk}"]
    ngf = int(w1.shape[0])
    blocks = sorted({int(m.group(1)) for k in keys if (m := re.match(r"model\.(\d+)\.conv_block\.", k))})
    if not blocks:
        raise ModelError("not a CUT ResnetGenerator state dict (no residual blocks)")
    convs = sorted({int(m.group(1)) for k in keys if (m := re.match(rf"model\.{blocks[0]}\.conv_block\.(\d+)\.{wk}$", k))})
    zero_pad = bool(convs) and convs[0] == 0
    if "model.2.running_mean" in keys:
        norm = "batch"
    elif "model.1.bias" in keys:
        norm = "instance"
    else:
        norm = "none"
    dim = int(sd[f"model.{blocks[0]}.conv_block.{convs[0]}.{wk}"].shape[0])
    nd = max(0, (dim // ngf).bit_length() - 1)
    downs = [k for k in keys if re.match(rf"model\.(\d+)\.filt$", k) and int(k.split(".")[1]) < blocks[0]]
    ups = [k for k in keys if re.match(rf"model\.(\d+)\.filt$", k) and int(k.split(".")[1]) > blocks[-1]]
    last = max(int(m.group(1)) for k in keys if (m := re.match(rf"model\.(\d+)\.{wk}$", k)))
    base = 3 if zero_pad else 5
    return {"arch": f"cut_resnet_{len(blocks)}blocks", "n_blocks": len(blocks), "ngf": ngf,
            "input_nc": int(w1.shape[1]), "output_nc": int(sd[f"model.{last}.{wk}"].shape[0]),
            "norm": norm, "n_downsampling": nd, "no_antialias": nd > 0 and not downs,
            "no_antialias_up": nd > 0 and not ups, "weight_norm": "spectral" if sn else "none",
            "use_dropout": len(convs) >= 2 and convs[1] == base + 1,
            "padding_type": "zero" if zero_pad else "reflect"}


def receptive_radius(config: dict) -> int:
    """Half the receptive field in input pixels (a generous bound)."""
    c = {**CUT_DEFAULTS, **config}
    s = 2 ** int(c["n_downsampling"])
    return 3 + 3 * s + 2 * s * int(c["n_blocks"]) + 3 * s + 3


def register() -> None:
    from .architectures import register_arch

    for n in (4, 6, 9):
        register_arch(f"cut_resnet_{n}blocks", build)


register()
