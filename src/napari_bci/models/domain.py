"""Out-of-domain check: is an H&E image like the tissue a generator was trained on?

A generator's config may carry ``"domain"``: the mean and covariance of colour and texture
statistics of its training H&E (:func:`domain_features`), recorded when it was trained
(``scripts/train_builtin.py`` records them for the built-in model, whose training tissue is
synthetic). :func:`check_domain` measures the same features on an image and returns a one-line
warning when their Mahalanobis distance from the training distribution exceeds ``threshold``
(6: a chi-square tail probability below 1e-5 for six Gaussian features), else None;
:func:`check_folder_domain` judges a few images of a folder run. Headless: the CLI prints the
warning, the Virtual IHC widget shows it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

#: Statistics over tissue pixels of the central crop (see :func:`domain_features`).
FEATURES = ("h_mean", "e_mean", "h_sd", "e_sd", "residual_sd", "fine_texture")
#: Side of the central crop (px) the features are measured on: the model's own resolution.
CROP = 768
#: Fewer tissue pixels than this fraction of the crop: not enough to judge (no warning).
MIN_TISSUE = 0.05
#: Mahalanobis distance from the training features beyond which an image is out of domain.
THRESHOLD = 6.0

REAL_TISSUE_MODELS = ("a published BCI model trained on real tissue (BCIStainer or ASP weights, "
                      "loaded with --model / the widget's model menu)")


def domain_features(rgb: np.ndarray, crop: int = CROP) -> dict[str, float] | None:
    """Colour and texture statistics of an RGB H&E image's central ``crop`` x ``crop`` px, over
    tissue pixels (OD sum above 0.3): mean and SD of the hematoxylin and eosin concentrations
    (Ruifrok-Johnston, :data:`napari_bci.stain.HE_MATRIX`), SD of the deconvolution residual
    and the mean absolute 3x3 high-pass of the grey level (fine texture, in grey levels).
    None when the crop holds too little tissue."""
    from scipy import ndimage as ndi

    from .. import stain

    a = np.asarray(rgb)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        return None
    h, w = a.shape[:2]
    y0, x0 = max(0, (h - crop) // 2), max(0, (w - crop) // 2)
    c = np.asarray(a[y0 : y0 + crop, x0 : x0 + crop, :3], dtype=np.float32)
    if c.size and c.max() <= 1.0 and np.issubdtype(np.asarray(a).dtype, np.floating):
        c = c * 255.0
    tissue = stain.rgb_to_od(c).sum(-1) > 0.3
    if tissue.mean() < MIN_TISSUE or tissue.sum() < 1000:
        return None
    conc = stain.separate(c, stain.HE_MATRIX)[tissue]
    g = c.mean(-1)
    hp = np.abs(g - ndi.uniform_filter(g, 3))[tissue]
    return {"h_mean": float(conc[:, 0].mean()), "e_mean": float(conc[:, 1].mean()),
            "h_sd": float(conc[:, 0].std()), "e_sd": float(conc[:, 1].std()),
            "residual_sd": float(conc[:, 2].std()), "fine_texture": float(hp.mean())}


def domain_stats(images: Sequence[np.ndarray], source: str, threshold: float = THRESHOLD) -> dict:
    """The ``"domain"`` record of a generator's config from its training H&E images."""
    rows = [f for f in (domain_features(im) for im in images) if f is not None]
    if len(rows) < 2:
        raise ValueError("domain_stats needs at least two images with tissue")
    x = np.array([[r[k] for k in FEATURES] for r in rows])
    return {"features": list(FEATURES), "mean": x.mean(0).tolist(), "std": x.std(0, ddof=1).tolist(),
            "cov": np.cov(x, rowvar=False).tolist(), "n": len(rows), "crop": CROP,
            "threshold": float(threshold), "source": source}


def domain_distance(features: dict[str, float], domain: dict) -> tuple[float, str, float]:
    """(Mahalanobis distance, the feature furthest from the training mean, its deviation in
    training SDs) of ``features`` from ``domain``."""
    names = list(domain["features"])
    x = np.array([features[k] for k in names]) - np.asarray(domain["mean"], float)
    cov = np.asarray(domain["cov"], float)
    d = float(np.sqrt(max(x @ np.linalg.solve(cov + 1e-12 * np.eye(len(x)), x), 0.0)))
    z = x / np.maximum(np.asarray(domain["std"], float), 1e-12)
    worst = int(np.argmax(np.abs(z)))
    return d, names[worst], float(z[worst])


