"""Every attention backend against the PyTorch reference, and the reference against dense causal attention."""

import pytest
import torch
import torch.nn.functional as F

from foreseer.attention import AttentionMetadata, PrefillSegment, get_backend
from foreseer.attention.cpu_backend import load_cpu_kernels

BLOCK = 16
HEADS, KV_HEADS, DIM = 6, 2, 64


def _run(backend_name: str, seqs, seed: int = 0, head_dim: int = DIM, block: int = BLOCK, chains: bool = False):
    """seqs: (context_len, new_tokens) per request. The context's K/V is written first, then one step runs. With
    `chains`, every request with context runs its new tokens as decode rows (a chain of drafts to verify, or a
    draft model's catch-up): consecutive rows on one block table, each seeing one more token."""
    torch.manual_seed(seed)
    backend = get_backend(backend_name, torch.device("cpu"), torch.float32)
    num_blocks = sum(-(-(ctx + new) // block) for ctx, new in seqs) + 8
    k_cache, v_cache = backend.allocate_kv_cache(1, num_blocks, block, KV_HEADS, head_dim, torch.float32,
                                                 torch.device("cpu"))[0]
    perm = torch.randperm(num_blocks)  # scattered blocks, as after many allocations
    tables, next_block = [], 0
    full_k, full_v, full_q = [], [], []
    for ctx, new in seqs:
        n_blocks = -(-(ctx + new) // block)
        tables.append(perm[next_block:next_block + n_blocks])
        next_block += n_blocks
        full_k.append(torch.randn(ctx + new, KV_HEADS, head_dim))
        full_v.append(torch.randn(ctx + new, KV_HEADS, head_dim))
        full_q.append(torch.randn(new, HEADS, head_dim))

    def slots(table, positions):
        return torch.tensor([int(table[p // block]) * block + p % block for p in positions])

    for (ctx, _), table, k, v in zip(seqs, tables, full_k, full_v):
        if ctx:
            backend.write_kv(k_cache, v_cache, slots(table, range(ctx)), k[:ctx], v[:ctx])
    def decodes_rows(i: int) -> bool:
        return seqs[i][1] == 1 or (chains and seqs[i][0] > 0)

    order = sorted(range(len(seqs)), key=lambda i: not decodes_rows(i))  # decodes first
    q = torch.cat([full_q[i] for i in order])
    k = torch.cat([full_k[i][seqs[i][0]:] for i in order])
    v = torch.cat([full_v[i][seqs[i][0]:] for i in order])
    decodes = [i for i in order if decodes_rows(i)]
    rows = [(i, length) for i in decodes for length in range(seqs[i][0] + 1, sum(seqs[i]) + 1)]
    max_blocks = max((len(tables[i]) for i in decodes), default=0)
    prefills, start = [], len(rows)
    for i in order[len(decodes):]:
        prefills.append(PrefillSegment(start, seqs[i][1], seqs[i][0], tables[i]))
        start += seqs[i][1]
    metadata = AttentionMetadata(
        slot_mapping=torch.cat([slots(tables[i], range(seqs[i][0], sum(seqs[i]))) for i in order]),
        num_decode_tokens=len(rows),
        decode_block_tables=torch.stack([F.pad(tables[i], (0, max_blocks - len(tables[i]))) for i, _ in rows])
        if rows else torch.zeros(0, 0, dtype=torch.int64),
        decode_seq_lens=torch.tensor([length for _, length in rows], dtype=torch.int64),
        max_decode_seq_len=max((length for _, length in rows), default=0),
        prefills=prefills,
        block_size=block,
    )
    out = backend.forward(q, k, v, (k_cache, v_cache), metadata, head_dim**-0.5)
    dense = []
    for i in order:
        ctx, new = seqs[i]
        mask = torch.ones(new, ctx + new, dtype=torch.bool).tril(ctx)
        o = F.scaled_dot_product_attention(full_q[i].transpose(0, 1), full_k[i].transpose(0, 1),
                                           full_v[i].transpose(0, 1), attn_mask=mask, enable_gqa=True)
        dense.append(o.transpose(0, 1))
    return out, torch.cat(dense)


MIXED = [(0, 1), (37, 1), (15, 1), (16, 1), (100, 1), (0, 23), (40, 9), (17, 1), (5, 31)]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_backend_matches_dense_attention(backend):
    if backend == "cpu" and load_cpu_kernels() is None:
        pytest.skip("no C++ compiler for the CPU kernels")
    out, dense = _run(backend, MIXED)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_dim, block", [(128, 16), (32, 8), (64, 1)])
def test_cpu_kernels_other_shapes_match_reference(head_dim, block):
    if load_cpu_kernels() is None:
        pytest.skip("no C++ compiler for the CPU kernels")
    ours, _ = _run("cpu", MIXED, seed=3, head_dim=head_dim, block=block)
    reference, _ = _run("torch", MIXED, seed=3, head_dim=head_dim, block=block)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_chains_of_decode_rows_match_dense_attention(backend):
    """Several new tokens of a request as decode rows on one block table (the C++ kernels take such a run as one
    task, reading its keys and values once): each row sees the context and the chain's rows up to itself."""
    if backend == "cpu" and load_cpu_kernels() is None:
        pytest.skip("no C++ compiler for the CPU kernels")
    out, dense = _run(backend, [(37, 4), (15, 1), (16, 6), (100, 2), (0, 23), (40, 9), (5, 31)], chains=True)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="attention_backend"):
        get_backend("flash", torch.device("cpu"), torch.float32)
