"""The generator interface: RGB H&E tiles in, RGB virtual-IHC tiles out.

Every generator (classical, built-in, user checkpoint, third-party) is a :class:`Generator`.
The tile engine (:mod:`napari_bci.generate.engine`) is the only caller that tiles images; it
relies on the attributes below.

Attributes
----------
``name``           registry name shown to users (layer ``IHC (generated: <name>)``)
``tile``           preferred tile size in pixels (core, without halo)
``halo``           context margin in pixels added on each side of a tile (>= receptive field / 2
                   gives seam-free output); the engine crops/feathers it away
``mpp``            training magnification in micrometres per pixel, or ``None`` (any)
``predicts_her2``  whether :meth:`predict_her2` works
``multiple``       input height and width must be divisible by this (the engine pads)
``description``    one line for users
``window``         native window: the input size the authors run the model at (BCIStainer and
                   ASP: 1024), or ``None`` (any size)
``window_dependent`` whether an output pixel depends on the whole input window (instance norm,
                   SimAM, a global style vector): the engine then runs native windows, feathered
``quantize``       float -> uint8 rule: ``"truncate"`` (upstream ``astype(uint8)``: BCIStainer's
                   unnormalize, CUT/pix2pix ``tensor2im``) or ``"round"``

Torch models are wrapped by :class:`TorchGenerator`, the one place that converts uint8 RGB
``(N, H, W, 3)`` to float ``(N, 3, H, W)`` in [-1, 1] and back, keeps the module in eval mode
and applies the device policy (:mod:`napari_bci.models.device`).

Safetensors + JSON config (how ``load_checkpoint`` reads ``model.safetensors``)
-----------------------------------------------------------------------------
Weights ``X.safetensors`` are paired with a config ``X.json`` in the same folder (or a JSON
string stored under the ``"config"`` key of the safetensors header metadata). Keys::

    {
      "arch": "resnet_9blocks" | "resnet_6blocks" | "unet_256" | "unet_128" | <registered arch>,
      "ngf": 64, "norm": "batch" | "instance" | "none", "use_dropout": false,
      "input_nc": 3, "output_nc": 3,          # optional, defaults shown
      "n_blocks": 9, "num_downs": 8,          # optional overrides of the arch's defaults
      "name": "my-model", "tile": 256, "halo": 32, "mpp": 0.5,
      "predicts_her2": false, "description": "...",
      "her2_classes": ["0", "1+", "2+", "3+"],
      ...                                      # anything else (model card: data, metrics) is kept
    }

Architectures other than the built-in pix2pix ones are registered with
:func:`napari_bci.models.architectures.register_arch` ``(name, builder)`` where
``builder(config: dict) -> torch.nn.Module``; when ``arch`` is unknown the loader imports
``napari_bci.generate.<arch>`` once (so ``level_aware.py`` can register ``"level_aware"`` at
import). A module whose ``forward`` returns ``(image, her2_logits)`` (logits ``(N, 4)``) is a
HER2-predicting generator. The state dict is loaded strictly.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np

from ..errors import ModelError
from ..levels import HER2_LEVELS as HER2_CLASSES  # the order of ``predict_her2`` columns

#: BCIStainer's test-time augmentation: identity, rot90 x1..3, flip left-right, flip up-down,
#: transpose (each its own inverse up to the rotation direction); tiles are ``(N, H, W, 3)``.
TTA_TRANSFORMS = (
    (lambda a: a, lambda a: a),
    (lambda a: np.rot90(a, 1, (1, 2)), lambda a: np.rot90(a, 3, (1, 2))),
    (lambda a: np.rot90(a, 2, (1, 2)), lambda a: np.rot90(a, 2, (1, 2))),
    (lambda a: np.rot90(a, 3, (1, 2)), lambda a: np.rot90(a, 1, (1, 2))),
    (lambda a: a[:, :, ::-1], lambda a: a[:, :, ::-1]),
    (lambda a: a[:, ::-1], lambda a: a[:, ::-1]),
    (lambda a: a.transpose(0, 2, 1, 3), lambda a: a.transpose(0, 2, 1, 3)),
)


def quantize(img: np.ndarray, mode: str) -> np.ndarray:
    """Float RGB in [0, 255] -> uint8 by ``"truncate"`` (numpy ``astype``) or ``"round"``."""
    img = np.clip(img, 0, 255)
    return (np.floor(img) if mode == "truncate" else np.rint(img)).astype(np.uint8)


class Generator:
    """Base class: override :meth:`__call__` (and :meth:`predict_her2` when it applies)."""

    name: str = "generator"
    tile: int = 256
    halo: int = 32
    mpp: float | None = None
    predicts_her2: bool = False
    multiple: int = 1
    description: str = ""
    window: int | None = None
    window_dependent: bool = False
    quantize: str = "round"
    #: where it runs ("cpu", "cuda", "cuda:1", "mps"); plain numpy generators stay on "cpu"
    device: str = "cpu"

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        """``(N, H, W, 3)`` uint8 -> ``(N, H, W, 3)`` uint8 with the same H, W."""
        raise NotImplementedError

    def predict_her2(self, tiles: np.ndarray) -> np.ndarray:
        """``(N, H, W, 3)`` uint8 -> ``(N, 4)`` probabilities for HER2 "0", "1+", "2+", "3+"."""
        raise ModelError(f"generator '{self.name}' does not predict a HER2 level")

    def run_float(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``(float32 images in [0, 255] before quantisation, HER2 probabilities or None)``."""
        probs = self.predict_her2(tiles) if self.predicts_her2 else None
        return self(tiles).astype(np.float32), probs

    def run(self, tiles: np.ndarray, *, tta: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """``(uint8 images, HER2 probabilities or None)``; ``tta``: the mean of the 7
        un-transformed :data:`TTA_TRANSFORMS` outputs (probabilities averaged), quantised once."""
        tiles = check_tiles(tiles)
        img, probs = self.tta_float(tiles) if tta else self.run_float(tiles)
        return quantize(img, self.quantize), probs

    def tta_float(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`run_float` averaged over the un-transformed :data:`TTA_TRANSFORMS` outputs."""
        acc, pacc = None, None
        for fwd, inv in TTA_TRANSFORMS:
            img, probs = self.run_float(np.ascontiguousarray(fwd(tiles)))
            img = inv(img)
            acc = img.astype(np.float32) if acc is None else acc + img
            if probs is not None:
                pacc = probs if pacc is None else pacc + probs
        n = len(TTA_TRANSFORMS)
        return acc / n, None if pacc is None else pacc / n

    def to(self, device: str | None) -> "Generator":
        """Move to ``device`` (no-op for generators that do not use torch); returns self."""
        return self

    def info(self) -> dict:
        """JSON-able description (``napari-bci models --json``)."""
        return {
            "name": self.name,
            "tile": int(self.tile),
            "halo": int(self.halo),
            "mpp": None if self.mpp is None else float(self.mpp),
            "predicts_her2": bool(self.predicts_her2),
            "multiple": int(self.multiple),
            "window": None if self.window is None else int(self.window),
            "window_dependent": bool(self.window_dependent),
            "description": self.description,
            "device": self.device,
        }

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} tile={self.tile} halo={self.halo} on {self.device}>"


def check_tiles(tiles: Any) -> np.ndarray:
    """Validate and return a ``(N, H, W, 3)`` uint8 array."""
    arr = np.asarray(tiles)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) RGB tiles, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return arr


class TorchGenerator(Generator):
    """A :class:`Generator` around a ``torch.nn.Module`` mapping [-1, 1] images to [-1, 1] images.

    The module is put in eval mode with gradients off (dropout off, batch-norm running
    statistics used: deterministic). If its forward returns ``(image, her2_logits)``,
    ``predicts_her2`` is True (probed once on a small input unless given).
    """

    def __init__(
        self,
        module,
        *,
        name: str = "torch",
        tile: int = 256,
        halo: int = 32,
        mpp: float | None = None,
        multiple: int = 1,
        description: str = "",
        predicts_her2: bool | None = None,
        device: str | None = None,
        config: dict | None = None,
        source: str | None = None,
        window: int | None = None,
        window_dependent: bool = False,
        quantize: str = "round",
        family: str | None = None,
    ):
        import torch

        self.module = module
        self.name = name
        self.tile = int(tile)
        self.halo = int(halo)
        self.mpp = None if mpp is None else float(mpp)
        self.multiple = max(1, int(multiple))
        self.description = description
        self.config = dict(config or {})
        self.source = source
        self.window = None if window is None else int(window)
        self.window_dependent = bool(window_dependent)
        if quantize not in ("round", "truncate"):
            raise ModelError(f"unknown quantize rule '{quantize}' (round or truncate)")
        self.quantize = quantize
        self.family = family
        self._lock = threading.Lock()
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.device = "cpu"
        self._torch = torch
        self.to(device)
        if predicts_her2 is None:
            predicts_her2 = bool(getattr(module, "predicts_her2", False)) or self._probe_her2()
        self.predicts_her2 = bool(predicts_her2)

    # -- device ---------------------------------------------------------------------------
    def to(self, device: str | None) -> "TorchGenerator":
        from .device import resolve_device

        dev = resolve_device(device)
        with self._lock:
            self.module.to(dev)
            if dev != "mps":  # channels_last: faster convolutions on CUDA and CPU (oneDNN)
                try:
                    self.module.to(memory_format=self._torch.channels_last)
                except (TypeError, RuntimeError):
                    pass
            self.device = dev
        return self

    # -- conversion (the one place) -----------------------------------------------------------
    def _to_tensor(self, tiles: np.ndarray):
        torch = self._torch
        t = torch.from_numpy(np.ascontiguousarray(tiles)).to(self.device, non_blocking=True)
        t = t.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        if self.device != "mps":
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    def _to_uint8(self, img) -> np.ndarray:
        out = img.float().add(1.0).mul(127.5).round_().clamp_(0, 255).to(self._torch.uint8)
        return out.permute(0, 2, 3, 1).contiguous().cpu().numpy()

    def _forward(self, tiles: np.ndarray):
        from .device import autocast

        torch = self._torch
        tiles = check_tiles(tiles)
        h, w = tiles.shape[1:3]
        if h % self.multiple or w % self.multiple:
            raise ValueError(f"{self.name}: tile size {h}x{w} is not a multiple of {self.multiple}")
        with self._lock, torch.inference_mode(), autocast(self.device):
            out = self.module(self._to_tensor(tiles))
        if isinstance(out, (tuple, list)):
            img = out[0]
            logits = out[1] if len(out) > 1 else None
        else:
            img, logits = out, None
        return img, logits

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        img, _ = self._forward(tiles)
        if self.quantize == "truncate":
            return quantize(self._to_float(img), "truncate")
        return self._to_uint8(img)

    def _to_float(self, img) -> np.ndarray:
        """[-1, 1] -> [0, 255] float32 as upstream ``tensor2im``/unnormalize compute it."""
        out = img.float().clamp(-1.0, 1.0).add(1.0).div(2.0).mul(255.0)
        return out.permute(0, 2, 3, 1).contiguous().cpu().numpy()

    def run_float(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        img, logits = self._forward(tiles)
        probs = None
        if self.predicts_her2 and logits is not None:
            probs = self._torch.softmax(logits.float(), dim=1).cpu().numpy()
        return self._to_float(img), probs

    def predict_her2(self, tiles: np.ndarray) -> np.ndarray:
        if not self.predicts_her2:
            return super().predict_her2(tiles)
        _, logits = self._forward(tiles)
        if logits is None:
            raise ModelError(f"generator '{self.name}' returned no HER2 logits")
        return self._torch.softmax(logits.float(), dim=1).cpu().numpy()

    def _probe_her2(self) -> bool:
        s = max(64, self.multiple, min(self.window or 0, 256))
        try:
            _, logits = self._forward(np.full((1, s, s, 3), 200, np.uint8))
        except Exception:
            return False
        return logits is not None

    def info(self) -> dict:
        d = super().info()
        d["parameters"] = int(sum(p.numel() for p in self.module.parameters()))
        if self.config.get("arch"):
            d["arch"] = self.config["arch"]
        if self.family:
            d["family"] = self.family
        d["quantize"] = self.quantize
        if self.source:
            d["source"] = self.source
        return d


class FunctionGenerator(Generator):
    """A generator from a plain function ``f(tiles_uint8) -> tiles_uint8`` (tests, plugins)."""

    def __init__(self, func: Callable[[np.ndarray], np.ndarray], *, name: str, tile: int = 256,
                 halo: int = 0, mpp: float | None = None, description: str = ""):
        self.func = func
        self.name, self.tile, self.halo, self.mpp = name, int(tile), int(halo), mpp
        self.description = description

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        return np.asarray(self.func(check_tiles(tiles)), dtype=np.uint8)


class TTAGenerator(Generator):
    """``generator`` with BCIStainer's test-time augmentation (:meth:`Generator.run` with
    ``tta=True``): 7x the compute; its own name so caches keep the two apart."""

    def __init__(self, generator: Generator):
        self.base = generator
        for k in ("tile", "halo", "mpp", "predicts_her2", "multiple", "window", "window_dependent",
                  "quantize", "device"):
            setattr(self, k, getattr(generator, k))
        self.name = f"{generator.name}+tta"
        self.source = getattr(generator, "source", None)
        self.config = getattr(generator, "config", {})
        self.description = f"{generator.description} (test-time augmentation: 7 flips/rotations averaged)"

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        return self.base.run(tiles, tta=True)[0]

    def run_float(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return self.base.tta_float(check_tiles(tiles))

    def tta_float(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return self.run_float(tiles)

    def predict_her2(self, tiles: np.ndarray) -> np.ndarray:
        probs = self.base.run(tiles, tta=True)[1]
        if probs is None:
            return self.base.predict_her2(tiles)
        return probs

    def to(self, device: str | None) -> "TTAGenerator":
        self.base.to(device)
        self.device = self.base.device
        return self

    def info(self) -> dict:
        return {**self.base.info(), "name": self.name, "tta": True, "description": self.description}


def with_tta(generator: Generator) -> Generator:
    """``generator`` wrapped with test-time augmentation (unchanged if already wrapped)."""
    return generator if isinstance(generator, TTAGenerator) else TTAGenerator(generator)