def check_domain(rgb: np.ndarray, domain: dict | None, model: str = "the model") -> str | None:
    """A one-line warning when ``rgb`` is far from the training domain ``domain`` (a config's
    ``"domain"`` record; None: the model records none, no check), else None."""
    if not domain:
        return None
    f = domain_features(rgb, int(domain.get("crop", CROP)))
    if f is None:
        return None
    d, worst, z = domain_distance(f, domain)
    if d <= float(domain.get("threshold", THRESHOLD)):
        return None
    return (f"out of domain: this H&E is unlike the {domain.get('source', 'training')} tissue {model} was "
            f"trained on (distance {d:.0f}, {worst.replace('_', ' ')} {z:+.0f} SD); its virtual IHC and HER2 "
            f"level are not to be trusted here -- for real tissue use {REAL_TISSUE_MODELS}")


def tissue_window(image: Any, crop: int = CROP) -> np.ndarray:
    """The ``crop`` x ``crop`` window of a (possibly lazy, slide-sized) RGB image with the most
    tissue among the centre and a 3 x 3 grid (so a slide's glass does not hide its tissue)."""
    h, w = int(image.shape[0]), int(image.shape[1])
    if h <= crop and w <= crop:
        return np.asarray(image)[..., :3]
    ys = sorted({max(0, (h - crop) // 2), *(int(f * max(h - crop, 0)) for f in (0.2, 0.5, 0.8))})
    xs = sorted({max(0, (w - crop) // 2), *(int(f * max(w - crop, 0)) for f in (0.2, 0.5, 0.8))})
    best, best_t = None, -1.0
    from .. import stain

    for y in ys:
        for x in xs:
            win = np.asarray(image[y : y + crop, x : x + crop])[..., :3]
            t = float((stain.rgb_to_od(win[::4, ::4]).sum(-1) > 0.3).mean())
            if t > best_t:
                best, best_t = win, t
    return best


def generator_domain(generator: Any) -> dict | None:
    """The ``"domain"`` record of a generator (its config, or its base generator's for a wrapper
    such as test-time augmentation), or None."""
    while generator is not None:
        cfg = getattr(generator, "config", None)
        if isinstance(cfg, dict) and cfg.get("domain"):
            return cfg["domain"]
        generator = getattr(generator, "base", None)
    return None


def check_generator_domain(generator: Any, image: Any) -> str | None:
    """:func:`check_domain` of the image's most tissue-rich window (:func:`tissue_window`; the
    image may be a lazy slide level) against the generator's own record, naming the generator."""
    domain = generator_domain(generator)
    if not domain:
        return None
    name = getattr(generator, "name", None)
    win = tissue_window(image, int(domain.get("crop", CROP)))
    return check_domain(win, domain, f"the '{name}' model" if name else "the model")


def check_file_domain(generator: Any, path: str | Path) -> str | None:
    """:func:`check_generator_domain` of the image file at ``path`` (its level 0, read lazily);
    None at once when the generator records no training domain."""
    from ..io.slide import open_slide

    if not generator_domain(generator):
        return None
    with open_slide(path) as s:
        return check_generator_domain(generator, s.levels[0])


def check_folder_domain(generator: Any, files: Sequence[Path], sample: int = 4) -> str | None:
    """The out-of-domain warning (:func:`check_generator_domain`) of a folder's images: up to
    ``sample`` of them, spread over the list, are judged; the line names the first flagged one
    and how many of those judged were flagged. None when none is (or the generator records no
    training domain); an image that cannot be read is left to the run to report."""
    if not files or not generator_domain(generator):
        return None
    k = min(sample, len(files))
    idx = sorted({round(i * (len(files) - 1) / max(k - 1, 1)) for i in range(k)})
    flagged, judged = [], 0
    for i in idx:
        try:
            msg = check_file_domain(generator, files[i])
        except (OSError, ValueError):  # InputError is a ValueError
            continue
        judged += 1
        if msg:
            flagged.append((files[i], msg))
    if not flagged:
        return None
    f, msg = flagged[0]
    more = f" and {len(flagged) - 1} more of the {judged} images judged" if len(flagged) > 1 else ""
    return f"{f}{more}: {msg}"


__all__ = ["FEATURES", "domain_features", "domain_stats", "domain_distance", "check_domain", "generator_domain",
           "check_generator_domain", "check_file_domain", "check_folder_domain", "tissue_window"]
