"""Batched multi-LoRA in PyTorch: the CPU path, and the reference for the Triton kernels.

For a projection y = x W^T, a token whose adapter is i gets y += (x A_i^T) B_i^T (the scaling is folded into B_i).
Punica's two shapes of that batch are both here: BGMV, one adapter index per token (decode), and SGMV, contiguous
segments of tokens sharing an adapter (prefill). Either way the tokens are grouped by adapter and each group costs
one shrink matmul at its adapter's own rank (every adapted shard of a fused projection at once) and one expand
matmul per shard into that shard's output columns: adapters of different ranks batch together without padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from foreseer.lora.adapter import LoRAPair


@dataclass
class RowGroup:
    """Rows of the batch that use adapter `slot`: a slice where they are contiguous, else their indices."""

    slot: int
    rows: slice | torch.Tensor


@dataclass
class ShardLoRA:
    rank_offset: int  # its columns of x A^T
    out_offset: int  # its columns of the projection's output
    b: torch.Tensor  # [out, rank], a view into LoRAStack.b


@dataclass
class SlotLoRA:
    a: torch.Tensor  # [sum of its shards' ranks, in]: a view into LoRAStack.a
    shards: list[ShardLoRA]


@dataclass
class LoRAStack:
    """Every resident adapter's weights for one projection of one layer, packed into two buffers at each adapter's
    own rank: views per slot for the PyTorch path, offsets for the kernels."""

    a: torch.Tensor  # [sum of ranks, in]: slot after slot, shard after shard
    b: torch.Tensor  # flat: each (slot, shard)'s B as [out, rank], row-major
    slots: list[SlotLoRA | None]  # None: the adapter in that slot does not adapt this projection
    out_offsets: list[int]  # per shard, its first output column
    out_sizes: list[int]
    slot_meta: torch.Tensor  # int64 [slots, 2]: first row in `a`, total rank
    shard_meta: torch.Tensor  # int64 [slots, shards, 3]: rank, column in x A^T, start in `b`
    shard_out: torch.Tensor  # int64 [shards, 2]: out_offsets, out_sizes

    @property
    def max_rank(self) -> int:
        """The widest x A^T of any slot (all its shards together)."""
        return max((s.a.shape[0] for s in self.slots if s is not None), default=0)


def build_stack(per_slot: Sequence[Sequence[LoRAPair | None] | None], out_sizes: Sequence[int],
                device: torch.device) -> LoRAStack | None:
    """Pack each slot's per-shard (A, B) for one projection; None if no slot adapts it."""
    if all(shards is None for shards in per_slot):
        return None
    out_offsets = [sum(out_sizes[:i]) for i in range(len(out_sizes))]
    a_parts, b_parts, slot_meta, shard_meta = [], [], [], []
    a_rows = b_size = 0
    for shards in per_slot:
        meta = [[0, 0, 0] for _ in out_sizes]
        slot_start, column = a_rows, 0
        for shard, pair in enumerate(shards or ()):
            if pair is not None:
                a, b = pair
                a_parts.append(a)
                b_parts.append(b.reshape(-1))
                meta[shard] = [a.shape[0], column, b_size]
                column += a.shape[0]
                a_rows += a.shape[0]
                b_size += b.numel()
        slot_meta.append([slot_start, column])
        shard_meta.append(meta)
    a_all = torch.cat(a_parts).to(device)
    b_all = torch.cat(b_parts).to(device)
    slots = [
        SlotLoRA(a_all[start:start + total], [
            ShardLoRA(column, out_offsets[shard], b_all[b_start:b_start + out_sizes[shard] * rank].view(-1, rank))
            for shard, (rank, column, b_start) in enumerate(meta) if rank
        ]) if total else None
        for (start, total), meta in zip(slot_meta, shard_meta)
    ]

    def as_tensor(data: list) -> torch.Tensor:
        return torch.tensor(data, dtype=torch.int64, device=device)

    return LoRAStack(a_all, b_all, slots, out_offsets, list(out_sizes), as_tensor(slot_meta),
                     as_tensor(shard_meta), as_tensor([list(p) for p in zip(out_offsets, out_sizes)]))


def add_lora(y: torch.Tensor, x: torch.Tensor, groups: Sequence[RowGroup], stack: LoRAStack) -> None:
    """y[rows] += each group's LoRA delta, in place: x [T, in], y [T, sum of out_sizes]."""
    for group in groups:
        weights = stack.slots[group.slot]
        if weights is None:
            continue
        rows = group.rows
        h = x[rows] @ weights.a.t()
        for shard in weights.shards:
            out_size, rank = shard.b.shape
            delta = h[:, shard.rank_offset:shard.rank_offset + rank] @ shard.b.t()
            out = y[:, shard.out_offset:shard.out_offset + out_size]
            if isinstance(rows, slice):
                out[rows] += delta
            else:
                out.index_add_(0, rows, delta)


def token_groups(token_slots: torch.Tensor) -> list[RowGroup]:
    """Rows by adapter from one slot per token (-1: no adapter)."""
    groups = []
    for slot in torch.unique(token_slots).tolist():
        if slot < 0:
            continue
        rows = torch.nonzero(token_slots == slot).flatten()
        first, last = rows[0].item(), rows[-1].item()
        groups.append(RowGroup(slot, slice(first, last + 1) if last - first + 1 == len(rows) else rows))
    return groups


def segment_groups(starts: Sequence[int], lengths: Sequence[int], slots: Sequence[int]) -> list[RowGroup]:
    """One group per segment of contiguous rows that share an adapter (segments with slot -1 are skipped)."""
    return [RowGroup(slot, slice(start, start + length)) for start, length, slot in zip(starts, lengths, slots)
            if slot >= 0]


def bgmv(y: torch.Tensor, x: torch.Tensor, token_slots: torch.Tensor, stack: LoRAStack) -> None:
    """Punica's BGMV: y[t] += delta of adapter token_slots[t] (-1: none), in place."""
    add_lora(y, x, token_groups(token_slots), stack)


def sgmv(y: torch.Tensor, x: torch.Tensor, starts: Sequence[int], lengths: Sequence[int], slots: Sequence[int],
         stack: LoRAStack) -> None:
    """Punica's SGMV: rows [starts[i], starts[i] + lengths[i]) get the delta of adapter slots[i], in place."""
    add_lora(y, x, segment_groups(starts, lengths, slots), stack)
