"""Training: PyramidPix2pix and the HER2-level-aware generator (``napari-bci train``).

Data: a BCI-layout folder (``HE/{train,test}``, ``IHC/{train,test}``, level in the file name)
or synthetic pairs from :func:`napari_bci.samples.synthetic.make_pair`, aligned with their
registration truth (the H&E is warped onto the IHC frame, as BCI aligned its pairs, and only
fully valid crops are used).

Objective (generator): PyramidPix2pix's L1 at full, 1/2, 1/4, 1/8 scale (each weight 25,
:class:`~napari_bci.train.losses.PyramidL1`) + ``gan_weight`` x GAN loss against a
conditional PatchGAN (``gan_ndf`` filters) + ``ssim_weight`` x (1 - SSIM) + ``dab_weight`` x the
membrane DAB loss (:class:`~napari_bci.train.losses.MembraneDabLoss`, its options from ``dab_options``:
``strength``, ``pixel``, ``match``, ``balance``) + for the level-aware model
``focal_weight`` x focal loss of its HER2 head on the slide-level label. ``teacher_forcing``: the
fraction of level-aware training samples whose decoder is conditioned on the true level instead
of the head's prediction (so the decoder learns to render each level; the head learns it only
through the focal loss on those samples).

Every epoch: validation PSNR/SSIM (BCI-exact, :func:`bci_psnr_ssim`), HER2 level accuracy and
mean DAB optical density of the output per level, a resumable checkpoint
(``checkpoint.pt`` of plain tensors, loaded with ``weights_only=True``, + ``checkpoint.json``).
At the end: ``model.safetensors`` + ``model.json`` (config and model card) that
:func:`napari_bci.models.registry.load_generator` loads.

Crops are drawn by a per-sample seeded RNG (``(seed, sample index)``), so a run is reproducible
and a resumed run sees exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import InputError
from ..models.base import HER2_CLASSES

LEVEL_INDEX = {name: i for i, name in enumerate(HER2_CLASSES)}
ARCHS = ("level_aware", "resnet_9blocks", "resnet_6blocks", "unet_256")


# -- metrics (the one helper: BCI's evaluate.py semantics) ------------------------------------------
def bci_psnr_ssim(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """PSNR (data range 255) and SSIM (7x7 uniform window on colour uint8, mean over channels),
    as the BCI challenge's ``evaluate.py`` computes them with scikit-image."""
    from ..metrics import bci

    return float(bci.psnr(pred, gt)), float(bci.ssim(pred, gt))


# -- data -----------------------------------------------------------------------------------------
@dataclass
class Pair:
    """One aligned H&E/IHC pair, in memory (``he``/``ihc``) or on disk (``he_path``/``ihc_path``).

    ``valid`` marks pixels where the aligned H&E is defined (None: all)."""

    level: int
    name: str
    he: np.ndarray | None = None
    ihc: np.ndarray | None = None
    valid: np.ndarray | None = None
    he_path: Path | None = None
    ihc_path: Path | None = None

    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        if self.he is not None:
            return self.he, self.ihc, self.valid
        from ..io.patches import read_patch

        return read_patch(self.he_path), read_patch(self.ihc_path), None


def read_bci_folder(root: str | os.PathLike, split: str = "train") -> list[Pair]:
    """The ``split`` pairs of a BCI folder (``HE/<split>/NNNNN_<split>_<level>.png`` with the
    same name under ``IHC/<split>``), indexed by :func:`napari_bci.io.bci.open_bci_folder`."""
    from ..io.bci import open_bci_folder

    ds = open_bci_folder(root)
    pairs = [Pair(LEVEL_INDEX[p.her2], Path(p.name).stem, he_path=Path(p.he_path), ihc_path=Path(p.ihc_path))
             for p in ds.filter(split=split) if p.ihc_path is not None]
    if not pairs:
        raise InputError(root, f"no paired '{split}' images (expected HE/{split} and IHC/{split})")
    return pairs


