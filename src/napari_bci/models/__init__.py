"""Virtual IHC generators: the interface, the registry, architectures, checkpoints, device policy.

Public API: :class:`Generator`, :class:`TorchGenerator`, :func:`register`, :func:`available`,
:func:`load_generator`.
"""

from .base import HER2_CLASSES, Generator, TorchGenerator
from .registry import available, load_generator, register

__all__ = ["HER2_CLASSES", "Generator", "TorchGenerator", "available", "load_generator", "register"]
