"""Every attention backend against the PyTorch reference, and the reference against dense causal attention."""

import pytest
import torch
import torch.nn.functional as F

from foreseer.attention import AttentionMetadata, PrefillSegment, get_backend
from foreseer.attention.cpu_backend import load_cpu_kernels
from foreseer.core.block_manager import FREED

BLOCK = 16
HEADS, KV_HEADS, DIM = 6, 2, 64


def _run(backend_name: str, seqs, seed: int = 0, head_dim: int = DIM, block: int = BLOCK, chains: bool = False,
         window: int | None = None, softcap: float | None = None, freed: bool = False):
    """seqs: (context_len, new_tokens) per request. The context's K/V is written first, then one step runs. With
    `chains`, every request with context runs its new tokens as decode rows (a chain of drafts to verify, or a
    draft model's catch-up): consecutive rows on one block table, each seeing one more token. `window` and
    `softcap` go to the backend and the dense reference; `freed`: the blocks wholly behind each request's window
    are given back (FREED in its table) and filled with NaN, so that reading one would show."""
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
    if freed:
        tables = [table.clone() for table in tables]
        for (ctx, _), table in zip(seqs, tables):
            behind = max(ctx - window + 1, 0) // block
            k_cache[table[:behind]] = float("nan")
            v_cache[table[:behind]] = float("nan")
            table[:behind] = FREED
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
    out = backend.forward(q, k, v, (k_cache, v_cache), metadata, head_dim**-0.5, window, softcap)
    dense = []
    for i in order:
        ctx, new = seqs[i]
        mask = torch.ones(new, ctx + new, dtype=torch.bool).tril(ctx)
        if window is not None:  # query j (position ctx + j) sees keys after ctx + j - window
            mask &= torch.arange(ctx + new)[None, :] > (ctx + torch.arange(new))[:, None] - window
        qs, ks, vs = (t.transpose(0, 1).double() for t in (full_q[i], full_k[i], full_v[i]))
        ks, vs = ks.repeat_interleave(HEADS // KV_HEADS, 0), vs.repeat_interleave(HEADS // KV_HEADS, 0)
        scores = qs @ ks.transpose(1, 2) * head_dim**-0.5
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        o = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ vs
        dense.append(o.transpose(0, 1).float())
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


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("window, softcap", [(8, None), (33, None), (None, 5.0), (16, 5.0)])
def test_windows_and_softcaps_match_dense_attention(backend, window, softcap):
    """Sliding windows (across blocks, over contexts longer and shorter than them) and soft-capped scores, in
    decode rows and prefill chunks; blocks behind the windows given back and full of NaN are never read."""
    out, dense = _run(backend, MIXED, seed=5, window=window, softcap=softcap, freed=window is not None)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
    out, dense = _run(backend, [(37, 4), (16, 6), (100, 2), (5, 31)], seed=6, chains=True, window=window,
                      softcap=softcap, freed=window is not None)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="attention_backend"):
        get_backend("flash", torch.device("cpu"), torch.float32)