def align_pair(he: np.ndarray, ihc: np.ndarray, transform, erode: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Warp ``he`` onto the IHC frame with the registration ``transform`` (H&E -> IHC); returns
    the aligned H&E and the mask of pixels that came from inside the H&E (eroded a little so
    that interpolated border pixels are excluded)."""
    from scipy import ndimage as ndi

    shape = ihc.shape[:2]
    he_al = transform.warp_image(he, shape, cval=255)
    inside = transform.warp_image(np.ones(he.shape[:2], np.uint8), shape, order=0, cval=0) > 0
    if erode:
        inside = ndi.binary_erosion(inside, iterations=erode)
    return he_al, inside


def valid_box(valid: np.ndarray | None, shape: tuple[int, int], multiple: int = 1) -> tuple[int, int, int, int]:
    """A large axis-aligned box ``(y0, y1, x0, x1)`` inside ``valid`` (greedy border peeling),
    its sides trimmed to a multiple of ``multiple``."""
    h, w = shape
    y0, y1, x0, x1 = 0, h, 0, w
    if valid is not None:
        while y1 - y0 > 8 and x1 - x0 > 8:
            sub = valid[y0:y1, x0:x1]
            if sub.all():
                break
            bad = {"top": (~sub[0]).sum(), "bottom": (~sub[-1]).sum(), "left": (~sub[:, 0]).sum(),
                   "right": (~sub[:, -1]).sum()}
            side = max(bad, key=bad.get)
            if side == "top":
                y0 += 1
            elif side == "bottom":
                y1 -= 1
            elif side == "left":
                x0 += 1
            else:
                x1 -= 1
    hh, ww = (y1 - y0) // multiple * multiple, (x1 - x0) // multiple * multiple
    y0 += (y1 - y0 - hh) // 2
    x0 += (x1 - x0 - ww) // 2
    return y0, y0 + hh, x0, x0 + ww


def synthetic_pairs(n: int, size: int = 512, seed: int = 0, levels: Sequence[str] = HER2_CLASSES,
                    cache_dir: str | os.PathLike | None = None, progress: bool = False) -> list[Pair]:
    """``n`` synthetic pairs (levels cycled, seeds ``seed .. seed+n-1``) from the sample
    generator, aligned with their registration truth. Cached as ``.npz`` in ``cache_dir``."""
    from tqdm import tqdm

    levels = list(levels)
    cache = None
    if cache_dir is not None:
        tag = "-".join(lv.replace("+", "p") for lv in levels)
        cache = Path(cache_dir) / f"synthetic_n{n}_s{size}_seed{seed}_{tag}.npz"
        if cache.is_file():
            with np.load(cache) as z:  # each z[key] reads the whole array: read each once
                he, ihc, valid, level, name = (z[k] for k in ("he", "ihc", "valid", "level", "name"))
            return [Pair(int(level[i]), str(name[i]), he[i], ihc[i], valid[i]) for i in range(n)]
    from ..samples.synthetic import make_pair

    pairs = []
    for i in tqdm(range(n), desc="synthetic pairs", disable=not progress, file=sys.stderr):
        level = levels[i % len(levels)]
        s = make_pair(her2=level, size=size, seed=seed + i, mpp=0.5)
        he_al, inside = align_pair(s.he, s.ihc, s.truth.transform)
        pairs.append(Pair(LEVEL_INDEX[level], f"synthetic_{seed + i}_{level}", he_al,
                          np.ascontiguousarray(s.ihc), inside))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, he=np.stack([p.he for p in pairs]), ihc=np.stack([p.ihc for p in pairs]),
                 valid=np.stack([p.valid for p in pairs]), level=np.array([p.level for p in pairs]),
                 name=np.array([p.name for p in pairs]))
        os.replace(tmp, cache)
    return pairs


class CropDataset:
    """Map-style dataset: sample ``k`` is a random (fully valid) ``crop`` x ``crop`` window of a
    random pair with a random dihedral augmentation, all drawn from ``rng((seed, k))``.
    Returns ``(he, ihc, level)`` tensors, images ``(3, crop, crop)`` in [-1, 1]."""

    def __init__(self, pairs: Sequence[Pair], crop: int, seed: int = 0, augment: bool = True):
        self.pairs, self.crop, self.seed, self.augment = list(pairs), int(crop), int(seed), augment
        self._integral: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return 2**62

    def _window(self, i: int, valid, shape, rng) -> tuple[int, int]:
        h, w = shape
        c = self.crop
        if valid is None:
            return int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
        ii = self._integral.get(i)
        if ii is None:
            ii = np.pad((~valid).astype(np.int32).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
            self._integral[i] = ii
        best, best_bad = (0, 0), None
        for _ in range(30):
            y, x = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
            bad = ii[y + c, x + c] - ii[y, x + c] - ii[y + c, x] + ii[y, x]
            if bad == 0:
                return y, x
            if best_bad is None or bad < best_bad:
                best, best_bad = (y, x), bad
        return best

    def __getitem__(self, k: int):
        import torch

        rng = np.random.default_rng([self.seed, int(k)])
        i = int(rng.integers(len(self.pairs)))
        he, ihc, valid = self.pairs[i].load()
        h, w = ihc.shape[:2]
        if he.shape[:2] != (h, w):
            raise InputError(self.pairs[i].he_path or self.pairs[i].name,
                             f"H&E {he.shape[:2]} and IHC {(h, w)} differ in size")
        if min(h, w) < self.crop:
            raise InputError(self.pairs[i].he_path or self.pairs[i].name,
                             f"image {h}x{w} is smaller than the crop {self.crop}")
        y, x = self._window(i, valid, (h, w), rng)
        a = he[y : y + self.crop, x : x + self.crop]
        b = ihc[y : y + self.crop, x : x + self.crop]
        if self.augment:
            r, flip = int(rng.integers(4)), bool(rng.integers(2))
            a, b = np.rot90(a, r), np.rot90(b, r)
            if flip:
                a, b = a[:, ::-1], b[:, ::-1]

        def t(img):
            return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div(127.5).sub(1.0)

        return t(a), t(b), torch.tensor(self.pairs[i].level)


# -- models ---------------------------------------------------------------------------------------
def model_config(arch: str, *, name: str, mpp: float | None = 0.5, norm: str = "batch",
                 use_dropout: bool = False, ngf: int = 64, extra: dict | None = None) -> dict:
    """The JSON config (base.py convention) for an architecture trained here."""
    from ..models import architectures

    if arch == "level_aware":
        from ..models import level_aware

        cfg = {"arch": arch, **level_aware.DEFAULTS, "name": name, "tile": 512, "halo": 64, "mpp": mpp,
               "multiple": level_aware.LevelAwareGenerator.multiple, "predicts_her2": True,
               "her2_classes": list(HER2_CLASSES),
               "description": "HER2-level-aware generator (level head + FiLM-conditioned decoder)"}
    elif arch in architectures.ARCH_DEFAULTS:
        cfg = {"arch": arch, "ngf": ngf, "norm": norm, "use_dropout": use_dropout, "name": name, "mpp": mpp,
               "predicts_her2": False, "description": f"PyramidPix2pix {arch}"}
        cfg["tile"] = 256 if arch.startswith("unet") else 512
        cfg["multiple"] = architectures.size_multiple(cfg)
        cfg["halo"] = 0 if arch.startswith("unet") else architectures.receptive_radius(cfg)
    else:
        raise InputError(None, f"unknown architecture '{arch}' (choose from {', '.join(ARCHS)})")
    cfg.update(extra or {})
    return cfg


def build_generator(config: dict):
    from ..models import architectures

    if config["arch"] == "level_aware":
        from ..models import level_aware  # noqa: F401  (registers the arch)
    return architectures.build(config)


def _split_output(out):
    if isinstance(out, (tuple, list)):
        return out[0], (out[1] if len(out) > 1 else None)
    return out, None


def _run_whole(G, he: np.ndarray, multiple: int, device: str):
    """Run ``G`` (eval mode) on one whole uint8 image; returns (uint8 image, logits or None)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(he)).permute(2, 0, 1)[None].float().div(127.5).sub(1.0).to(device)
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect")
    with torch.inference_mode():
        img, logits = _split_output(G(x))
    img = img[..., :h, :w].float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    out = img[0].permute(1, 2, 0).cpu().numpy()
    return out, (None if logits is None else logits.float().cpu().numpy()[0])


