"""Batched multi-LoRA in PyTorch: the CPU path, and the reference for the Triton kernels.

For a projection y = x W^T, a token whose adapter is i gets y += (x A_i^T) B_i^T (the scaling is folded into B_i).
Punica's two shapes of that batch are both here: BGMV, one adapter index per token (decode), and SGMV, contiguous
segments of tokens sharing an adapter (prefill). Either way the tokens are grouped by adapter and each group costs
one shrink matmul at its adapter's own rank (every adapted shard of a fused projection at once) and one expand per
shard, added in place into that shard's output columns: adapters of different ranks batch together without
padding. Weights are stored as the matmuls read them (A and B transposed), since on a CPU the per-operation
overhead, not the arithmetic, dominates a decode step's many small groups.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

LoRAPair = tuple[torch.Tensor, torch.Tensor]  # A [rank, in], B [out, rank] with the scaling folded in


@dataclass
class RowGroup:
    """Rows of the batch that use adapter `slot`: a slice where they are contiguous, else their indices."""

    slot: int
    rows: slice | torch.Tensor


@dataclass
class KernelGroups:
    """Row groups as the kernels read them (C++ on a CPU, Triton on a GPU)."""

    rows: torch.Tensor  # int64: rows of the batch, group after group
    starts: torch.Tensor  # int64 [groups]: each group's first entry in `rows`
    lengths: torch.Tensor  # int64 [groups]
    slots: torch.Tensor  # int64 [groups]
    max_length: int

    @classmethod
    def build(cls, groups: Sequence[RowGroup], device: torch.device) -> KernelGroups:
        rows = [torch.arange(g.rows.start, g.rows.stop) if isinstance(g.rows, slice) else g.rows.cpu()
                for g in groups]
        lengths = [len(r) for r in rows]
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        meta = torch.tensor([starts, lengths, [g.slot for g in groups]], dtype=torch.int64, device=device)
        return cls(torch.cat(rows).to(device), meta[0], meta[1], meta[2], max(lengths))


@dataclass
class ShardLoRA:
    index: int  # which shard of the projection (q, k, v of a fused qkv_proj)
    rank_offset: int  # its columns of x A^T
    out_offset: int  # its columns of the projection's output
    b_t: torch.Tensor  # [rank, out]: its B, transposed

    @property
    def rank(self) -> int:
        return self.b_t.shape[0]

    @property
    def out_size(self) -> int:
        return self.b_t.shape[1]


@dataclass
class SlotLoRA:
    """One adapter's weights for one projection, on the compute device, laid out for two matmuls."""

    a_t: torch.Tensor  # [in, sum of its shards' ranks]: every adapted shard's A, transposed
    shards: list[ShardLoRA]

    def pairs(self, num_shards: int) -> list[LoRAPair | None]:
        """(A, B) of each shard of the projection (views), None where not adapted."""
        pairs: list[LoRAPair | None] = [None] * num_shards
        for shard in self.shards:
            pairs[shard.index] = (self.a_t[:, shard.rank_offset:shard.rank_offset + shard.rank].t(), shard.b_t.t())
        return pairs

    def to(self, device: torch.device) -> SlotLoRA:
        """On `device` (itself if it is there already: no copy)."""
        if self.a_t.device == device:
            return self
        return SlotLoRA(self.a_t.to(device), [dataclasses.replace(s, b_t=s.b_t.to(device)) for s in self.shards])

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a_t, *(s.b_t for s in self.shards)))


def slot_lora(shards: Sequence[LoRAPair | None] | None, out_sizes: Sequence[int],
              device: torch.device) -> SlotLoRA | None:
    """An adapter's per-shard (A, B) of one projection, laid out for the device; None if it adapts no shard."""
    pairs = [(index, pair) for index, pair in enumerate(shards or ()) if pair is not None]
    if not pairs:
        return None
    out_offsets = [sum(out_sizes[:i]) for i in range(len(out_sizes))]
    a_t = torch.cat([pair[0] for _, pair in pairs]).t().contiguous().to(device)
    adapted, column = [], 0
    for index, (shard_a, shard_b) in pairs:
        adapted.append(ShardLoRA(index, column, out_offsets[index], shard_b.t().contiguous().to(device)))
        column += shard_a.shape[0]
    return SlotLoRA(a_t, adapted)


