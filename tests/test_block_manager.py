"""Block manager: reference counts, prefix hits by chained hashes, lazy eviction."""

from foreseer.core.block_manager import BlockManager
from foreseer.core.request import Request
from foreseer.sampling_params import SamplingParams


def _request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=8), 8, set())


def _compute_all(bm: BlockManager, request: Request) -> None:
    cached = bm.find_cached_prefix(request)
    request.num_computed_tokens = len(cached) * bm.block_size
    assert bm.allocate_slots(request, request.num_tokens - request.num_computed_tokens, cached)
    request.num_computed_tokens = request.num_tokens
    bm.cache_computed_blocks(request)


def test_shared_prefix_is_found_and_reference_counted():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = _request("a", list(range(10)))  # blocks [0..3], [4..7], partial [8, 9]
    _compute_all(bm, a)
    assert bm.num_free_blocks == 7
    b = _request("b", list(range(8)) + [50, 51, 52])
    cached = bm.find_cached_prefix(b)
    assert cached == a.block_table[:2]
    assert bm.allocate_slots(b, 3, cached)
    assert [bm.blocks[i].ref_count for i in cached] == [2, 2]
    assert bm.num_free_blocks == 6  # only one new block for tokens 8..10
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in cached] == [1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 10


def test_different_prefix_or_salt_misses():
    bm = BlockManager(num_blocks=10, block_size=4)
    _compute_all(bm, _request("a", list(range(12))))
    assert bm.find_cached_prefix(_request("b", [99] + list(range(1, 12)))) == []
    salted = _request("c", list(range(12)))
    salted.cache_salt = "adapter-1"
    assert bm.find_cached_prefix(salted) == []


def test_whole_prompt_hit_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=10, block_size=4)
    _compute_all(bm, _request("a", list(range(8))))
    assert len(bm.find_cached_prefix(_request("b", list(range(8))))) == 1


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = _request("a", list(range(8)))
    _compute_all(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4
    assert len(bm.find_cached_prefix(_request("b", list(range(9))))) == 2  # revived from the free list
    big = _request("c", list(range(100, 116)))
    assert bm.allocate_slots(big, 16)  # takes every block, evicting the cached ones
    assert bm.find_cached_prefix(_request("d", list(range(9)))) == []
    assert not bm.allocate_slots(_request("e", [1, 2]), 2)
