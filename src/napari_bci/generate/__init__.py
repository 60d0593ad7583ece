"""Virtual IHC generators (interface, registry, architectures, checkpoints) and the tile engine.

Public API: :class:`Generator`, :class:`TorchGenerator`, :func:`register`, :func:`available`,
:func:`load_generator`; the engine is :mod:`napari_bci.generate.engine` (imports torch lazily).
"""

from .base import HER2_CLASSES, Generator, TorchGenerator
from .registry import available, load_generator, register

__all__ = ["HER2_CLASSES", "Generator", "TorchGenerator", "available", "load_generator", "register"]