def membrane_dab(result) -> float:
    """Mean membrane DAB OD of a HER2 scoring result: its per-cell membrane intensity averaged
    over the tumour cells (0 for an unstained cell)."""
    t = np.asarray(result.tumour, bool)
    return float(np.asarray(result.intensity)[t].mean()) if t.any() else 0.0


def evaluate_pairs(G, pairs: Sequence[Pair], multiple: int = 16, device: str = "cpu",
                   generator: Callable[[np.ndarray], np.ndarray] | None = None, score: bool = False) -> dict:
    """BCI-exact PSNR/SSIM on each pair's valid box, HER2 accuracy of the logits (if any) and
    the mean DAB OD of the output per true level. ``generator`` (uint8 -> uint8) replaces ``G``
    (e.g. to score the classical baseline on the same pairs). ``score=True`` adds the rule-based
    HER2 score (:func:`napari_bci.her2.score`) of the output and of the real IHC per pair
    (``"scored"``: name, true, generated, real, and the share of tumour cells with faint or
    stronger membrane staining in each, ``stained_generated``, ``stained_real``) and their mean
    membrane DAB OD per level
    (``"membrane_dab_by_level"``: generated, real)."""
    from .. import stain

    psnrs, ssims, correct, n_pred = [], [], 0, 0
    dab: dict[str, list[float]] = {lv: [] for lv in HER2_CLASSES}
    per_level: dict[str, dict[str, list[float]]] = {lv: {"psnr": [], "ssim": []} for lv in HER2_CLASSES}
    scored: list[dict] = []
    mem: dict[str, list[tuple[float, float]]] = {lv: [] for lv in HER2_CLASSES}
    for p in pairs:
        he, ihc, valid = p.load()
        y0, y1, x0, x1 = valid_box(valid, ihc.shape[:2], multiple)
        he_c, gt = he[y0:y1, x0:x1], ihc[y0:y1, x0:x1]
        if generator is not None:
            pred, logits = generator(he_c[None])[0], None
        else:
            pred, logits = _run_whole(G, he_c, multiple, device)
        ps, ss = bci_psnr_ssim(pred, gt)
        lv = HER2_CLASSES[p.level]
        psnrs.append(ps)
        ssims.append(ss)
        per_level[lv]["psnr"].append(ps)
        per_level[lv]["ssim"].append(ss)
        dab[lv].append(float(stain.dab(pred).mean()))
        if score:
            from ..her2 import score as her2_score

            s_gen, s_real = her2_score(pred, mpp=0.5), her2_score(gt, mpp=0.5)
            scored.append({"name": p.name, "true": lv, "generated": s_gen.her2, "real": s_real.her2,
                           "stained_generated": s_gen.fractions["any"], "stained_real": s_real.fractions["any"]})
            mem[lv].append((membrane_dab(s_gen), membrane_dab(s_real)))
        if logits is not None:
            n_pred += 1
            correct += int(np.argmax(logits) == p.level)
    res = {
        "n": len(pairs),
        "psnr": float(np.mean(psnrs)) if psnrs else float("nan"),
        "ssim": float(np.mean(ssims)) if ssims else float("nan"),
        "her2_accuracy": (correct / n_pred) if n_pred else None,
        "dab_od_by_level": {lv: float(np.mean(v)) for lv, v in dab.items() if v},
        "per_level": {lv: {k: float(np.mean(v)) for k, v in d.items()} for lv, d in per_level.items() if d["psnr"]},
    }
    if score:
        res["scored"] = scored
        res["her2_scored_correct"] = sum(r["generated"] == r["true"] for r in scored)
        res["her2_real_correct"] = sum(r["real"] == r["true"] for r in scored)
        res["membrane_dab_by_level"] = {lv: {"generated": float(np.mean([a for a, _ in v])),
                                             "real": float(np.mean([b for _, b in v]))}
                                        for lv, v in mem.items() if v}
    return res


