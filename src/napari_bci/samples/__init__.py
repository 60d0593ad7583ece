"""Sample data: synthetic paired H&E / HER2-IHC tissue with exact ground truth, and a real slide.

- :func:`napari_bci.samples.synthetic.make_pair` -- a BCI-style pair (default 1024x1024 at 0.5 um/px)
- :func:`napari_bci.samples.wsi.make_wsi_pair` -- a lazy whole-slide pair (dask pyramids)
- :data:`CMU_SMALL` -- the packaged real slide (CC0, OpenSlide test data); the napari sample-data
  menu entries are in ``napari_bci._npe2``
"""

from pathlib import Path

#: The packaged real slide (CC0, OpenSlide test data).
CMU_SMALL = Path(__file__).parent / "data" / "CMU-1-Small-Region.svs"
