"""napari-bci: virtual HER2 immunohistochemistry from H&E, in napari and headless.

The headless core (``io``, ``samples``, ``registration``, ``generate``, ``metrics``, ``her2``,
``stain``, ``transform``) never imports Qt or napari; ``widgets`` is the only Qt-facing package.
"""

__version__ = "0.1.0"
