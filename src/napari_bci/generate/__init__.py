"""Running generators on images: the tile engine and its cache, the viewer's display store, and
whole-slide / folder / distributed output. The models themselves live in :mod:`napari_bci.models`."""