# -- checkpoints ----------------------------------------------------------------------------------
def _atomic_torch_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def export_model(G, config: dict, path: str | os.PathLike) -> Path:
    """Write ``path`` (``.safetensors``, the config also in its metadata) and ``path.json``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.detach().cpu().contiguous()
             for k, v in G.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"config": json.dumps(config), "format": "napari-bci"})
    os.replace(tmp, path)
    _atomic_text(path.with_suffix(".json"), json.dumps(config, indent=2) + "\n")
    return path


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


# -- the loop -------------------------------------------------------------------------------------
def train(
    train_pairs: Sequence[Pair],
    val_pairs: Sequence[Pair],
    out_dir: str | os.PathLike,
    *,
    arch: str = "level_aware",
    epochs: int | None = None,
    steps: int | None = None,
    batch: int = 4,
    crop: int = 256,
    lr: float = 2e-4,
    l1_weight: float = 25.0,
    ssim_weight: float = 0.0,
    gan_weight: float = 1.0,
    focal_weight: float = 1.0,
    dab_weight: float = 0.0,
    dab_options: dict | None = None,
    teacher_forcing: float = 0.0,
    gan_ndf: int = 64,
    init: str | os.PathLike | None = None,
    seed: int = 0,
    device: str | None = None,
    resume: bool = False,
    stop_at: int | None = None,
    workers: int = 0,
    name: str | None = None,
    mpp: float | None = 0.5,
    norm: str = "batch",
    use_dropout: bool = False,
    data_info: dict | None = None,
    model_options: dict | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Train a generator; returns the report (also written into ``out_dir/model.json``).

    ``stop_at``: stop (with a checkpoint, no export) once this step is reached; ``resume=True``
    continues exactly where it stopped. ``init``: a generator safetensors (same architecture and
    options) to start from instead of a random initialisation (fine-tuning). ``model_options`` override architecture options in the config (e.g. ``{"channels": [12, 24,
    48, 96]}`` for ``level_aware``, ``{"ngf": 32}`` for the pix2pix ones)."""
    import torch
    from tqdm import tqdm

    from ..models.device import resolve_device
    from .losses import GANLoss, MembraneDabLoss, PyramidL1, focal_loss, ssim_loss
    from .patchgan import NLayerDiscriminator, init_weights

    log = log or (lambda s: print(s, file=sys.stderr))
    if not train_pairs:
        raise InputError(None, "no training pairs")
    if batch < 1 or crop < 16:
        raise InputError(None, "batch must be >= 1 and crop >= 16")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    cuda = dev.startswith("cuda")
    name = name or out.name

    config = model_config(arch, name=name, mpp=mpp, norm=norm, use_dropout=use_dropout, extra=model_options)
    multiple = int(config.get("multiple", 1))
    if crop % multiple:
        raise InputError(None, f"--crop {crop} must be a multiple of {multiple} for {arch}")
    level_aware = bool(config.get("predicts_her2"))

    spe_default = max(1, math.ceil(len(train_pairs) / batch))
    if steps and epochs:
        spe, total = max(1, math.ceil(steps / epochs)), int(steps)
    elif steps:
        spe, total = spe_default, int(steps)
    else:
        spe, total = spe_default, (epochs or 10) * spe_default
    n_epochs = math.ceil(total / spe)

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    G = build_generator(config)
    if arch != "level_aware":
        init_weights(G)
    if init is not None:
        from safetensors.torch import load_file

        try:
            G.load_state_dict(load_file(str(init)), strict=True)
        except (OSError, RuntimeError) as e:
            raise InputError(init, f"cannot start from these weights ({e})") from None
    G.to(dev)
    D = None
    if gan_weight > 0:
        D = init_weights(NLayerDiscriminator(6, gan_ndf, 3, norm=norm)).to(dev)
    optG = torch.optim.Adam(G.parameters(), lr=lr, betas=(0.5, 0.999))
    optD = torch.optim.Adam(D.parameters(), lr=lr, betas=(0.5, 0.999)) if D is not None else None
    amp_dtype = None
    if cuda:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    pyramid = PyramidL1((l1_weight,) * 4)
    gan = GANLoss("vanilla")
    dab_loss = MembraneDabLoss(**(dab_options or {}))

    state = {"step": 0, "history": [], "wall_s": 0.0}
    ck_pt, ck_js = out / "checkpoint.pt", out / "checkpoint.json"
    if resume:
        if not (ck_pt.is_file() and ck_js.is_file()):
            raise InputError(out, "--resume: no checkpoint.pt/checkpoint.json here")
        meta = json.loads(ck_js.read_text())
        if meta.get("config", {}).get("arch") != arch:
            raise InputError(ck_js, f"checkpoint is for arch '{meta.get('config', {}).get('arch')}', not '{arch}'")
        ck = torch.load(ck_pt, map_location=dev, weights_only=True)
        G.load_state_dict(ck["G"])
        optG.load_state_dict(ck["optG"])
        if D is not None:
            if "D" not in ck:
                raise InputError(ck_pt, "checkpoint has no discriminator (trained with --gan-weight 0)")
            D.load_state_dict(ck["D"])
            optD.load_state_dict(ck["optD"])
        if "scaler" in ck and scaler.is_enabled():
            scaler.load_state_dict(ck["scaler"])
        state.update(step=int(meta["step"]), history=meta.get("history", []), wall_s=float(meta.get("wall_s", 0)))
        log(f"resumed from {ck_pt} at step {state['step']}")

    def save_checkpoint():
        ck = {"G": G.state_dict(), "optG": optG.state_dict()}
        if D is not None:
            ck.update(D=D.state_dict(), optD=optD.state_dict())
        if scaler.is_enabled():
            ck["scaler"] = scaler.state_dict()
        _atomic_torch_save(ck, ck_pt)
        _atomic_text(ck_js, json.dumps(_json_safe({"step": state["step"], "total_steps": total,
                                                   "history": state["history"], "wall_s": state["wall_s"],
                                                   "config": config}), indent=1))

    dataset = CropDataset(train_pairs, crop, seed=seed)
    start = state["step"]
    if stop_at is not None and start >= stop_at and start < total:
        return {"stopped": True, "steps": start, "total_steps": total, "checkpoint": str(ck_pt), "losses": []}
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, sampler=range(start * batch, total * batch), num_workers=workers,
        drop_last=True, pin_memory=cuda, persistent_workers=False,
    )

    def lr_at(step):  # pix2pix 'linear': constant for the first half, then linear to 0
        half = total / 2
        return lr * min(1.0, max(0.0, (total - step) / max(half, 1)))

    def autocast():
        return torch.autocast("cuda", dtype=amp_dtype) if cuda else torch.autocast("cpu", enabled=False)

    G.train()
    if D is not None:
        D.train()
    losses_log: list[float] = []
    t0 = time.time()
    bar = tqdm(total=total, initial=start, desc=f"train {arch}", disable=(None if progress is None else not progress),
               file=sys.stderr, dynamic_ncols=True)
    step = start
    ep_loss = []
    try:
        for he, ihc, level in loader:
            he, ihc, level = he.to(dev, non_blocking=True), ihc.to(dev, non_blocking=True), level.to(dev)
            for opt in (optG, optD):
                if opt is not None:
                    for g in opt.param_groups:
                        g["lr"] = lr_at(step)
            with autocast():
                if level_aware and teacher_forcing > 0:
                    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
                    use = (torch.rand(he.shape[0], generator=g) < teacher_forcing).to(dev)
                    fake, logits = _split_output(G(he, level, use))
                else:
                    fake, logits = _split_output(G(he))
            parts = {}
            if D is not None:  # discriminator step (pix2pix: fake detached, 0.5 x (real + fake))
                for p in D.parameters():
                    p.requires_grad_(True)
                with autocast():
                    pf = D(torch.cat([he, fake.detach()], 1))
                    pr = D(torch.cat([he, ihc], 1))
                loss_d = 0.5 * (gan(pf, False) + gan(pr, True))
                optD.zero_grad(set_to_none=True)
                scaler.scale(loss_d).backward()
                scaler.step(optD)
                parts["D"] = float(loss_d.detach())
                for p in D.parameters():
                    p.requires_grad_(False)
            l1, _ = pyramid(fake.float(), ihc)
            loss = l1
            parts["L1"] = float(l1.detach())
            if ssim_weight > 0:
                ls = ssim_loss(fake.float(), ihc)
                loss = loss + ssim_weight * ls
                parts["ssim"] = float(ls.detach())
            if dab_weight > 0:
                ld = dab_loss(fake.float(), ihc)
                loss = loss + dab_weight * ld
                parts["dab"] = float(ld.detach())
            if level_aware and logits is not None and focal_weight > 0:
                lf = focal_loss(logits, level)
                loss = loss + focal_weight * lf
                parts["focal"] = float(lf.detach())
            if D is not None:
                with autocast():
                    pg = D(torch.cat([he, fake], 1))
                lg = gan(pg, True)
                loss = loss + gan_weight * lg
                parts["G_gan"] = float(lg.detach())
            optG.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optG)
            scaler.update()
            step += 1
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise RuntimeError(f"training diverged at step {step} (loss {lv}); lower --lr")
            losses_log.append(lv)
            ep_loss.append(lv)
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in parts.items()}, refresh=False)
            if step % spe == 0 or step == total:
                epoch = math.ceil(step / spe)
                G.eval()
                val = evaluate_pairs(G, val_pairs, multiple, dev) if val_pairs else {}
                G.train()
                state["wall_s"] += time.time() - t0
                t0 = time.time()
                rec = {"epoch": epoch, "step": step, "loss": float(np.mean(ep_loss)), "lr": lr_at(step), **val}
                state["history"].append(_json_safe(rec))
                state["step"] = step
                ep_loss = []
                save_checkpoint()
                msg = f"epoch {epoch}/{n_epochs} step {step}/{total} loss {rec['loss']:.4g}"
                if val:
                    msg += f" | val PSNR {val['psnr']:.3f} SSIM {val['ssim']:.4f}"
                    if val.get("her2_accuracy") is not None:
                        msg += f" HER2 acc {val['her2_accuracy']:.3f}"
                log(msg)
            if stop_at is not None and step >= stop_at and step < total:
                state["wall_s"] += time.time() - t0
                state["step"] = step
                save_checkpoint()
                log(f"stopped at step {step}/{total}; continue with --resume")
                return {"stopped": True, "steps": step, "total_steps": total, "checkpoint": str(ck_pt),
                        "losses": losses_log}
    finally:
        bar.close()

    G.eval()
    final = state["history"][-1] if state["history"] else {}
    config.update({
        "training": _json_safe({
            "data": data_info or {"train_pairs": len(train_pairs), "val_pairs": len(val_pairs)},
            "train_pairs": len(train_pairs), "val_pairs": len(val_pairs),
            "steps": state["step"], "epochs": n_epochs, "steps_per_epoch": spe, "batch": batch, "crop": crop,
            "lr": lr, "loss": {"pyramid_l1_weights": [l1_weight] * 4, "gan": gan_weight, "gan_ndf": gan_ndf,
                               "ssim": ssim_weight, "membrane_dab": dab_weight,
                               "membrane_dab_options": dict(dab_options or {}),
                               "focal": focal_weight if level_aware else 0.0},
            "teacher_forcing": teacher_forcing if level_aware else 0.0,
            "init": None if init is None else Path(init).name,
            "seed": seed, "device": dev, "wall_s": round(state["wall_s"], 1),
            "torch": torch.__version__,
        }),
        "metrics": _json_safe({k: final[k] for k in ("psnr", "ssim", "her2_accuracy", "dab_od_by_level", "n")
                               if k in final}),
        "history": state["history"],
    })
    weights = export_model(G, config, out / "model.safetensors")
    return {"weights": str(weights), "config": str(weights.with_suffix(".json")), "arch": arch,
            "steps": state["step"], "epochs": n_epochs, "first_loss": losses_log[0] if losses_log else None,
            "last_loss": losses_log[-1] if losses_log else None, "metrics": config["metrics"],
            "history": [{k: h.get(k) for k in ("epoch", "step", "loss", "psnr", "ssim", "her2_accuracy")}
                        for h in state["history"]]}
