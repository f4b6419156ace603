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

    def forward(self, q, k, v, kv_cache, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        self.write_kv(k_cache, v_cache, metadata.slot_mapping, k, v)
        num_decodes = metadata.num_decode_tokens
        if num_decodes == len(q):  # a decode-only step: no output to assemble
            return self.decode(q, k_cache, v_cache, metadata, scale)
        out = torch.empty_like(q)
        if num_decodes:
            out[:num_decodes] = self.decode(q[:num_decodes], k_cache, v_cache, metadata, scale)
        for seg in metadata.prefills:
            end = seg.query_start + seg.query_len
            n_ctx_blocks = -(-seg.context_len // metadata.block_size)
            table = seg.block_table[:n_ctx_blocks]
            k_ctx = self.gather_keys(k_cache, table)[:seg.context_len]
            v_ctx = v_cache[table].flatten(0, 1)[:seg.context_len]
            out[seg.query_start:end] = self.prefill(
                q[seg.query_start:end], k[seg.query_start:end], v[seg.query_start:end], k_ctx, v_ctx, scale,
                seg.tree_mask,
            )
        return out

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
