"""BCIStainer generators (the BCI challenge's top entry) with the upstream state-dict layout.

Independent implementation of ``BCIStainerBasic`` and ``BCIStainerCAHR`` as described by the
authors' released code (quqixun/BCIStainer, MIT): an encoder, a global style vector (strided
convs + global average pool) feeding a 4-logit HER2-level head and the style blocks of the
decoder (``mod``: weight-demodulated convolutions, ``ada``: AdaIN, ``none``: plain residual
blocks), optional parameter-free SimAM attention, a high-resolution and a low-resolution output.
Module trees, hence ``state_dict`` key names, match upstream (see
``tests/data/upstream_generator_keys.json``), so ``model_best_psnr.pth`` loads as it is.

Config keys are the upstream YAML's ``G.params`` (plus ``name: basic | cahr``; for CAHR also
``crop_size`` and ``infer_mode`` from ``loader``/``trainer``). The style vector depends on the
whole input window, so the model is window-dependent: its native window is ``full_size``.
``forward(x)`` returns ``(ihc_hr, level_logits)`` with ``x``/``ihc_hr`` in [-1, 1].
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ModelError

#: upstream ``BCIStainerBasic`` defaults (libs/models/G.py)
BASIC_DEFAULTS = {
    "full_size": 1024, "input_channels": 3, "output_channels": 3, "init_channels": 32, "levels": 4,
    "encoder1_blocks": 3, "style_type": "mod", "style_linear": True, "style_blocks": 9,
    "norm_type": "batch", "dropout": 0.2, "output_lowres": True, "attention": False,
}
CAHR_DEFAULTS = {**BASIC_DEFAULTS, "init_channels": 64, "encoder1_blocks": 2, "crop_size": 512,
                 "mask_dec_input": "dec1", "infer_mode": "infer_full"}


def _norm_layer(norm_type: str):
    if norm_type == "batch":
        return lambda c: nn.BatchNorm2d(c, affine=True, track_running_stats=True)
    if norm_type == "instance":
        return lambda c: nn.InstanceNorm2d(c, affine=False, track_running_stats=False)
    if norm_type == "none":
        return lambda c: nn.Identity()
    raise ModelError(f"BCIStainer: unknown norm_type '{norm_type}' (batch, instance or none)")


class SimAM(nn.Module):
    """Parameter-free attention: ``x * sigmoid(d / (4 (v + lambda)) + 0.5)`` per channel."""

    def __init__(self, e_lambda: float = 1e-4):
        super().__init__()
        self.e_lambda = e_lambda

    def forward(self, x):
        n = x.shape[2] * x.shape[3] - 1
        d = (x - x.mean(dim=(2, 3), keepdim=True)).pow(2)
        v = d.sum(dim=(2, 3), keepdim=True) / n
        return x * torch.sigmoid(d / (4 * (v + self.e_lambda)) + 0.5)


class ConvNormAct(nn.Module):
    """Reflect-padded conv (or transposed conv) + norm + LeakyReLU(0.2) under ``.conv``."""

    def __init__(self, cin, cout, norm, bias, kernel=3, stride=2, padding=1, transposed=False):
        super().__init__()
        if transposed:
            layers = [nn.ConvTranspose2d(cin, cout, kernel, stride=stride, padding=padding,
                                         output_padding=padding, bias=bias)]
        else:
            layers = [nn.ReflectionPad2d(padding), nn.Conv2d(cin, cout, kernel, stride=stride, bias=bias)]
        self.conv = nn.Sequential(*layers, norm(cout), nn.LeakyReLU(0.2, True))

    def forward(self, x):
        return self.conv(x)


class ResnetBlock(nn.Module):
    """Style-free residual block ``(x + f(x)) / sqrt(2)``."""

    def __init__(self, dim, norm, bias, attention):
        super().__init__()
        layers = [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), norm(dim), nn.LeakyReLU(0.2, True),
                  nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias)]
        layers += [SimAM()] if attention else []
        self.conv = nn.Sequential(*layers, norm(dim), nn.LeakyReLU(0.2, True))

    def forward(self, xs):
        x, style = xs
        return (x + self.conv(x)) / math.sqrt(2), style


class AdaIN(nn.Module):
    def __init__(self, style_dims, channels):
        super().__init__()
        self.norm = nn.InstanceNorm2d(channels, affine=False)
        self.linear = nn.Linear(style_dims, channels * 2)

    def forward(self, x, style):
        gamma, beta = torch.chunk(self.linear(style)[:, :, None, None], 2, dim=1)
        return (1 + gamma) * self.norm(x) + beta


class ResnetAdaBlock(nn.Module):
    def __init__(self, style_dims, dim, bias, attention):
        super().__init__()
        self.act = nn.LeakyReLU(0.2, True)
        self.style1, self.style2 = AdaIN(style_dims, dim), AdaIN(style_dims, dim)
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1, bias=bias)
        self.atten = SimAM() if attention else None

    def forward(self, xs):
        x, style = xs
        out = self.act(self.style1(self.conv1(x), style))
        out = self.conv2(out)
        if self.atten is not None:
            out = self.atten(out)
        out = self.act(self.style2(out, style))
        return (x + out) / math.sqrt(2), style


class EqualizedWeight(nn.Module):
    """Weight stored as ``.data`` (N(0, 1) at init) and scaled by ``1 / sqrt(fan_in)``."""

    def __init__(self, shape):
        super().__init__()
        self.c = 1 / math.sqrt(math.prod(shape[1:]))
        w = torch.empty(shape)
        self.data = nn.Parameter(w if w.is_meta else w.normal_())  # meta: counted, not drawn

    def forward(self):
        return self.data * self.c


class ModConv2d(nn.Module):
    """Weight-(de)modulated 3x3 convolution with reflect padding (StyleGAN2-style)."""

    def __init__(self, cin, cout, kernel, bias, eps=1e-8):
        super().__init__()
        self.cout, self.pad, self.eps = cout, (kernel // 2,) * 4, eps
        self.weight = EqualizedWeight([cout, cin, kernel, kernel])
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None

    def forward(self, xs):
        x, style = xs
        b, _, h, w = x.shape
        wt = self.weight()[None] * (style[:, None, :, None, None] + 1)
        wt = wt * torch.rsqrt((wt ** 2).sum(dim=(2, 3, 4), keepdim=True) + self.eps)
        out = F.conv2d(F.pad(x.reshape(1, -1, h, w), self.pad, mode="reflect"),
                       wt.reshape(b * self.cout, *wt.shape[2:]), groups=b)
        out = out.reshape(b, self.cout, h, w)
        return out + self.bias[None, :, None, None] if self.bias is not None else out


class ResnetModBlock(nn.Module):
    def __init__(self, style_dims, dim, bias, style_linear, attention):
        super().__init__()
        self.style_linear = style_linear
        if style_linear:
            self.style1 = nn.Linear(style_dims, dim)
            self.style2 = nn.Linear(style_dims, dim)
        elif style_dims != dim:
            raise ModelError("BCIStainer: style_linear false needs style and conv widths equal")
        self.conv1 = nn.Sequential(ModConv2d(dim, dim, 3, bias), nn.LeakyReLU(0.2, True))
        self.conv2 = nn.Sequential(ModConv2d(dim, dim, 3, bias), nn.LeakyReLU(0.2, True))
        self.atten = SimAM() if attention else None

    def forward(self, xs):
        x, style = xs
        s1, s2 = (self.style1(style), self.style2(style)) if self.style_linear else (style, style)
        out = self.conv2((self.conv1((x, s1)), s2))
        if self.atten is not None:
            out = self.atten(out)
        return (x + out) / math.sqrt(2), style


class BCIStainer(nn.Module):
    """``BCIStainerBasic`` (``cahr=False``) or ``BCIStainerCAHR``; ``forward(x) -> (ihc, logits)``."""

    predicts_her2 = True

    def __init__(self, config: dict):
        super().__init__()
        cahr = config.get("name", "basic") == "cahr"
        c = {**(CAHR_DEFAULTS if cahr else BASIC_DEFAULTS), **config}
        self.cahr, self.config = cahr, c
        if c["style_type"] not in ("mod", "ada", "none"):
            raise ModelError(f"BCIStainer: unknown style_type '{c['style_type']}' (mod, ada or none)")
        norm, bias = _norm_layer(c["norm_type"]), c["norm_type"] != "batch"
        ch, n1 = int(c["init_channels"]), int(c["encoder1_blocks"])
        self.style_type, self.output_lowres = c["style_type"], bool(c["output_lowres"])
        self.inconv = ConvNormAct(int(c["input_channels"]), ch, norm, bias, kernel=7, stride=1, padding=3)
        self.encoder1 = nn.Sequential(*[ConvNormAct(ch * 2**i, ch * 2**(i + 1), norm, bias) for i in range(n1)])
        dims = ch * 2**n1
        n2 = int(math.log2(int(c["full_size"]) / 8)) - n1
        self.encoder2 = nn.Sequential(*[ConvNormAct(dims, dims, norm, bias) for _ in range(n2)],
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        head = [nn.Dropout(float(c["dropout"]))] if float(c["dropout"]) > 0 else []
        self.classify_head = nn.Sequential(*head, nn.Linear(dims, int(c["levels"])))
        att = bool(c["attention"])
        blocks = []
        for _ in range(int(c["style_blocks"])):
            if self.style_type == "mod":
                blocks.append(ResnetModBlock(dims, dims, bias, bool(c["style_linear"]), att))
            elif self.style_type == "ada":
                blocks.append(ResnetAdaBlock(dims, dims, bias, att))
            else:
                blocks.append(ResnetBlock(dims, norm, bias, att))
        self.decoder1 = nn.Sequential(*blocks)
        out_nc = int(c["output_channels"])
        if self.output_lowres:
            self.lowres_outconv = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(dims, out_nc, 3), nn.Tanh())

        def decoder():
            return nn.Sequential(*[ConvNormAct(ch * 2**(n1 - i), ch * 2**(n1 - i) // 2, norm, bias, transposed=True)
                                   for i in range(n1)])

        self.decoder2 = decoder()
        self.highres_outconv = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(ch, out_nc, 7), nn.Tanh())
        if cahr:
            if c["mask_dec_input"] not in ("dec1", "enc1") or c["infer_mode"] not in ("infer_full", "infer_crop"):
                raise ModelError("BCIStainer CAHR: mask_dec_input must be dec1|enc1 and infer_mode infer_full|infer_crop")
            self.crop_size, self.infer_mode = int(c["crop_size"]), c["infer_mode"]
            self.mask_decoder = decoder()
            self.mask_outconv = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(ch, 1, 7), nn.Sigmoid())

    def _decode(self, x, style):
        enc1 = self.encoder1(self.inconv(x))
        dec1, _ = self.decoder1((enc1, style))
        return enc1, dec1, self.highres_outconv(self.decoder2(dec1))

    def forward(self, x):
        enc1 = self.encoder1(self.inconv(x))
        style = self.encoder2(enc1)
        level = self.classify_head(style)
        dec1, _ = self.decoder1((enc1, style))
        ihc = self.highres_outconv(self.decoder2(dec1))
        if self.cahr:
            ihc = torch.cat([self._cahr_merge(x[i:i + 1], ihc[i:i + 1], style[i:i + 1]) for i in range(len(x))])
        return ihc, level

    def _cahr_merge(self, x, full, style):
        """Refine half-overlapping ``crop_size`` crops and merge them with their masks (upstream
        ``_infer_full_merge`` / ``_infer_crop_merge``)."""
        h, w = x.shape[2:]
        cs = self.crop_size
        starts = [(r, c) for r in range(0, h - cs + 1, cs // 2) for c in range(0, w - cs + 1, cs // 2)]
        if not starts:
            raise ModelError(f"BCIStainer CAHR needs inputs of at least {cs} px, got {h}x{w}")
        crops = torch.cat([x[:, :, r:r + cs, c:c + cs] for r, c in starts])
        enc1, dec1, ihc_crop = self._decode(crops, style.repeat(len(starts), 1))
        mask = self.mask_outconv(self.mask_decoder(dec1 if self.config["mask_dec_input"] == "dec1" else enc1))
        full = full[0]
        acc = torch.zeros_like(full)
        if self.infer_mode == "infer_full":
            for i, (r, c) in enumerate(starts):
                pad = [c, w - c - cs, r, h - r - cs]
                m = F.pad(mask[i], pad)
                acc += full * (1 - m) + F.pad(ihc_crop[i], pad) * m
            return (acc / len(starts))[None]
        count = torch.zeros_like(full)
        for i, (r, c) in enumerate(starts):
            acc[:, r:r + cs, c:c + cs] += full[:, r:r + cs, c:c + cs] * (1 - mask[i]) + ihc_crop[i] * mask[i]
            count[:, r:r + cs, c:c + cs] += 1.0
        return (acc / count)[None]


# -- configs ------------------------------------------------------------------------------------------
def from_upstream_yaml(cfg: dict) -> dict:
    """Our config from an upstream training YAML (``G: {name, params}``, ``loader``, ``trainer``)."""
    g = cfg.get("G") or {}
    name = g.get("name", "basic")
    if name not in ("basic", "cahr"):
        raise ModelError(f"BCIStainer YAML: unknown G.name '{name}' (basic or cahr)")
    out = {"arch": f"bcistainer_{name}", "name": name, **(g.get("params") or {})}
    loader, trainer = cfg.get("loader") or {}, cfg.get("trainer") or {}
    if loader.get("norm_method", "global_minmax") != "global_minmax":
        raise ModelError(f"BCIStainer YAML: norm_method '{loader['norm_method']}' is not supported (upstream only runs global_minmax)")
    if name == "cahr":
        for k, src in (("crop_size", loader), ("infer_mode", trainer)):
            if k in src:
                out[k] = src[k]
    out["ema"] = bool(trainer.get("ema", False))
    if cfg.get("exp"):
        out["exp"] = cfg["exp"]
    return out


def infer_config(sd: dict) -> dict:
    """What the keys and shapes say about a BCIStainer state dict (``attention`` and instance vs
    no norm leave no trace in the weights: those are ``None`` here)."""
    keys = set(sd)
    if "inconv.conv.1.weight" not in keys or not any(k.startswith("decoder1.") for k in keys):
        raise ModelError("not a BCIStainer generator state dict")

    def count(prefix):
        return len({int(m.group(1)) for k in keys if (m := re.match(rf"{prefix}\.(\d+)\.", k))})

    w0 = sd["inconv.conv.1.weight"]
    n1, n2 = count("encoder1"), count("encoder2")
    head = max(int(m.group(1)) for k in keys if (m := re.match(r"classify_head\.(\d+)\.weight$", k)))
    if "decoder1.0.conv1.0.weight.data" in keys:
        style = "mod"
    elif "decoder1.0.style1.linear.weight" in keys:
        style = "ada"
    else:
        style = "none"
    batch = "inconv.conv.2.running_mean" in keys
    cfg = {
        "arch": "bcistainer_cahr" if "mask_outconv.1.weight" in keys else "bcistainer_basic",
        "input_channels": int(w0.shape[1]), "init_channels": int(w0.shape[0]),
        "encoder1_blocks": n1, "full_size": 8 * 2 ** (n1 + n2),
        "levels": int(sd[f"classify_head.{head}.weight"].shape[0]),
        "dropout": 0.2 if head == 1 else 0.0, "style_type": style,
        "style_linear": "decoder1.0.style1.weight" in keys, "style_blocks": count("decoder1"),
        "norm_type": "batch" if batch else None,
        "output_lowres": "lowres_outconv.1.weight" in keys,
        "output_channels": int(sd["highres_outconv.1.weight"].shape[0]),
        "attention": None,
    }
    cfg["name"] = cfg["arch"][len("bcistainer_"):]
    if style == "none":  # the second conv of a plain block sits one index later after SimAM
        norm_idx = [int(m.group(1)) for k in keys if (m := re.match(r"decoder1\.0\.conv\.(\d+)\.", k))]
        if batch:
            cfg["attention"] = max(norm_idx) == 7
    return cfg


def build(config: dict) -> BCIStainer:
    return BCIStainer({k: v for k, v in config.items() if k != "arch"})


def unwrap_ema(obj: dict) -> tuple[dict, bool]:
    """The weights to run from an ``ema_pytorch.EMA`` state dict (``ema_model.*``), else as is."""
    if isinstance(obj, dict) and any(k.startswith("ema_model.") for k in obj):
        return {k[len("ema_model."):]: v for k, v in obj.items() if k.startswith("ema_model.")}, True
    return obj, False


def register() -> None:
    from .architectures import register_arch

    register_arch("bcistainer_basic", lambda cfg: build({**cfg, "name": "basic"}))
    register_arch("bcistainer_cahr", lambda cfg: build({**cfg, "name": "cahr"}))


register()
