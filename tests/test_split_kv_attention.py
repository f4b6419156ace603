"""The split-KV decode kernel (chunks merged by a unified max) against softmax(q k^T) v in float64."""

import pytest
import torch

from foreseer.attention import AttentionMetadata
from foreseer.attention.cpu_backend import CpuPagedAttention

BLOCK, DIM = 16, 64
ODD_LENS = [1, 15, 17, 1000, 4100]


def _caches(lens, num_heads, num_kv_heads, head_dim=DIM, block=BLOCK, seed=0, q_scale=1.0, tables=None):
    """Random fp32 caches in the CPU layout with each row's blocks scattered (a permutation, so block tables are
    not contiguous); `tables` [rows] gives rows a shared table: rows with the same index share it (a chain)."""
    g = torch.Generator().manual_seed(seed)
    tables = list(range(len(lens))) if tables is None else tables
    longest = {t: max(n for n, u in zip(lens, tables) if u == t) for t in set(tables)}
    width = max(-(-n // block) for n in longest.values())
    num_blocks = sum(-(-n // block) for n in longest.values()) + 3
    perm, start, by_table = torch.randperm(num_blocks, generator=g), 0, {}
    for t in sorted(longest):
        n = -(-longest[t] // block)
        by_table[t] = torch.nn.functional.pad(perm[start:start + n], (0, width - n))
        start += n
    k_cache = torch.randn(num_blocks, num_kv_heads, head_dim, block, generator=g)
    v_cache = torch.randn(num_blocks, block, num_kv_heads, head_dim, generator=g)
    q = torch.randn(len(lens), num_heads, head_dim, generator=g) * q_scale
    return q, k_cache, v_cache, torch.stack([by_table[t] for t in tables]), torch.tensor(lens)


def _decode(backend, q, k_cache, v_cache, tables, lens):
    metadata = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.int64), num_decode_tokens=len(lens), decode_block_tables=tables,
        decode_seq_lens=lens, max_decode_seq_len=int(lens.max()), prefills=[], block_size=k_cache.shape[-1],
    )
    return backend.decode(q, k_cache, v_cache, metadata, q.shape[-1] ** -0.5)


def _reference(q, k_cache, v_cache, tables, lens):
    """softmax(q k^T * scale) v per row, in float64, from the caches gathered token by token."""
    group = q.shape[1] // v_cache.shape[2]
    out = []
    for b, n in enumerate(lens.tolist()):
        keys = k_cache[tables[b]].movedim(-1, -3).flatten(0, 1)[:n].double().repeat_interleave(group, 1)
        values = v_cache[tables[b]].flatten(0, 1)[:n].double().repeat_interleave(group, 1)
        scores = torch.einsum("hd,nhd->hn", q[b].double(), keys) * q.shape[-1] ** -0.5
        out.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), values))
    return torch.stack(out)


def _assert_exact(out, expected):
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("lens", [[n] for n in ODD_LENS] + [ODD_LENS, [4100, 1, 33, 17, 250, 15]])
def test_split_kv_matches_float64_softmax(group, lens):
    inputs = _caches(lens, 3 * group, 3, seed=len(lens) + group)
    _assert_exact(_decode(CpuPagedAttention(), *inputs), _reference(*inputs))


@pytest.mark.parametrize("chunk_tokens", [16, 48, 256])
def test_many_small_chunks_merge_exactly(chunk_tokens):
    """Chunk sizes forced small, so that even short rows merge several chunks (the last one partial)."""
    inputs = _caches([17, 1000, 4100, 15, 33], 9, 3, seed=1)
    _assert_exact(_decode(CpuPagedAttention(chunk_tokens=chunk_tokens), *inputs), _reference(*inputs))


@pytest.mark.parametrize("head_dim, block, group", [(128, 16, 2), (32, 8, 3), (48, 16, 5), (64, 1, 4), (96, 32, 1),
                                                    (16, 16, 4), (64, 16, 6), (80, 16, 3)])
def test_other_shapes_match(head_dim, block, group):
    """Head sizes off the 32-dim register slices, block sizes off the 16 SIMD lanes, groups off the register tiles
    (which take up to 5 query heads per KV head)."""
    inputs = _caches([1, 17, 300, 1500], 2 * group, 2, head_dim=head_dim, block=block, seed=head_dim)
    _assert_exact(_decode(CpuPagedAttention(), *inputs), _reference(*inputs))


