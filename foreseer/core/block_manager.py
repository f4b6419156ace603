"""Paged KV-cache blocks: reference counts, and prefix caching by chained hashes of full blocks.

Blocks may also be reserved for other data of the same pool (S-LoRA's unified memory: a loaded LoRA adapter's
pages): a reserved block is neither free nor a request's until it is given back.

With a window (a model whose every layer attends to the last `window` tokens alone), a request's blocks wholly
behind its window are given back as its computation moves on; their places in its block table hold FREED, so that
a block's index stays its tokens' position // block_size. They keep their hashes, as any freed block does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the request module imports the speculative decoding package, which uses block managers
    from foreseer.core.request import Request


FREED = -1  # a block table's entry for a block given back because it fell behind the attention window


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and computed
    token_ids: tuple[int, ...] = ()  # kept with the hash to rule out collisions


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 window: int | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.window = window  # every query reads only the keys of its last `window` positions
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Unreferenced blocks in eviction order; freed blocks keep their hash until reused (lazy eviction).
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.reserved: set[int] = set()  # blocks lent out of the KV pool (see reserve)
        # Called with the number of blocks missing when an allocation falls short, before it fails: frees what it
        # can (e.g. idle LoRA adapters' pages) by giving reserved blocks back.
        self.reclaimer: Callable[[int], None] | None = None

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def num_reserved_blocks(self) -> int:
        return len(self.reserved)

    def reserve(self, num_blocks: int) -> list[int] | None:
        """Take `num_blocks` free blocks out of the pool for other data (their cached prefixes are forgotten);
        None, taking nothing, if fewer are free. The reclaimer is not asked: callers free their own first."""
        if num_blocks > self.num_free_blocks:
            return None
        taken = []
        for _ in range(num_blocks):
            block_id = next(iter(self.free_blocks))
            self._take(block_id)
            self._forget_hash(self.blocks[block_id])
            self.reserved.add(block_id)
            taken.append(block_id)
        return taken

    def unreserve(self, block_ids: list[int]) -> None:
        """Give reserved blocks back to the pool."""
        for block_id in block_ids:
            self.reserved.remove(block_id)
            self.blocks[block_id].ref_count = 0
            self.free_blocks[block_id] = None

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Blocks holding the longest cached prefix of the request; at least one token is left to compute."""
        if not self.enable_prefix_caching:
            return []
        self._hash_full_blocks(request, request.num_tokens - 1)
        hits: list[int] = []
        for i, block_hash in enumerate(request.block_hashes[: (request.num_tokens - 1) // self.block_size]):
            block_id = self.cached.get(block_hash)
            if block_id is None or self.blocks[block_id].token_ids != self._block_tokens(request, i):
                break
            hits.append(block_id)
        return hits

    def allocate_slots(self, request: Request, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Make room for `num_new_tokens` more tokens (after any cached prefix); False if blocks run out."""
        num_computed = request.num_computed_tokens + len(cached_blocks) * self.block_size
        needed = self.blocks_needed(num_computed + num_new_tokens) - len(request.block_table) - len(cached_blocks)
        revived = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        if needed + revived > self.num_free_blocks and self.reclaimer is not None:
            self.reclaimer(needed + revived - self.num_free_blocks)
        if needed + revived > self.num_free_blocks:
            return False
        for block_id in cached_blocks:
            self._take(block_id)
        request.block_table.extend(cached_blocks)
        for _ in range(max(needed, 0)):
            block_id = next(iter(self.free_blocks))
            self._take(block_id)
            self._forget_hash(self.blocks[block_id])
            request.block_table.append(block_id)
        self._release_behind_window(request, num_computed)
        return True

    def _release_behind_window(self, request: Request, first_query: int) -> None:
        """Give back the blocks no query from position `first_query` on reads: those wholly before its window."""
        if self.window is None:
            return
        behind = max(first_query - self.window + 1, 0) // self.block_size
        for index in range(min(behind, len(request.block_table))):
            block_id = request.block_table[index]
            if block_id != FREED:
                self._release(block_id)
                request.block_table[index] = FREED

    def cache_computed_blocks(self, request: Request) -> None:
        """Register the request's computed full blocks so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        self._hash_full_blocks(request, request.num_computed_tokens)
        for i in range(request.num_computed_tokens // self.block_size):
            if request.block_table[i] == FREED:  # registered before it fell behind the window
                continue
            block = self.blocks[request.block_table[i]]
            block_hash = request.block_hashes[i]
            if block.hash is None and block_hash not in self.cached:
                block.hash, block.token_ids = block_hash, self._block_tokens(request, i)
                self.cached[block_hash] = block.block_id

    def reset_prefix_cache(self) -> None:
        """Forget every cached block, so that nothing computed before is reused; needs no block in use."""
        if self.num_free_blocks + self.num_reserved_blocks != self.num_blocks:
            raise ValueError("the prefix cache can only be reset while no request holds KV blocks")
        for block in self.blocks:
            block.hash, block.token_ids = None, ()
        self.cached.clear()

    def free(self, request: Request) -> None:
        self._release_tail(request, 0)

    def free_unneeded_blocks(self, request: Request) -> None:
        """Give back blocks beyond the request's tokens (slots of rejected speculative tokens)."""
        self._release_tail(request, self.blocks_needed(request.num_tokens))

    def _release_tail(self, request: Request, keep: int) -> None:
        # Tail blocks are freed first, so they are evicted before the shared prefix blocks.
        for block_id in reversed(request.block_table[keep:]):
            if block_id != FREED:
                self._release(block_id)
        del request.block_table[keep:]

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_blocks[block_id] = None

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_blocks[block_id]
        block.ref_count += 1

    def _forget_hash(self, block: Block) -> None:
        if block.hash is not None:
            del self.cached[block.hash]
            block.hash, block.token_ids = None, ()

    def _block_tokens(self, request: Request, index: int) -> tuple[int, ...]:
        return tuple(request.token_ids[index * self.block_size:(index + 1) * self.block_size])

    def _hash_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Extend the request's hash chain over its first num_tokens // block_size blocks."""
        for i in range(len(request.block_hashes), num_tokens // self.block_size):
            parent = request.block_hashes[i - 1] if i else request.cache_salt
            request.block_hashes.append(hash((parent, self._block_tokens(request, i))))
