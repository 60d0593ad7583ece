"""One place that turns images into napari layer-data tuples (no napari import needed).

Layer metadata keys used across the plugin:

``path``    source file (str) or None
``mpp``     microns per pixel at level 0 (float) or None
``format``  reader format name (``"svs"``, ``"ome-tiff"``, ``"png"``, ``"synthetic"`` ...)
``role``    ``"he"``, ``"ihc"`` (ground truth), ``"generated"``, ``"ssim"``, ``"her2"``, ...
``her2``    the HER2 level ``"0" | "1+" | "2+" | "3+"`` when known (slide-level label), else None
``levels``  ``[[h, w], ...]`` level shapes
``model``, ``out_of_domain``  on a generated layer: the generator, and its out-of-domain warning
            on the H&E it was made from (None: within its domain)

When ``mpp`` is known the layer's scale is ``(mpp, mpp)`` (world units: micrometres), so H&E and
IHC with different pixel sizes overlay physically; otherwise the scale is 1 (pixels).
"""

from __future__ import annotations

from typing import Any, Sequence

#: Layer names users see (docs/architecture.md, "Data conventions").
HE = "H&E"
HE_REGISTERED = "H&E (registered)"
IHC_TRUTH = "IHC (ground truth)"
SSIM = "SSIM (local)"
HER2 = "HER2 (predicted)"
LANDMARKS_HE = "Landmarks H&E"
LANDMARKS_IHC = "Landmarks IHC"
REGIONS = "Regions"


def generated_name(model: str) -> str:
    return f"IHC (generated: {model})"


def image_layer(
    data: Any | Sequence[Any],
    name: str,
    *,
    mpp: float | None = None,
    role: str | None = None,
    path: str | None = None,
    fmt: str | None = None,
    her2: str | None = None,
    extra_metadata: dict | None = None,
    **kwargs: Any,
) -> tuple:
    """An RGB image ``LayerDataTuple``; ``data`` is one array or a list of pyramid levels
    (level 0 first) of shape ``(H, W, 3)`` uint8."""
    levels = list(data) if isinstance(data, (list, tuple)) else [data]
    meta = {
        "path": None if path is None else str(path),
        "mpp": None if mpp is None else float(mpp),
        "format": fmt,
        "role": role,
        "her2": her2,
        "levels": [[int(a.shape[0]), int(a.shape[1])] for a in levels],
    }
    meta.update(extra_metadata or {})
    scale = (float(mpp), float(mpp)) if mpp else (1.0, 1.0)
    attrs = {
        "name": name,
        "rgb": True,
        "multiscale": len(levels) > 1,
        "scale": scale,
        "metadata": meta,
    }
    if mpp:
        attrs["units"] = ("µm", "µm")
    attrs.update(kwargs)
    return (levels if len(levels) > 1 else levels[0], attrs, "image")
