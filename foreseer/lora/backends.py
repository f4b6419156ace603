"""LoRA backends: how a step's adapter deltas are computed, behind one interface.

- `torch`: the PyTorch path (foreseer.lora.ops), the reference; any device and dtype.
- `cpu`: one C++ call per projection for every adapter group (csrc/lora_cpu.cpp), CPU float32: a decode step
  of many adapters costs no per-group dispatch from Python.
- `triton`: Punica-style shrink and expand kernels for the GPU (foreseer.lora.triton_ops).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch

from foreseer.extensions import load_cpu_extension
from foreseer.lora import ops

_CPU_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "lora_cpu.cpp")


class LoRABackend:
    """The PyTorch path: per adapter group, one shrink matmul and one expand per shard."""

    name = "torch"

    def prepare(self, groups: Sequence[ops.RowGroup], device: torch.device):
        """The step's row groups laid out for `add` (once per step)."""
        return groups

    def add(self, y: torch.Tensor, x: torch.Tensor, groups, stack: ops.LoRAStack) -> None:
        """y[rows] += each group's LoRA delta for one projection, in place."""
        ops.add_lora(y, x, groups, stack)


class _KernelBackend(LoRABackend):
    """Kernels that take every group of a projection in one call: the groups as index tensors."""

    def prepare(self, groups: Sequence[ops.RowGroup], device: torch.device) -> ops.KernelGroups:
        return ops.KernelGroups.build(groups, device)


class CpuLoRABackend(_KernelBackend):
    name = "cpu"

    def __init__(self) -> None:
        self.kernels = load_cpu_lora_kernels()
        if self.kernels is None:
            raise RuntimeError("the C++ LoRA kernels could not be built")

    def add(self, y: torch.Tensor, x: torch.Tensor, groups: ops.KernelGroups, stack: ops.LoRAStack) -> None:
        self.kernels.lora_add(y, x, groups.rows, groups.starts, groups.lengths, groups.slots, stack.slot_table)


class TritonLoRABackend(_KernelBackend):
    name = "triton"

    def add(self, y: torch.Tensor, x: torch.Tensor, groups: ops.KernelGroups, stack: ops.LoRAStack) -> None:
        from foreseer.lora import triton_ops

        triton_ops.add_lora(y, x, groups, stack)


def load_cpu_lora_kernels():
    """The compiled C++ LoRA kernels, or None where they cannot be built."""
    return load_cpu_extension("foreseer_lora_cpu", _CPU_SOURCE)


def get_lora_backend(device: torch.device, dtype: torch.dtype) -> LoRABackend:
    """Triton on a GPU where it is installed, the C++ kernels on a CPU in float32 where they build, else PyTorch."""
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return TritonLoRABackend()
    if device.type == "cpu" and dtype == torch.float32 and load_cpu_lora_kernels() is not None:
        return CpuLoRABackend()
    return LoRABackend()
