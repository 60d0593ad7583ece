"""PatchGAN discriminator with pix2pix's ``NLayerDiscriminator`` module layout.

The state-dict keys (``model.0.weight``, ``model.2.weight``, ``model.3.running_mean``, ...) are
those of pytorch-CycleGAN-and-pix2pix / BCI PyramidPix2pix, so a ``latest_net_D.pth`` from that
code loads into :class:`NLayerDiscriminator` (e.g. to resume a PyramidPix2pix run here).
"""

from __future__ import annotations

import functools

import torch.nn as nn


def norm_layer(norm: str):
    """``"batch"`` | ``"instance"`` | ``"none"`` -> a layer factory (pix2pix's ``get_norm_layer``)."""
    if norm == "batch":
        return functools.partial(nn.BatchNorm2d, affine=True, track_running_stats=True)
    if norm == "instance":
        return functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    if norm == "none":
        return lambda c: nn.Identity()  # keeps the Sequential indices (and so the keys) stable
    raise ValueError(f"unknown norm {norm!r}")


class NLayerDiscriminator(nn.Module):
    """The pix2pix 70x70 PatchGAN (``n_layers=3``); outputs a logit map.

    For conditional pix2pix training ``input_nc`` is 6: the H&E and the (real or fake) IHC
    concatenated along channels.
    """

    def __init__(self, input_nc: int = 6, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        make_norm = norm_layer(norm)
        use_bias = norm == "instance"  # as pix2pix decides it
        kw, padw = 4, 1
        seq: list[nn.Module] = [
            nn.Conv2d(input_nc, ndf, kernel_size=kw, stride=2, padding=padw),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            seq += [nn.Conv2d(ndf * prev, ndf * mult, kernel_size=kw, stride=2, padding=padw, bias=use_bias)]
            seq += [make_norm(ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2**n_layers, 8)
        seq += [nn.Conv2d(ndf * prev, ndf * mult, kernel_size=kw, stride=1, padding=padw, bias=use_bias)]
        seq += [make_norm(ndf * mult), nn.LeakyReLU(0.2, True)]
        seq += [nn.Conv2d(ndf * mult, 1, kernel_size=kw, stride=1, padding=padw)]
        self.model = nn.Sequential(*seq)

    def forward(self, x):
        return self.model(x)


def init_weights(net: nn.Module, gain: float = 0.02) -> nn.Module:
    """pix2pix's ``normal`` initialisation: N(0, 0.02) convs, N(1, 0.02) norm scales, zero biases."""

    def f(m):
        name = type(m).__name__
        if hasattr(m, "weight") and m.weight is not None and ("Conv" in name or "Linear" in name):
            nn.init.normal_(m.weight, 0.0, gain)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif "BatchNorm2d" in name:
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)

    net.apply(f)
    return net
