"""A step's model inputs: the segments of tokens each request computes, flattened into one batch with the
attention metadata the backends read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from foreseer.attention import AttentionMetadata, PrefillSegment
from foreseer.core.draft_tree import DraftTree


@dataclass
class Segment:
    """Tokens of one request to compute in a step: real tokens, then the nodes of a draft tree to verify."""

    token_ids: list[int]  # the real tokens, starting at position `start`
    start: int  # tokens already in the KV cache
    block_table: list[int]
    draft: DraftTree = field(default_factory=DraftTree)
    samples: bool = True  # whether logits are wanted (at the last real token and at each draft node)


@dataclass
class Batch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    sample_index: list[int]  # rows to take logits from, segment by segment
    sample_slots: list[list[int]]  # per sampling segment: cache slots of its last real token and its draft nodes


def prepare_batch(segments: Sequence[Segment], block_size: int, device: torch.device,
                  max_decode_run: int = 1) -> Batch:
    """Flatten segments (decodes first, for the backend's batched decode path) into model inputs.

    A segment of at most `max_decode_run` new tokens over cached context, followed by a chain of drafts or none,
    runs as decode rows. The target keeps 1: its prompt chunks then always take the prefill kernels, as the
    reference does. A draft model, whose numbers need not match anything, runs its catch-ups as decode rows."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    decode_tables: list[list[int]] = []
    decode_lens: list[int] = []
    prefills: list[PrefillSegment] = []
    sample_index: list[int] = []
    sample_slots: list[list[int]] = []
    for seg in segments:
        start, draft, table = seg.start, seg.draft, seg.block_table
        num_real = len(seg.token_ids)
        n = num_real + len(draft)
        query_start = len(input_ids)
        input_ids.extend(seg.token_ids + draft.token_ids)
        # Draft tokens sit at their depth after the last real token; their slots follow it in node order.
        positions.extend(range(start, start + num_real))
        positions.extend(start + num_real - 1 + depth for depth in draft.depths())
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, start + n))
        if runs_as_decode_rows(num_real, draft, start, max_decode_run):
            if prefills:
                raise ValueError("decode segments must come before prefill chunks and trees")
            # A chain's token j sees the cache up to itself: a decode row of its own, all on one block table.
            decode_tables.extend([table] * n)
            decode_lens.extend(range(start + 1, start + n + 1))
        else:  # a prefill chunk, or a token tree to verify, over the cached context
            tree_mask = None if draft.is_chain else draft.attention_mask(device)
            prefills.append(PrefillSegment(query_start, n, start, torch.tensor(table, device=device), tree_mask))
        if seg.samples:
            # Logits at the last real token and at each draft: the distributions that verify the drafts.
            sample_index.extend(range(len(input_ids) - len(draft) - 1, len(input_ids)))
            sample_slots.append(slots[-len(draft) - 1:])

    def tensor(data: list) -> torch.Tensor:
        return torch.tensor(data, dtype=torch.int64, device=device)

    max_blocks = max((len(t) for t in decode_tables), default=0)
    metadata = AttentionMetadata(
        slot_mapping=tensor(slots),
        num_decode_tokens=len(decode_tables),
        decode_block_tables=tensor([t + [0] * (max_blocks - len(t)) for t in decode_tables]),
        decode_seq_lens=tensor(decode_lens),
        max_decode_seq_len=max(decode_lens, default=0),
        prefills=prefills,
        block_size=block_size,
    )
    return Batch(tensor(input_ids), tensor(positions), metadata, sample_index, sample_slots)


def runs_as_decode_rows(num_real: int, draft: DraftTree, start: int = 1, max_run: int = 1) -> bool:
    """Whether a segment runs as decode rows: one new token (up to `max_run` over cached context), with or without
    a chain of drafts after it."""
    return (num_real == 1 or (start > 0 and num_real <= max_run)) and draft.is_chain
