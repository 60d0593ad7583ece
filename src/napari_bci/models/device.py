"""The device policy, in one place.

``auto``: CUDA if available (bf16 autocast where supported, else fp16; channels_last), else
Apple MPS, else CPU. Users override with a device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``,
``"mps"``) or the ``NAPARI_BCI_DEVICE`` environment variable. Out-of-memory handling (halve the
batch, then fall back to CPU with a warning) lives in the tile engine, which calls
:func:`is_oom`.
"""

from __future__ import annotations

import contextlib
import os

from ..errors import ModelError


def available_devices() -> list[str]:
    """Devices usable here, best first (always ends with ``"cpu"``)."""
    import torch

    out = []
    if torch.cuda.is_available():
        out += [f"cuda:{i}" if i else "cuda" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    out.append("cpu")
    return out


def resolve_device(device: str | None = None) -> str:
    """``None``/``"auto"`` -> the best available device; otherwise validate ``device``."""
    import torch

    if device is None or device == "auto":
        device = os.environ.get("NAPARI_BCI_DEVICE") or "auto"
    if device == "auto":
        return available_devices()[0]
    device = str(device)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelError(f"device '{device}' requested but CUDA is not available here")
        idx = int(device.split(":")[1]) if ":" in device else 0
        if idx >= torch.cuda.device_count():
            raise ModelError(f"device '{device}' requested but only {torch.cuda.device_count()} GPU(s)")
        return device
    if device == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ModelError("device 'mps' requested but MPS is not available here")
        return device
    if device == "cpu":
        return device
    raise ModelError(f"unknown device '{device}' (use auto, cpu, cuda, cuda:N or mps)")


def autocast_dtype(device: str):
    """The reduced precision used on ``device`` or ``None`` (full fp32)."""
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def autocast(device: str):
    """Mixed-precision context for inference on ``device`` (a no-op on CPU/MPS)."""
    import torch

    dtype = autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an accelerator out-of-memory error (CUDA, MPS or an imitation)."""
    import torch

    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and "out of memory" in str(exc).lower()


def empty_cache(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    elif device == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


def set_cpu_threads(n: int | None = None) -> int:
    """Intra-op threads for CPU inference: ``n`` or ``NAPARI_BCI_THREADS`` or all cores."""
    import torch

    n = n or int(os.environ.get("NAPARI_BCI_THREADS", "0")) or (os.cpu_count() or 1)
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()
