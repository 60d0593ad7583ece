"""npe2 sample-data contributions (names fixed by ``napari.yaml``).

Each returns ``[H&E, IHC (ground truth)]`` layer-data tuples built with
:func:`napari_bci.io.layers.image_layer`; the synthetic ones carry their ground truth in
``metadata["truth"]`` (a :class:`~napari_bci.samples.synthetic.Truth` for the patches, the
:class:`~napari_bci.samples.wsi.WSIPair` for the whole slide).
"""

from __future__ import annotations

from pathlib import Path

from ..io.layers import HE, IHC_TRUTH, image_layer

#: The packaged real slide (CC0, OpenSlide test data).
CMU_SMALL = Path(__file__).parent / "data" / "CMU-1-Small-Region.svs"


def pair_layers(her2: str, size: int = 1024, seed: int = 0, mpp: float = 0.5) -> list[tuple]:
    """A synthetic BCI-style pair as two layer tuples."""
    from .synthetic import make_pair

    pair = make_pair(her2=her2, size=size, seed=seed, mpp=mpp)
    t = pair.truth
    common = dict(mpp=t.mpp, fmt="synthetic", her2=t.her2, extra_metadata={"truth": t, "seed": seed})
    return [
        image_layer(pair.he, HE, role="he", **common),
        image_layer(pair.ihc, IHC_TRUTH, role="ihc", **common),
    ]


def bci_0() -> list[tuple]:
    return pair_layers("0")


def bci_1() -> list[tuple]:
    return pair_layers("1+")


def bci_2() -> list[tuple]:
    return pair_layers("2+")


def bci_3() -> list[tuple]:
    return pair_layers("3+")


def wsi_pair(size: int = 16384, seed: int = 0, her2: str = "2+") -> list[tuple]:
    """The lazy synthetic whole-slide pair (multiscale layers)."""
    from .wsi import make_wsi_pair

    w = make_wsi_pair(size=size, seed=seed, her2=her2)
    common = dict(mpp=w.mpp, fmt="synthetic", her2=w.her2, extra_metadata={"truth": w, "seed": seed})
    return [
        image_layer(w.he_levels, HE, role="he", **common),
        image_layer(w.ihc_levels, IHC_TRUTH, role="ihc", **common),
    ]


def cmu_small() -> list[tuple]:
    """The real CMU-1-Small-Region H&E slide shipped with the package."""
    from ..io._npe2 import slide_layer
    from ..io.slide import open_slide

    return [slide_layer(open_slide(CMU_SMALL), HE, "he")]
