"""Paged attention with C++ decode kernels for the CPU (compiled on first use, float32)."""

from __future__ import annotations

import math
import os
from typing import Literal

import torch

from foreseer.attention.backend import AttentionMetadata
from foreseer.attention.torch_backend import TorchPagedAttention
from foreseer.extensions import load_cpu_extension

_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "paged_attention_cpu.cpp")


def load_cpu_kernels():
    """The compiled extension, or None where it cannot be built."""
    # Multiply-adds are explicit fmas (paged_attention.h), as in the fused decoder that shares them.
    return load_cpu_extension("foreseer_paged_attention_cpu", _SOURCE, ("-ffp-contract=off",))


DecodeKernel = Literal["split_kv", "reference"]
UnifiedMax = Literal["sink", "layer"] | float


class CpuPagedAttention(TorchPagedAttention):
    """Keys are stored transposed per block, [num_blocks, Hkv, D, block_size], for SIMD over tokens.

    Decode runs the split-KV kernel (each request's tokens cut into chunks, so a lone request keeps every core busy,
    and chunks merged by FlashDecoding++'s unified max) or, as `decode_kernel="reference"`, the two kernels with
    PyTorch's softmax between them. `unified_max` is the subtrahend every chunk's exps share:
    "sink" - each (row, head)'s score against its row's first token, a function of the row alone, so a row's output
        is bit-identical whatever else is in the batch and whatever ran before;
    "layer" - the largest score each layer has seen so far (FlashDecoding++'s statistic; it makes a row's rounding
        depend on earlier batches);
    a float - that value everywhere (tests, calibrated values).
    Chunks whose scores stray too far from it fall back to their own max, so every choice gives the exact softmax;
    `recomputed_chunks` counts those (row, head, chunk) partials. `chunk_tokens` 0 lets the kernel size chunks.
    """

    name = "cpu"
    # The kernels read only each request's own tokens, so pages can stay untouched until used.
    allocate = staticmethod(torch.empty)

    def __init__(self, decode_kernel: DecodeKernel = "split_kv", unified_max: UnifiedMax = "sink",
                 chunk_tokens: int = 0) -> None:
        if decode_kernel not in ("split_kv", "reference"):
            raise ValueError(f"unknown decode_kernel {decode_kernel!r}; available: split_kv, reference")
        if isinstance(unified_max, str) and unified_max not in ("sink", "layer"):
            raise ValueError(f"unknown unified_max {unified_max!r}; available: sink, layer or a float")
        self.kernels = load_cpu_kernels()
        if self.kernels is None:
            raise RuntimeError("the C++ CPU attention kernels could not be built")
        self.decode_kernel, self.unified_max, self.chunk_tokens = decode_kernel, unified_max, chunk_tokens
        self.recomputed_chunks = 0
        # "layer": the largest score seen per layer, keyed by the layer's key cache (the backend serves every layer).
        self.layer_max_score: dict[int, float] = {}

    @staticmethod
    def key_shape(shape: tuple[int, int, int, int]) -> tuple[int, ...]:
        num_blocks, block_size, num_kv_heads, head_dim = shape
        return (num_blocks, num_kv_heads, head_dim, block_size)

    def write_kv(self, k_cache, v_cache, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.kernels.write_kv_cache(k, v, k_cache, v_cache, slots)

    def move_keys(self, k_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        block_size = k_cache.shape[-1]
        k_cache[dst // block_size, :, :, dst % block_size] = k_cache[src // block_size, :, :, src % block_size]

    def gather_keys(self, k_cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        return k_cache[block_tables].movedim(-1, -3).flatten(-4, -3)

    def decode(self, q, k_cache, v_cache, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        tables, lens = metadata.decode_block_tables, metadata.decode_seq_lens
        if self.decode_kernel == "reference":
            scores = self.kernels.paged_decode_scores(q, k_cache, tables, lens, metadata.max_decode_seq_len, scale)
            return self.kernels.paged_decode_values(scores.softmax(dim=-1), v_cache, tables, lens)
        if self.unified_max == "sink":
            phi = math.nan  # the kernel takes each row's sink score
        elif self.unified_max == "layer":
            phi = self.layer_max_score.get(k_cache.data_ptr(), math.nan)  # a layer's first call: the sink
        else:
            phi = float(self.unified_max)
        out, max_score, recomputed = self.kernels.paged_decode_split(
            q, k_cache, v_cache, tables, lens, scale, phi, self.chunk_tokens)
        self.recomputed_chunks += recomputed
        if self.unified_max == "layer" and not max_score <= phi:  # NaN phi: no statistic yet
            self.layer_max_score[k_cache.data_ptr()] = max_score
        return out

    def prefill(self, q, k, v, k_ctx, v_ctx, scale: float, tree_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Context and new tokens attended separately and merged by log-sum-exp: the new tokens keep the
        causal kernel, which skips the masked half, instead of a dense masked attention over everything.
        Grouped KV heads are repeated for the flash kernel: scaled_dot_product_attention with enable_gqa falls
        back to the math kernel on the CPU, about 6x slower at 2048 tokens."""
        group = q.shape[1] // k.shape[1]

        def heads(t: torch.Tensor) -> torch.Tensor:  # [n, Hkv, D] -> [1, H, n, D]
            return t.transpose(0, 1).repeat_interleave(group, dim=0)[None]

        qs = q.transpose(0, 1)[None]
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        if tree_mask is None:
            out_new, lse_new = flash(qs, heads(k), heads(v), is_causal=True, scale=scale)
        else:  # the kernel takes an additive mask of the query's dtype
            additive = torch.zeros(tree_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~tree_mask, -torch.inf)
            out_new, lse_new = flash(qs, heads(k), heads(v), attn_mask=additive, scale=scale)
        if not len(k_ctx):
            return out_new[0].transpose(0, 1)
        out_ctx, lse_ctx = flash(qs, heads(k_ctx), heads(v_ctx), is_causal=False, scale=scale)
        lse = torch.logaddexp(lse_new, lse_ctx)
        out = out_new * (lse_new - lse).exp()[..., None] + out_ctx * (lse_ctx - lse).exp()[..., None]
        return out[0].transpose(0, 1)
