"""Reading and writing: WSI pyramids, patches, BCI folders, pyramidal OME-TIFF.

Headless (no Qt, no napari); heavy modules load on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "Slide", "open_slide", "read_patch", "BCIDataset", "BCIPair", "open_bci_folder", "parse_bci_name",
    "find_ihc_partner", "write_pyramid", "image_layer",
]

_WHERE = {
    "Slide": "slide", "open_slide": "slide", "read_patch": "patches", "BCIDataset": "bci", "BCIPair": "bci",
    "open_bci_folder": "bci", "parse_bci_name": "bci", "find_ihc_partner": "bci", "write_pyramid": "writers",
    "image_layer": "layers",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(name)
