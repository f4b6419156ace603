"""The per-layer C++ operations (csrc/layer_ops_cpu.cpp): RMSNorm with the residual add, rotary in place, SiLU-mul.

Layers call `layer_ops(x)`, which gives the compiled kernels where they apply (a float32 CPU tensor and a
compiler) and None elsewhere, where the layers compute the same thing with PyTorch ops."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

from foreseer.extensions import load_cpu_extension

_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "layer_ops_cpu.cpp")


@functools.cache
def load_layer_ops():
    # No fused multiply-add: each element rounds as the PyTorch reference's separate multiply and add do.
    return load_cpu_extension("foreseer_layer_ops_cpu", _SOURCE, ("-ffp-contract=off",))


_enabled = True


def layer_ops(x: torch.Tensor):
    """The kernels if they can compute on `x`, else None (also where autograd tracks x: they work in place)."""
    if not _enabled or x.device.type != "cpu" or x.dtype != torch.float32 or x.requires_grad:
        return None
    return load_layer_ops()


@contextlib.contextmanager
def layer_ops_enabled(enabled: bool) -> Iterator[None]:
    """Within the block, use the C++ layer ops or not (`foreseer bench decode` measures both)."""
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous
