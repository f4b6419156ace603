"""The attention backend interface and the batch metadata it consumes."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class PrefillSegment:
    """A run of new query tokens of one request (a prefill chunk, or several tokens to verify)."""

    query_start: int  # offset of its first token in the flattened batch
    query_len: int
    context_len: int  # tokens already in the KV cache before this step
    block_table: torch.Tensor  # [num_blocks] int64
    # [query_len, query_len] bool, which new tokens each new token sees (a token tree); None: causal
    tree_mask: torch.Tensor | None = None


@dataclass
class AttentionMetadata:
    """One step's batch layout. Decode tokens (one per request) come first in the flattened batch."""

    slot_mapping: torch.Tensor  # [num_tokens] cache slot of each new token
    num_decode_tokens: int
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int64, padded with 0
    decode_seq_lens: torch.Tensor  # [num_decodes] int64, KV length including the new token
    max_decode_seq_len: int
    prefills: list[PrefillSegment]
    block_size: int


class AttentionBackend(ABC):
    """Paged attention: writes the step's new K/V into the cache, then attends over each request's blocks."""

    name: str

    @abstractmethod
    def allocate_kv_cache(
        self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One (key, value) cache pair per layer."""

    @abstractmethod
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor], metadata: AttentionMetadata, scale: float,
        window: int | None = None, softcap: float | None = None,
    ) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, Hkv, D]; returns [T, H, D]. window: each query attends to the last `window`
        tokens up to itself; softcap: scores become softcap * tanh(score / softcap) before the softmax."""

    @abstractmethod
    def move_kv(self, kv_cache: tuple[torch.Tensor, torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the cached K/V of slots `src` to slots `dst` (an accepted tree path, packed after its root)."""
