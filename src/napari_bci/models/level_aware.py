"""The HER2-level-aware generator (``arch: "level_aware"``) and the shipped built-in model.

In the spirit of BCIStainer (the BCI challenge's best-PSNR entry): an encoder feeds a
classification head that predicts the HER2 level (trained with focal loss on the slide-level
label), and the prediction conditions the decoder by feature-wise modulation (FiLM: per-channel
scale and shift computed from the predicted level probabilities).

One difference, for tiling: the head is *dense*. It predicts level logits on a 1/16-resolution
grid; the tile-level logits are their spatial mean (a linear head on globally average-pooled
features, as in BCIStainer) and are what :meth:`predict_her2` reports and the focal loss trains,
while the decoder is modulated by the *local* softmax map. The whole network is therefore
convolutional, so tiles of one slide get the same conditioning where they overlap and the tile
engine's halo/feathering stays seam-free (a per-tile global vector would jump at tile borders).

The level map the decoder sees can be the head's logits box-averaged over ``cond_pool`` x
``cond_pool`` cells before the softmax (more tissue per decision; the built-in model uses 5),
and multiplied by ``cond_sharpness`` (an inverse softmax temperature, default 1): the head's map
is soft (its largest share is often 0.4-0.6), and since teacher forcing taught the decoder each
level from one-hot maps, a soft map makes it draw a pale mixture of levels; the built-in model
sharpens it by a factor chosen on calibration pairs (``scripts/train_builtin.py``, stage 4).
For training, ``forward(x, level, use_level)`` replaces it by the true level for chosen samples
(teacher forcing), so the decoder learns to draw every level whatever the head says.

``dab_gain`` (one factor per level, default none): the output's DAB concentration (colour
deconvolution, :data:`napari_bci.stain.HED_MATRIX`) is multiplied by the level map's mixture of
these gains, a per-level stain calibration fitted after training (``scripts/train_builtin.py``:
the gain that makes the membrane DAB of the output match the real IHC's on calibration pairs).

Layout (defaults, ~1.3 M parameters, ~10 GMAC per 512x512 tile): a 3-stride U-Net-style
encoder (16, 32, 64, 128 channels), 3 residual blocks at 1/8 resolution, bilinear-upsampling
decoder with skip connections, BatchNorm (eval mode at inference: per-pixel affine, so tiles
agree), tanh output in [-1, 1].
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .architectures import register_arch
from .base import HER2_CLASSES

ARCH = "level_aware"
WEIGHTS_DIR = Path(__file__).with_name("weights")
BUILTIN_WEIGHTS = WEIGHTS_DIR / "builtin.safetensors"
BUILTIN_CONFIG = WEIGHTS_DIR / "builtin.json"

#: DAB OD below which ``dab_gain`` leaves a pixel unchanged, and above which it applies fully.
DAB_GAIN_RAMP = (0.04, 0.12)

DEFAULTS = {"channels": [16, 32, 64, 128], "n_blocks": 3, "head_channels": 64, "n_classes": 4, "cond_pool": 1,
            "dab_gain": None, "cond_sharpness": 1.0}


def _cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)
    )


class FiLM(nn.Module):
    """``h * (1 + gamma(p)) + beta(p)`` with ``gamma, beta`` a 1x1 conv of the level
    probabilities ``p`` (resampled to ``h``'s grid). Zero-initialised: starts as identity."""

    def __init__(self, n_cond: int, channels: int):
        super().__init__()
        self.proj = nn.Conv2d(n_cond, 2 * channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if cond.shape[-2:] != h.shape[-2:]:
            cond = F.interpolate(cond, size=h.shape[-2:], mode="bilinear", align_corners=False)
        gamma, beta = self.proj(cond.to(h.dtype)).chunk(2, dim=1)
        return h * (1 + gamma) + beta


class ResBlock(nn.Module):
    def __init__(self, ch: int, n_cond: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.film = FiLM(n_cond, ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)

    def forward(self, x, cond):
        h = F.relu(self.film(self.bn1(self.conv1(x)), cond))
        return x + self.bn2(self.conv2(h))


class UpBlock(nn.Module):
    """Bilinear 2x upsampling, concatenation with the skip, conv-BN-FiLM-ReLU."""

    def __init__(self, cin: int, cskip: int, cout: int, n_cond: int):
        super().__init__()
        self.conv = nn.Conv2d(cin + cskip, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.film = FiLM(n_cond, cout)

    def forward(self, x, skip, cond):
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return F.relu(self.film(self.bn(self.conv(torch.cat([x, skip], 1))), cond))


class LevelAwareGenerator(nn.Module):
    """``forward(x) -> (image, her2_logits)``: x ``(N, 3, H, W)`` in [-1, 1]; image same shape in
    [-1, 1]; logits ``(N, 4)`` for HER2 0, 1+, 2+, 3+. Any H, W (reflect-padded to a multiple
    of 16 internally)."""

    predicts_her2 = True
    multiple = 16

    def __init__(self, channels=(16, 32, 64, 128), n_blocks: int = 3, head_channels: int = 64,
                 n_classes: int = 4, cond_pool: int = 1, dab_gain=None, cond_sharpness: float = 1.0):
        super().__init__()
        self.cond_pool = int(cond_pool)
        self.cond_sharpness = float(cond_sharpness)
        self.dab_gain = None if dab_gain is None else [float(g) for g in dab_gain]
        c0, c1, c2, c3 = channels
        k = n_classes
        self.enc0 = _cbr(3, c0)
        self.enc1 = _cbr(c0, c1, 2)
        self.enc2 = _cbr(c1, c2, 2)
        self.enc3 = _cbr(c2, c3, 2)
        self.head = nn.Sequential(
            _cbr(c3, head_channels, 2), _cbr(head_channels, head_channels), _cbr(head_channels, head_channels),
            nn.Conv2d(head_channels, k, 1),
        )
        self.blocks = nn.ModuleList([ResBlock(c3, k) for _ in range(n_blocks)])
        self.up2 = UpBlock(c3, c2, c2, k)
        self.up1 = UpBlock(c2, c1, c1, k)
        self.up0 = UpBlock(c1, c0, c0, k)
        self.out = nn.Conv2d(c0, 3, 3, padding=1)

    def condition(self, dense: torch.Tensor) -> torch.Tensor:
        """The decoder's level map: softmax of the dense logits, first box-averaged over
        ``cond_pool`` x ``cond_pool`` cells (1/16 resolution) so that each region's level is
        decided from more tissue than one head receptive field, then scaled by
        ``cond_sharpness``."""
        z = dense.float()
        if self.cond_pool > 1:
            z = F.avg_pool2d(z, self.cond_pool, stride=1, padding=self.cond_pool // 2, count_include_pad=False)
        return torch.softmax(z * self.cond_sharpness, dim=1)

    def forward_dense(self, x: torch.Tensor, level: torch.Tensor | None = None,
                      use_level: torch.Tensor | None = None):
        """``(image, dense_logits)``; dense logits ``(N, 4, H/16, W/16)``.

        Training only: ``level`` ``(N,)`` true levels replace the predicted level map as the
        decoder's condition (teacher forcing) for the samples where ``use_level`` ``(N,)`` is true
        (all when None)."""
        h, w = x.shape[-2:]
        skips, dense = self.encode(x)
        cond = self.condition(dense)
        if level is not None:
            onehot = F.one_hot(level.long(), cond.shape[1]).to(cond.dtype)[:, :, None, None].expand_as(cond)
            sel = torch.ones_like(level, dtype=torch.bool) if use_level is None else use_level.bool()
            cond = torch.where(sel[:, None, None, None], onehot, cond)
        img = self.decode(skips, cond)
        if self.dab_gain is not None:
            img = self.scale_dab(img, cond)
        return img[..., :h, :w], dense

    def encode(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """``((s0, s1, s2, z), dense_logits)``: the encoder's outputs at full, 1/2, 1/4 and 1/8
        resolution and the dense head's logits, for ``x`` padded to a multiple of 16."""
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.multiple, (-w) % self.multiple
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
        s0 = self.enc0(x)
        s1 = self.enc1(s0)
        s2 = self.enc2(s1)
        z = self.enc3(s2)
        return (s0, s1, s2, z), self.head(z)

    def decode(self, skips: tuple[torch.Tensor, ...], cond: torch.Tensor) -> torch.Tensor:
        """The image (padded size, before ``dab_gain``) drawn from :meth:`encode`'s outputs under
        the level map ``cond``."""
        s0, s1, s2, z = skips
        for blk in self.blocks:
            z = blk(z, cond)
        y = self.up2(z, s2, cond)
        y = self.up1(y, s1, cond)
        y = self.up0(y, s0, cond)
        return torch.tanh(self.out(y))

    def scale_dab(self, img: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Multiply the DAB concentration of ``img`` ([-1, 1] RGB) by the level map ``cond``'s
        mixture of :attr:`dab_gain`, in optical density (Beer-Lambert); the gain ramps in over
        :data:`DAB_GAIN_RAMP` (DAB OD) so that faint background DAB stays unchanged."""
        from .. import stain

        m = torch.as_tensor(stain.HED_MATRIX, dtype=torch.float32, device=img.device)
        gain = torch.as_tensor(self.dab_gain, dtype=torch.float32, device=img.device)
        g = F.interpolate((cond.float() * gain.view(1, -1, 1, 1)).sum(1, keepdim=True), size=img.shape[-2:],
                          mode="bilinear", align_corners=False)
        od = -torch.log10(((img.float() + 1) * 127.5).clamp(min=1.0) / 255.0)
        dab = torch.einsum("nchw,c->nhw", od, torch.linalg.inv(m)[:, 2])[:, None].clamp(min=0.0)
        lo, hi = DAB_GAIN_RAMP  # stained structures only: faint background DAB is left as it is
        w = ((dab - lo) / (hi - lo)).clamp(0.0, 1.0)
        od = od + (g - 1) * w * dab * m[2].view(1, 3, 1, 1)
        return (255.0 * torch.pow(10.0, -od) / 127.5 - 1).clamp(-1, 1).to(img.dtype)

    def forward(self, x: torch.Tensor, level: torch.Tensor | None = None,
                use_level: torch.Tensor | None = None):
        img, dense = self.forward_dense(x, level, use_level)
        return img, dense.float().mean(dim=(2, 3))


def build(config: dict | None = None) -> LevelAwareGenerator:
    """Builder for the architecture registry: ``config`` keys channels, n_blocks, head_channels,
    cond_pool, dab_gain, cond_sharpness."""
    cfg = {**DEFAULTS, **{k: v for k, v in (config or {}).items() if k in DEFAULTS}}
    return LevelAwareGenerator(tuple(cfg["channels"]), int(cfg["n_blocks"]), int(cfg["head_channels"]),
                               int(cfg["n_classes"]), int(cfg["cond_pool"]), cfg["dab_gain"],
                               float(cfg["cond_sharpness"]))


register_arch(ARCH, build)


def load_weights(weights: str | Path, config: dict | None = None, device: str | None = None,
                 name: str | None = None):
    """Load a level-aware safetensors checkpoint (+ its JSON config, beside it or in the
    safetensors metadata) into a :class:`~napari_bci.models.base.TorchGenerator`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ..errors import ModelError
    from .base import TorchGenerator

    weights = Path(weights)
    if not weights.is_file():
        raise ModelError(f"{weights}: weights not found")
    if config is None:
        side = weights.with_suffix(".json")
        if side.is_file():
            config = json.loads(side.read_text())
        else:
            with safe_open(str(weights), framework="pt") as f:
                meta = f.metadata() or {}
            config = json.loads(meta.get("config", "{}"))
    module = build(config)
    state = load_file(str(weights))
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(f"{weights}: does not match the level_aware architecture ({e})") from None
    return TorchGenerator(
        module,
        name=name or config.get("name", weights.stem),
        tile=config.get("tile", 512),
        halo=config.get("halo", 64),
        mpp=config.get("mpp", 0.5),
        multiple=config.get("multiple", LevelAwareGenerator.multiple),
        description=config.get("description", "HER2-level-aware generator"),
        predicts_her2=True,
        device=device,
        config=config,
        source=str(weights),
    )


def builtin_config() -> dict:
    """The shipped model's config / model card (JSON)."""
    from ..errors import ModelError

    if not BUILTIN_CONFIG.is_file():
        raise ModelError(f"{BUILTIN_CONFIG}: the built-in model is missing; train it with scripts/train_builtin.py")
    return json.loads(BUILTIN_CONFIG.read_text())


def load_builtin(device: str | None = None, **_: object):
    """The shipped default generator (``builtin``): a small level-aware model trained on
    synthetic tissue (see docs/model_card.md) -- a demonstration default, not a clinical model."""
    return load_weights(BUILTIN_WEIGHTS, builtin_config(), device=device, name="builtin")


__all__ = ["LevelAwareGenerator", "FiLM", "build", "load_weights", "load_builtin", "builtin_config",
           "HER2_CLASSES", "ARCH"]
