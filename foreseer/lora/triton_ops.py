"""Triton kernels for batched multi-LoRA on the GPU: Punica's shrink (h = x A^T) and expand (y += h B^T).

Same semantics and weight layout as foreseer.lora.ops (its reference): rows are grouped by adapter, listed group
after group, and each program takes a tile of one group's rows, so one launch serves decode tokens with scattered
adapters (BGMV) and prefill segments (SGMV) alike. Each adapter runs at its own rank: a tile past its rank, or a
shard it does not adapt, does no work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from foreseer.lora.ops import KernelGroups, LoRAStack

BLOCK_M = 16  # rows per tile (tl.dot's smallest)
BLOCK_R = 16  # ranks per shrink tile
BLOCK_N = 64  # output columns per expand tile
BLOCK_K = 32  # reduction step


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, h_ptr, rows_ptr, starts_ptr, lengths_ptr, slots_ptr, slot_meta_ptr, in_features,
                   stride_x, stride_a, stride_h, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    group, m_block, r_block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    length = tl.load(lengths_ptr + group)
    slot = tl.load(slots_ptr + group)
    a_start = tl.load(slot_meta_ptr + 2 * slot)
    rank = tl.load(slot_meta_ptr + 2 * slot + 1)  # of all the slot's shards together
    if (m_block * BLOCK_M >= length) | (r_block * BLOCK_R >= rank):
        return
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < length
    rows = tl.load(rows_ptr + tl.load(starts_ptr + group) + offs_m, mask=m_mask, other=0)
    offs_r = r_block * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)  # not tl.zeros: a jit helper, which the interpreter cannot call
    for k in range(0, in_features, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < in_features
        x = tl.load(x_ptr + rows[:, None] * stride_x + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        a = tl.load(a_ptr + (a_start + offs_r)[None, :] * stride_a + offs_k[:, None],
                    mask=r_mask[None, :] & k_mask[:, None], other=0.0)
        acc += tl.dot(x, a, input_precision=PRECISION)
    tl.store(h_ptr + rows[:, None] * stride_h + offs_r[None, :], acc, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _expand_kernel(h_ptr, b_ptr, y_ptr, rows_ptr, starts_ptr, lengths_ptr, slots_ptr, shard_meta_ptr, shard_out_ptr,
                   num_shards, n_blocks, stride_h, stride_y, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    group, m_block, shard_block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    shard, n_block = shard_block // n_blocks, shard_block % n_blocks
    length = tl.load(lengths_ptr + group)
    slot = tl.load(slots_ptr + group)
    meta = shard_meta_ptr + (slot * num_shards + shard) * 3
    rank = tl.load(meta)  # 0: the slot's adapter leaves this shard alone
    column = tl.load(meta + 1)
    b_start = tl.load(meta + 2)
    out_offset = tl.load(shard_out_ptr + 2 * shard)
    out_size = tl.load(shard_out_ptr + 2 * shard + 1)
    if (m_block * BLOCK_M >= length) | (rank == 0) | (n_block * BLOCK_N >= out_size):
        return
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < length
    rows = tl.load(rows_ptr + tl.load(starts_ptr + group) + offs_m, mask=m_mask, other=0)
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < out_size
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k in range(0, rank, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < rank
        h = tl.load(h_ptr + rows[:, None] * stride_h + column + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + b_start + offs_n[None, :] * rank + offs_k[:, None], mask=n_mask[None, :] & k_mask[:, None],
                    other=0.0)
        # h in the model's dtype, as the PyTorch path has it.
        acc += tl.dot(h.to(b.dtype), b, input_precision=PRECISION)
    y_ptrs = y_ptr + rows[:, None] * stride_y + out_offset + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    # Each (row, column) belongs to one tile: read-modify-write without atomics.
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=mask)


def add_lora(y: torch.Tensor, x: torch.Tensor, groups: KernelGroups, stack: LoRAStack) -> None:
    """y[rows] += each group's LoRA delta, in place (as foreseer.lora.ops.add_lora)."""
    if x.stride(-1) != 1 or y.stride(-1) != 1:
        raise ValueError("LoRA kernels need row-major x and y")
    num_groups, m_blocks = len(groups.lengths), triton.cdiv(groups.max_length, BLOCK_M)
    # float32 models get float32 products (TF32 would round the delta); half precision takes the default.
    precision = "ieee" if x.dtype == torch.float32 else None
    h = torch.empty(x.shape[0], stack.max_rank, dtype=torch.float32, device=x.device)
    packed = stack.packed
    _shrink_kernel[(num_groups, m_blocks, triton.cdiv(stack.max_rank, BLOCK_R))](
        x, packed.a, h, groups.rows, groups.starts, groups.lengths, groups.slots, packed.slot_meta, x.shape[1],
        x.stride(0), packed.a.stride(0), h.stride(0), BLOCK_M=BLOCK_M, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K,
        PRECISION=precision,
    )
    n_blocks = triton.cdiv(max(stack.out_sizes), BLOCK_N)
    _expand_kernel[(num_groups, m_blocks, len(stack.out_sizes) * n_blocks)](
        h, packed.b, y, groups.rows, groups.starts, groups.lengths, groups.slots, packed.shard_meta, packed.shard_out,
        len(stack.out_sizes), n_blocks, h.stride(0), y.stride(0), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K, PRECISION=precision,
    )
