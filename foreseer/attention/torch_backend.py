"""Pure-PyTorch paged attention: the portable path and the reference for every other backend."""

import torch
import torch.nn.functional as F

from foreseer.attention.backend import AttentionBackend, AttentionMetadata


class TorchPagedAttention(AttentionBackend):
    """Cache layout per layer: keys and values both [num_blocks, block_size, Hkv, D]."""

    name = "torch"

    # Padded decode attention reads unused slots (masked out, but NaN garbage would leak through 0 * NaN).
    allocate = staticmethod(torch.zeros)

    def allocate_kv_cache(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        return [
            (self.allocate(self.key_shape(shape), dtype=dtype, device=device),
             self.allocate(shape, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]

    @staticmethod
    def key_shape(shape: tuple[int, int, int, int]) -> tuple[int, ...]:
        return shape

    def write_kv(self, k_cache, v_cache, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        k_cache.view(-1, *k.shape[1:]).index_copy_(0, slots, k)
        v_cache.view(-1, *v.shape[1:]).index_copy_(0, slots, v)

    def move_kv(self, kv_cache, src: torch.Tensor, dst: torch.Tensor) -> None:
        k_cache, v_cache = kv_cache
        self.move_keys(k_cache, src, dst)
        values = v_cache.view(-1, *v_cache.shape[2:])
        values[dst] = values[src]

    def move_keys(self, k_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        keys = k_cache.view(-1, *k_cache.shape[2:])
        keys[dst] = keys[src]

    def gather_keys(self, k_cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        """Keys of the blocks in block_tables [..., n]: [..., n * block_size, Hkv, D]."""
        return k_cache[block_tables].flatten(-4, -3)

    def decode(self, q, k_cache, v_cache, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        """One query token per request. q: [B, H, D] -> [B, H, D]."""
        batch, num_heads, head_dim = q.shape
        num_kv_heads = v_cache.shape[2]
        tables = metadata.decode_block_tables
        keys = self.gather_keys(k_cache, tables).transpose(1, 2)  # [B, Hkv, L, D]
        values = v_cache[tables].flatten(1, 2).transpose(1, 2)
        mask = torch.arange(keys.shape[2], device=q.device) < metadata.decode_seq_lens[:, None]
        # The query heads that share a KV head become that head's query rows: GQA without repeating K/V.
        qg = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
        o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask[:, None, None, :], scale=scale)
        return o.reshape(batch, num_heads, head_dim)

    def forward(self, q, k, v, kv_cache, metadata: AttentionMetadata, scale: float, window: int | None = None,
                softcap: float | None = None) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        self.write_kv(k_cache, v_cache, metadata.slot_mapping, k, v)
        plain = window is None and softcap is None

        def decode(qd: torch.Tensor) -> torch.Tensor:
            if plain:
                return self.decode(qd, k_cache, v_cache, metadata, scale)
            return self.decode_masked(qd, k_cache, v_cache, metadata, scale, window, softcap)

        num_decodes = metadata.num_decode_tokens
        if num_decodes == len(q):  # a decode-only step: no output to assemble
            return decode(q)
        out = torch.empty_like(q)
        if num_decodes:
            out[:num_decodes] = decode(q[:num_decodes])
        block_size = metadata.block_size
        for seg in metadata.prefills:
            end = seg.query_start + seg.query_len
            n_ctx_blocks = -(-seg.context_len // block_size)
            # With a window, the context starts at the block of the first query's earliest key: blocks before it
            # may already be freed.
            first = 0 if window is None else max(0, seg.context_len - window + 1) // block_size
            table = seg.block_table[first:n_ctx_blocks]
            start = first * block_size
            k_ctx = self.gather_keys(k_cache, table)[:seg.context_len - start]
            v_ctx = v_cache[table].flatten(0, 1)[:seg.context_len - start]
            qs, ks, vs = q[seg.query_start:end], k[seg.query_start:end], v[seg.query_start:end]
            if plain:
                out[seg.query_start:end] = self.prefill(qs, ks, vs, k_ctx, v_ctx, scale, seg.tree_mask)
            else:
                out[seg.query_start:end] = prefill_masked(qs, ks, vs, k_ctx, v_ctx, start, scale, window, softcap,
                                                          seg.tree_mask)
        return out

    def decode_masked(self, q, k_cache, v_cache, metadata: AttentionMetadata, scale: float, window: int | None,
                      softcap: float | None) -> torch.Tensor:
        """decode with a window (only each row's last `window` tokens, gathered from their blocks alone: blocks
        behind a window may be freed) or soft-capped scores."""
        batch, num_heads, head_dim = q.shape
        num_kv_heads, block_size = v_cache.shape[2], metadata.block_size
        lens, tables = metadata.decode_seq_lens, metadata.decode_block_tables
        num_blocks = -(-lens // block_size)
        first = torch.zeros_like(lens) if window is None else (lens - window).clamp(min=0) // block_size
        width = int((num_blocks - first).max())
        index = torch.minimum(first[:, None] + torch.arange(width, device=q.device), num_blocks[:, None] - 1)
        table = tables.gather(1, index)  # [B, width]: each row's visible blocks, then its last one again
        keys = self.gather_keys(k_cache, table).transpose(1, 2)  # [B, Hkv, L, D]
        values = v_cache[table].flatten(1, 2).transpose(1, 2)
        positions = first[:, None] * block_size + torch.arange(width * block_size, device=q.device)
        allowed = positions < lens[:, None]
        if window is not None:
            allowed &= positions >= (lens - window)[:, None]
        # Slots past a row's length may never have been written (the CPU backend's cache is not zeroed): masked
        # scores are dropped, but a NaN there would still reach the output through 0 * NaN.
        unseen = ~allowed[:, None, :, None]
        keys, values = keys.masked_fill(unseen, 0.0), values.masked_fill(unseen, 0.0)
        qg = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
        o = attend(qg, keys, values, allowed[:, None, None, :], scale, softcap)
        return o.reshape(batch, num_heads, head_dim)

    def prefill(self, q, k, v, k_ctx, v_ctx, scale: float, tree_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of n new tokens over the cached context and themselves: causal among the new tokens,
        or as `tree_mask` [n, n] says (a token tree).

        q: [n, H, D]; k, v: [n, Hkv, D]; k_ctx, v_ctx: [context_len, Hkv, D] -> [n, H, D].
        """
        qs = q.transpose(0, 1)
        if not len(k_ctx) and tree_mask is None:
            o = F.scaled_dot_product_attention(qs, k.transpose(0, 1), v.transpose(0, 1), is_causal=True,
                                               scale=scale, enable_gqa=True)
            return o.transpose(0, 1)
        ks, vs = torch.cat([k_ctx, k]).transpose(0, 1), torch.cat([v_ctx, v]).transpose(0, 1)
        # Query i sits at position context_len + i and sees keys 0..context_len + i.
        mask = torch.ones(len(q), ks.shape[1], dtype=torch.bool, device=q.device).tril(len(k_ctx))
        if tree_mask is not None:
            mask[:, len(k_ctx):] = tree_mask
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
        return o.transpose(0, 1)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor, scale: float,
           softcap: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, over the allowed keys) v, with batch dimensions in front; soft-capped scores as
    Gemma 2's reference computes them (scale, divide, tanh, multiply, then the mask), else PyTorch's SDPA."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=scale)
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), values)


# Queries of a masked prefill attended at once: its scores take queries x keys x heads floats.
_MASKED_PREFILL_QUERIES = 256


def prefill_masked(q, k, v, k_ctx, v_ctx, ctx_start: int, scale: float, window: int | None, softcap: float | None,
                   tree_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill attention with a window and/or soft-capped scores. The context holds the cached tokens from
    position ctx_start; new token i sits at its depth after the context (i for a chain) and sees the new tokens
    the causal order (or `tree_mask`) lets it, and only keys less than `window` positions behind it.

    q: [n, H, D]; k, v: [n, Hkv, D]; k_ctx, v_ctx: [context_len - ctx_start, Hkv, D] -> [n, H, D]."""
    n, num_heads, _ = q.shape
    group = num_heads // k.shape[1]
    context_len = ctx_start + len(k_ctx)
    sees_new = torch.ones(n, n, dtype=torch.bool, device=q.device).tril() if tree_mask is None else tree_mask
    new_positions = context_len + sees_new.sum(-1) - 1  # a token's depth in its chain or tree
    key_positions = torch.cat([torch.arange(ctx_start, context_len, device=q.device), new_positions])
    keys = torch.cat([k_ctx, k]).transpose(0, 1).repeat_interleave(group, dim=0)  # [H, L, D]
    values = torch.cat([v_ctx, v]).transpose(0, 1).repeat_interleave(group, dim=0)
    out = torch.empty_like(q)
    for begin in range(0, n, _MASKED_PREFILL_QUERIES):
        rows = slice(begin, begin + _MASKED_PREFILL_QUERIES)
        allowed = torch.cat([torch.ones(len(sees_new[rows]), len(k_ctx), dtype=torch.bool, device=q.device),
                             sees_new[rows]], dim=1)
        if window is not None:
            allowed &= key_positions[None, :] > new_positions[rows, None] - window
        o = attend(q[rows].transpose(0, 1), keys, values, allowed, scale, softcap)
        out[rows] = o.transpose(0, 1)
    return out
