"""Sample data: synthetic paired H&E / HER2-IHC tissue with exact ground truth, and a real slide.

- :func:`napari_bci.samples.synthetic.make_pair` -- a BCI-style pair (default 1024x1024 at 0.5 um/px)
- :func:`napari_bci.samples.wsi.make_wsi_pair` -- a lazy whole-slide pair (dask pyramids)
- ``napari_bci.samples._npe2`` -- the napari sample-data menu entries
"""
