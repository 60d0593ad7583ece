"""Reading IHC images and region polygons for the HER2 scorer."""

from __future__ import annotations

from ..errors import InputError
from ..io.slide import open_slide
from ..regions import read_geojson


def load_image(path) -> tuple[list, float | None]:
    """(pyramid levels, level-0 mpp or None) of an image or slide file."""
    s = open_slide(path)
    return list(s.levels), s.mpp


def load_regions(path) -> list[tuple[str, object]]:
    """Named regions ``[(name, region), ...]`` from a (QuPath) GeoJSON file; ``region`` is a
    :class:`napari_bci.regions.Region`."""
    regions = [(r.label if (r.name or r.classification) else f"region {i + 1}", r)
               for i, r in enumerate(read_geojson(path))]
    if not regions:
        raise InputError(path, "no polygons found")
    return regions
