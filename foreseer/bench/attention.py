"""Decode attention alone: the split-KV kernel against the reference kernels (scores, PyTorch softmax, values).

One call per layer is timed on random fp32 caches of `num_layers` layers, called in turn as a model does, so that a
layer's keys and values come from memory as in a real step, not from the previous call's L3 (a 4,096-token layer of
the default model is 6 MB). Each request's blocks are scattered, as after many allocations.
"""

from __future__ import annotations

import functools
import time

import torch

from foreseer.attention import AttentionMetadata
from foreseer.attention.cpu_backend import CpuPagedAttention
from foreseer.bench.turns import fastest_in_turns


def _decode_inputs(context_len: int, batch_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                   block_size: int, num_layers: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    blocks_per_row = -(-context_len // block_size)
    num_blocks = batch_size * blocks_per_row
    caches = [(torch.randn(num_blocks, num_kv_heads, head_dim, block_size, generator=g),
               torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)) for _ in range(num_layers)]
    tables = torch.randperm(num_blocks, generator=g).view(batch_size, blocks_per_row)
    metadata = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.int64), num_decode_tokens=batch_size, decode_block_tables=tables,
        decode_seq_lens=torch.full((batch_size,), context_len, dtype=torch.int64), max_decode_seq_len=context_len,
        prefills=[], block_size=block_size,
    )
    return torch.randn(batch_size, num_heads, head_dim, generator=g), caches, metadata


def _seconds_per_layer(backend: CpuPagedAttention, q: torch.Tensor, caches, metadata: AttentionMetadata) -> float:
    start = time.perf_counter()
    for k_cache, v_cache in caches:
        backend.decode(q, k_cache, v_cache, metadata, q.shape[-1] ** -0.5)
    return (time.perf_counter() - start) / len(caches)


def bench_decode_attention(
    context_lens: tuple[int, ...] = (4096, 8192), batch_size: int = 1, num_heads: int = 9, num_kv_heads: int = 3,
    head_dim: int = 64, block_size: int = 16, repeats: int = 30, num_layers: int = 8,
) -> list[dict]:
    """Per context length: the best-of-`repeats` time of one decode-attention call (one layer, every request at that
    length) with the split-KV kernel and with the reference kernels, in microseconds, and the speedup. The two run
    in turns (this machine is shared and noisy). The defaults are SmolLM2-135M's shape at batch 1."""
    kernels = {name: CpuPagedAttention(decode_kernel=name) for name in ("split_kv", "reference")}
    results = []
    for context_len in context_lens:
        q, caches, metadata = _decode_inputs(context_len, batch_size, num_heads, num_kv_heads, head_dim, block_size,
                                             num_layers, seed=context_len)
        ways = {name: functools.partial(_seconds_per_layer, backend, q, caches, metadata)
                for name, backend in kernels.items()}
        for way in ways.values():  # warm up: page the caches in, start the thread pool
            way()
        best = fastest_in_turns(ways, repeats, seconds=lambda t: t)
        split_us, reference_us = best["split_kv"] * 1e6, best["reference"] * 1e6
        results.append({"context_len": context_len, "batch_size": batch_size, "split_kv_us": round(split_us, 1),
                        "reference_us": round(reference_us, 1), "speedup": round(reference_us / split_us, 2)})
    return results
