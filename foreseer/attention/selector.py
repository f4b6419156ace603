"""Which attention backend a device and dtype get."""

from __future__ import annotations

import torch

from foreseer.attention.backend import AttentionBackend
from foreseer.attention.cpu_backend import load_cpu_kernels
from foreseer.registry import ATTENTION_BACKENDS


def get_backend(name: str, device: torch.device, dtype: torch.dtype) -> AttentionBackend:
    """"auto" takes the C++ kernels on a CPU in float32 where they build, else the PyTorch backend."""
    if name == "auto":
        name = "cpu" if device.type == "cpu" and dtype == torch.float32 and load_cpu_kernels() is not None else "torch"
    if name not in ATTENTION_BACKENDS:
        available = ", ".join(sorted(ATTENTION_BACKENDS))
        raise ValueError(f"unknown attention_backend {name!r}; available: auto, {available}")
    return ATTENTION_BACKENDS[name]()
