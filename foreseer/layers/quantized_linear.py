"""Linear and embedding layers over weights kept as the checkpoint stores them (GGUF blocks, F16, BF16).

The C++ kernels (csrc/quantized_cpu.cpp) dequantize each block in registers to exactly the fp32 values the
checkpoint defines and multiply them with fp32 activations: the model computed is the checkpoint's, only the
summation order changes. A weight of a 135M-parameter Q4_1 model then streams 98 MB per decode step instead of
540 MB. Which of the two dataflows runs (flat GEMM for a few rows, dequantized tiles into BLAS for many) is decided
per weight shape from timings taken on this machine (`choose_dataflows`).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from foreseer.extensions import load_cpu_extension

logger = logging.getLogger(__name__)

_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "quantized_cpu.cpp")


@dataclass(frozen=True)
class WeightFormat:
    """A stored weight type: `block_size` weights in `type_size` bytes (ggml's numbering and layouts)."""

    name: str
    ggml_type: int
    block_size: int
    type_size: int

    def row_bytes(self, in_features: int) -> int:
        if in_features % self.block_size:
            raise ValueError(f"{self.name} rows hold multiples of {self.block_size} weights, not {in_features}")
        return in_features // self.block_size * self.type_size


WEIGHT_FORMATS = {f.name: f for f in (
    WeightFormat("F16", 1, 1, 2), WeightFormat("BF16", 30, 1, 2),
    WeightFormat("Q4_0", 2, 32, 18), WeightFormat("Q4_1", 3, 32, 20), WeightFormat("Q5_0", 6, 32, 22),
    WeightFormat("Q5_1", 7, 32, 24), WeightFormat("Q8_0", 8, 32, 34),
    WeightFormat("Q4_K", 12, 256, 144), WeightFormat("Q5_K", 13, 256, 176), WeightFormat("Q6_K", 14, 256, 210),
)}


def load_kernels():
    """The compiled kernels, or None where they cannot be built (the engine then expands weights to float32)."""
    # No fused multiply-add inside a dequantization: a weight must round as the checkpoint's definition does.
    return load_cpu_extension("foreseer_quantized_cpu", _SOURCE, ("-ffp-contract=off",))


@dataclass
class BlockWeight:
    """A weight matrix in its stored format: `data` is [out_features, row_bytes] uint8, one row per output."""

    data: torch.Tensor
    format: WeightFormat
    in_features: int

    def __post_init__(self) -> None:
        expected = self.format.row_bytes(self.in_features)
        if self.data.dtype != torch.uint8 or self.data.dim() != 2 or self.data.shape[1] != expected:
            raise ValueError(f"a {self.format.name} weight of {self.in_features} inputs needs [rows, {expected}] "
                             f"uint8 data, got {self.data.dtype} {tuple(self.data.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape[0], self.in_features

    def dequantize(self) -> torch.Tensor:
        """The weights as float32 [out_features, in_features]."""
        return _kernels().dequantize(self.data, self.format.ggml_type, self.in_features)

    @staticmethod
    def stack(parts: list[BlockWeight]) -> list[BlockWeight]:
        """Row-stacked parts (a fused projection's shards), consecutive parts of one format merged into one."""
        merged: list[BlockWeight] = []
        for part in parts:
            if merged and merged[-1].format == part.format and merged[-1].in_features == part.in_features:
                last = merged.pop()
                part = BlockWeight(torch.cat([last.data, part.data]), part.format, part.in_features)
            merged.append(part)
        return merged


@functools.cache
def _kernels():
    kernels = load_kernels()
    if kernels is None:
        raise RuntimeError("the C++ quantized-weight kernels could not be built")
    return kernels


# Bytes of one dequantized tile in `tiled_matmul`: it stays in L2/L3 while BLAS multiplies it.
_TILE_BYTES = 2**21


class QuantizedLinear(nn.Module):
    """y = x W^T (+ b) with W in its stored format, as row-stacked parts (a fused projection whose shards have
    different formats has several)."""

    def __init__(self, parts: list[BlockWeight], bias: torch.Tensor | None = None) -> None:
        super().__init__()
        parts = BlockWeight.stack(parts)
        self.in_features = parts[0].in_features
        if any(p.in_features != self.in_features for p in parts):
            raise ValueError("the parts of a quantized linear layer must have the same number of inputs")
        self.out_features = sum(p.shape[0] for p in parts)
        self.formats = [p.format for p in parts]
        for i, part in enumerate(parts):
            self.register_buffer(f"qweight_{i}", part.data, persistent=False)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        self.tile_rows = max(16, _TILE_BYTES // (4 * self.in_features))
        # Rows up to which the flat GEMM beats dequantized tiles into BLAS; `choose_dataflows` measures it.
        self.flat_max_rows = 8

    @property
    def parts(self) -> list[BlockWeight]:
        return [BlockWeight(getattr(self, f"qweight_{i}"), f, self.in_features) for i, f in enumerate(self.formats)]

    def dequantize(self) -> torch.Tensor:
        """The whole weight as float32 [out_features, in_features]."""
        return torch.cat([part.dequantize() for part in self.parts])

    def dataflow_key(self) -> tuple:
        return tuple((p.format.name, p.shape) for p in self.parts), torch.get_num_threads()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"a linear layer of {self.in_features} inputs got activations of shape {tuple(x.shape)}")
        rows = x.reshape(-1, self.in_features)
        flat = len(rows) <= self.flat_max_rows
        if len(self.formats) == 1:  # the common case, with the least Python in the way of a decode step
            y = self.matmul(rows, self.qweight_0, self.formats[0], flat)
        else:
            y = torch.cat([self.matmul(rows, part.data, part.format, flat) for part in self.parts], dim=-1)
        if self.bias is not None:
            y += self.bias
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)

    def matmul(self, rows: torch.Tensor, data: torch.Tensor, fmt: WeightFormat, flat: bool) -> torch.Tensor:
        """rows @ W^T for one part's stored bytes `data`, by the flat GEMM or by dequantized tiles into BLAS."""
        if flat:
            return _kernels().flat_matmul(rows, data, fmt.ggml_type, self.in_features)
        return _kernels().tiled_matmul(rows, data, fmt.ggml_type, self.in_features, self.tile_rows)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"formats={[f.name for f in self.formats]}, flat_max_rows={self.flat_max_rows}")


