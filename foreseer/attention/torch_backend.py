"""Pure-PyTorch paged attention: the CPU path and the reference for every other backend."""

import torch
import torch.nn.functional as F

from foreseer.attention.backend import AttentionBackend, AttentionMetadata


class TorchPagedAttention(AttentionBackend):
    name = "torch"

    def allocate_kv_cache(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        # torch.empty leaves pages untouched until used, so a large cache costs nothing up front.
        return [
            (torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]

    def forward(self, q, k, v, kv_cache, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, metadata.slot_mapping, k)
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, metadata.slot_mapping, v)
        out = torch.empty_like(q)
        num_decodes = metadata.num_decode_tokens
        if num_decodes:
            out[:num_decodes] = _decode_attention(
                q[:num_decodes], k_cache, v_cache, metadata.decode_block_tables, metadata.decode_seq_lens, scale
            )
        for seg in metadata.prefills:
            end = seg.query_start + seg.query_len
            qs = q[seg.query_start:end].transpose(0, 1)  # [H, n, D]
            if seg.context_len == 0:
                ks, vs = k[seg.query_start:end].transpose(0, 1), v[seg.query_start:end].transpose(0, 1)
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
            else:
                total = seg.context_len + seg.query_len
                ks = _gather(k_cache, seg.block_table, total).transpose(0, 1)
                vs = _gather(v_cache, seg.block_table, total).transpose(0, 1)
                # Query i sits at position context_len + i and sees keys 0..context_len + i.
                mask = torch.ones(seg.query_len, total, dtype=torch.bool, device=q.device).tril(seg.context_len)
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
            out[seg.query_start:end] = o.transpose(0, 1)
        return out


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of one request: [length, Hkv, D]."""
    return cache[block_table].flatten(0, 1)[:length]


def _decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale):
    """One query token per request. q: [B, H, D] -> [B, H, D]."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    keys = k_cache[block_tables].flatten(1, 2).transpose(1, 2)  # [B, Hkv, L, D]
    values = v_cache[block_tables].flatten(1, 2).transpose(1, 2)
    mask = torch.arange(keys.shape[2], device=q.device) < seq_lens[:, None]
    # The query heads that share a KV head become that head's query rows: GQA without repeating K/V.
    qg = q.view(batch, num_kv_heads, group, head_dim)
    o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask[:, None, None, :], scale=scale)
    return o.reshape(batch, num_heads, head_dim)