@dataclass
class PackedLoRA:
    """Every slot's weights of one projection in two buffers, each adapter at its own rank, with the offsets the
    Triton kernels index them by."""

    a: torch.Tensor  # [sum of ranks, in]: slot after slot, shard after shard
    b: torch.Tensor  # flat: each (slot, shard)'s B as [out, rank], row-major
    slot_meta: torch.Tensor  # int64 [slots, 2]: first row in `a`, total rank
    shard_meta: torch.Tensor  # int64 [slots, shards, 3]: rank, column in x A^T, start in `b`
    shard_out: torch.Tensor  # int64 [shards, 2]: out_offsets, out_sizes


@dataclass
class LoRAStack:
    """Every resident adapter's weights for one projection of one layer: one SlotLoRA per device slot (None: the
    slot is empty or its adapter does not adapt this projection). A slot's change replaces its entry only."""

    slots: list[SlotLoRA | None]
    out_sizes: list[int]

    @property
    def out_offsets(self) -> list[int]:
        return [sum(self.out_sizes[:i]) for i in range(len(self.out_sizes))]

    @property
    def max_rank(self) -> int:
        """The widest x A^T of any slot (all its shards together)."""
        return max((s.a_t.shape[1] for s in self.slots if s is not None), default=0)

    @functools.cached_property
    def slot_table(self) -> torch.Tensor:
        """The C++ kernel's view of the slots, int64 [slots, 2 + 5 * shards]: each slot's A^T address and total
        rank, then per shard its B^T's address, rank, column in x A^T, output offset and size (rank 0: not
        adapted). The addresses are of tensors this stack keeps alive; a slot's change makes a new stack."""
        table = []
        for weights in self.slots:
            row = [0] * (2 + 5 * len(self.out_sizes))
            if weights is not None:
                row[:2] = weights.a_t.data_ptr(), weights.a_t.shape[1]
                for shard in weights.shards:
                    row[2 + 5 * shard.index:7 + 5 * shard.index] = (
                        shard.b_t.data_ptr(), shard.rank, shard.rank_offset, shard.out_offset, shard.out_size)
            table.append(row)
        return torch.tensor(table, dtype=torch.int64)

    @functools.cached_property
    def packed(self) -> PackedLoRA:
        """The kernels' layout, built at their first use of this stack (a copy on the device, where it is fast)."""
        device = next(s.a_t.device for s in self.slots if s is not None)
        a_parts, b_parts, slot_meta, shard_meta = [], [], [], []
        a_rows = b_size = 0
        for weights in self.slots:
            meta = [[0, 0, 0] for _ in self.out_sizes]
            total = 0
            if weights is not None:
                a_parts.append(weights.a_t.t())
                total = weights.a_t.shape[1]
                for shard in weights.shards:
                    meta[shard.index] = [shard.rank, shard.rank_offset, b_size]
                    b_parts.append(shard.b_t.t().reshape(-1))
                    b_size += shard.rank * shard.out_size
            slot_meta.append([a_rows, total])
            shard_meta.append(meta)
            a_rows += total

        def as_tensor(data: list) -> torch.Tensor:
            return torch.tensor(data, dtype=torch.int64, device=device)

        return PackedLoRA(torch.cat(a_parts), torch.cat(b_parts), as_tensor(slot_meta), as_tensor(shard_meta),
                          as_tensor([list(p) for p in zip(self.out_offsets, self.out_sizes)]))


def build_stack(per_slot: Sequence[Sequence[LoRAPair | None] | None], out_sizes: Sequence[int],
                device: torch.device) -> LoRAStack | None:
    """Each slot's per-shard (A, B) for one projection; None if no slot adapts it."""
    slots = [slot_lora(shards, out_sizes, device) for shards in per_slot]
    return None if all(s is None for s in slots) else LoRAStack(slots, list(out_sizes))


def add_lora(y: torch.Tensor, x: torch.Tensor, groups: Sequence[RowGroup], stack: LoRAStack) -> None:
    """y[rows] += each group's LoRA delta, in place: x [T, in], y [T, sum of out_sizes]."""
    for group in groups:
        weights = stack.slots[group.slot]
        if weights is None:
            continue
        rows = group.rows
        h = x[rows] @ weights.a_t
        for shard in weights.shards:
            out = y[:, shard.out_offset:shard.out_offset + shard.out_size]
            h_shard = h[:, shard.rank_offset:shard.rank_offset + shard.rank]
            if isinstance(rows, slice):
                out[rows].addmm_(h_shard, shard.b_t)
            else:
                out.index_add_(0, rows, h_shard @ shard.b_t)


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