class QuantizedEmbedding(nn.Module):
    """Embedding rows dequantized on lookup (bit for bit the checkpoint's values)."""

    def __init__(self, weight: BlockWeight) -> None:
        super().__init__()
        self.register_buffer("qweight", weight.data, persistent=False)
        self.format = weight.format
        self.num_embeddings, self.embedding_dim = weight.shape

    @property
    def blocks(self) -> BlockWeight:
        return BlockWeight(self.qweight, self.format, self.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = _kernels().dequantize_rows(self.qweight, self.format.ggml_type, self.embedding_dim, ids.reshape(-1))
        return rows.view(*ids.shape, self.embedding_dim)


_ROW_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def choose_dataflows(model: nn.Module) -> dict[tuple, int]:
    """Set each QuantizedLinear's flat_max_rows from timings of both kernels on its weights at growing row
    counts (FlashDecoding++'s heuristic dataflow, measured on this machine); weights of one shape and format
    share the measurement, and a process measures a shape once. Returns the thresholds by weight key."""
    thresholds = {}
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            key = module.dataflow_key()
            module.flat_max_rows = thresholds[key] = _flat_max_rows(module, key)
    if thresholds:
        logger.info("flat GEMM up to rows: %s", {k[0][0]: v for k, v in thresholds.items()})
    return thresholds


_measured: dict[tuple, int] = {}  # by dataflow_key: a process times each shape once


@torch.inference_mode()
def _flat_max_rows(module: QuantizedLinear, key: tuple, repeats: int = 3) -> int:
    """The largest row count at which the flat GEMM is faster, counting up until the tiles win twice in a row; no
    limit if the flat GEMM still wins at the last count (it packs panels as BLAS does, and its lead holds as the
    rows grow)."""
    if key in _measured:
        return _measured[key]
    best, losses = 0, 0
    for rows in _ROW_COUNTS:
        x = torch.randn(rows, module.in_features)
        times = {True: float("inf"), False: float("inf")}
        for _ in range(repeats + 1):  # the first round warms caches and allocations
            for flat in (True, False):
                begin = time.perf_counter()
                for part in module.parts:
                    module.matmul(x, part.data, part.format, flat)
                times[flat] = min(times[flat], time.perf_counter() - begin)
        if times[True] <= times[False]:
            best, losses = rows, 0
        else:
            losses += 1
            if losses == 2:
                break
    _measured[key] = best = sys.maxsize if best == _ROW_COUNTS[-1] else best
    return best