def test_chain_rows_sharing_a_block_table():
    """A request verifying drafts: consecutive rows on one table, each seeing one more token; with other requests
    around it, and a chain across a chunk boundary (1023 .. 1026 with 1024-token chunks)."""
    lens = [40, 4097, 4098, 4099, 4100, 15, 1023, 1024, 1025, 1026]
    tables = [0, 1, 1, 1, 1, 2, 3, 3, 3, 3]
    inputs = _caches(lens, 9, 3, seed=5, tables=tables)
    _assert_exact(_decode(CpuPagedAttention(), *inputs), _reference(*inputs))


def test_a_row_is_bit_identical_alone_in_a_batch_and_in_a_chain():
    q, k_cache, v_cache, tables, lens = _caches([17, 4100, 4099, 1000, 1, 4098], 9, 3, seed=7,
                                                tables=[0, 1, 1, 2, 3, 1])
    backend = CpuPagedAttention()
    batch = _decode(backend, q, k_cache, v_cache, tables, lens)
    for row in range(len(lens)):
        alone = _decode(backend, q[row:row + 1], k_cache, v_cache, tables[row:row + 1], lens[row:row + 1])
        assert torch.equal(alone[0], batch[row]), row


@pytest.mark.parametrize("phi", [-1000.0, 1000.0])
def test_a_unified_max_far_off_falls_back_to_each_chunks_own_max(phi):
    """phi far below the scores (their exps would overflow) or far above (every exp would underflow to zero): each
    chunk is weighted with its own max instead, and the result stays exact."""
    inputs = _caches(ODD_LENS, 9, 3, seed=2)
    backend = CpuPagedAttention(unified_max=phi)
    _assert_exact(_decode(backend, *inputs), _reference(*inputs))
    chunks = sum(-(-n // 1024) for n in ODD_LENS) * 9  # every (row, head, chunk) partial, 1024-token chunks at most
    assert backend.recomputed_chunks >= chunks


def test_a_unified_max_near_the_scores_needs_no_fallback():
    inputs = _caches(ODD_LENS, 9, 3, seed=2)
    backend = CpuPagedAttention(unified_max=0.0)
    _assert_exact(_decode(backend, *inputs), _reference(*inputs))
    assert backend.recomputed_chunks == 0


def test_peaked_scores_far_from_the_sink_fall_back_and_stay_exact():
    """Large queries spread the scores over hundreds of units: the sink's score is no longer within reach of every
    chunk's max, some chunks take their own, and the softmax (near one-hot) is still exact. Scores that large carry
    fp32 rounding of ~1e-5 into the exponent whatever the kernel, so the comparison is with the reference kernel,
    which computes the same fp32 scores."""
    inputs = _caches(ODD_LENS, 9, 3, seed=3, q_scale=60.0)
    backend = CpuPagedAttention()
    reference = _decode(CpuPagedAttention(decode_kernel="reference"), *inputs)
    torch.testing.assert_close(_decode(backend, *inputs), reference, rtol=1e-5, atol=1e-6)
    assert backend.recomputed_chunks > 0


def test_layer_statistic_is_kept_per_key_cache():
    first, second = _caches([1000, 17], 9, 3, seed=4), _caches([4100], 9, 3, seed=6, q_scale=3.0)
    backend = CpuPagedAttention(unified_max="layer")
    for inputs in (first, second, first, second):
        _assert_exact(_decode(backend, *inputs), _reference(*inputs))
    assert set(backend.layer_max_score) == {first[1].data_ptr(), second[1].data_ptr()}
    q, k_cache, _, tables, lens = second
    keys = k_cache[tables[0]].movedim(-1, -3).flatten(0, 1)[:lens[0]].repeat_interleave(3, 1)
    top = (torch.einsum("hd,nhd->hn", q[0], keys) * DIM**-0.5).max().item()
    assert backend.layer_max_score[k_cache.data_ptr()] == pytest.approx(top, rel=1e-5)


def test_reference_kernel_stays_selectable():
    inputs = _caches(ODD_LENS, 9, 3, seed=8)
    _assert_exact(_decode(CpuPagedAttention(decode_kernel="reference"), *inputs), _reference(*inputs))
    with pytest.raises(ValueError, match="decode_kernel"):
        CpuPagedAttention(decode_kernel="flash")
    with pytest.raises(ValueError, match="unified_max"):
        CpuPagedAttention(unified_max="global")
