"""The host tier of a model's LoRA adapters: a host-memory cache of adapters read from disk.

- Host: up to `max_cpu_loras` adapters read from disk and converted (CPU tensors), least recently used evicted
  first; adapters in device slots always stay (their packed weights are rebuilt from these), so the cache may
  hold more than its size while every cached adapter is in a slot and another one is staged. The cache does not
  know the slots: its owner says which adapters must stay (`pinned`).
- Disk: the adapter directories. Adapters of waiting requests are read into the host cache ahead of their
  admission by one background thread (`prefetch`), so that a step waits at most for a load already running.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from foreseer.lora.adapter import LoRAAdapter, TargetShape, load_adapter
from foreseer.lora.request import LoRARequest

logger = logging.getLogger(__name__)


class HostCache:
    """Adapters in host memory, least recently used first, and the reads that fill it (foreground or background)."""

    def __init__(self, capacity: int, targets: dict[str, TargetShape], num_layers: int, max_rank: int,
                 dtype: torch.dtype, pinned: Callable[[int], bool]) -> None:
        self.capacity = capacity
        self.targets, self.num_layers, self.max_rank, self.dtype = targets, num_layers, max_rank, dtype
        self.pinned = pinned  # adapters that must stay however full the cache is
        self._entries: OrderedDict[int, tuple[LoRARequest, LoRAAdapter]] = OrderedDict()  # least recent first
        self._known: dict[int, tuple[str, int]] = {}  # id -> (path, bytes) of adapters read without error
        self._loading: dict[int, tuple[LoRARequest, Future]] = {}  # background reads in flight
        self._failed: set[int] = set()  # background reads that failed: read again only when needed
        self._executor: ThreadPoolExecutor | None = None
        self.sync_loads = self.prefetch_loads = self.evictions = 0

    @property
    def ids(self) -> list[int]:
        """Adapters in the cache, least recently used first."""
        return list(self._entries)

    def get(self, lora_int_id: int) -> LoRAAdapter | None:
        """The cached adapter, if any (its recency unchanged)."""
        entry = self._entries.get(lora_int_id)
        return None if entry is None else entry[1]

    def known(self, lora_int_id: int) -> tuple[str, int] | None:
        """(path, bytes) of the adapter last read without error under this id, cached or not."""
        return self._known.get(lora_int_id)

    def path(self, lora_int_id: int) -> str | None:
        """The directory read, or being read, under this id; None if neither."""
        known = self._known.get(lora_int_id)
        pending = self._loading.get(lora_int_id)
        return known[0] if known is not None else pending[0].lora_path if pending is not None else None

    def bytes_of(self, lora_int_ids: Iterable[int]) -> int:
        """The bytes of these adapters, as read."""
        return sum(self._known[i][1] for i in lora_int_ids)

    def load(self, lora_request: LoRARequest) -> LoRAAdapter:
        """The adapter from the cache, else from a read in flight (waiting for it), else read now; ValueError if
        it cannot serve this model."""
        self.collect()
        lora_id = lora_request.lora_int_id
        entry = self._entries.get(lora_id)
        if entry is not None:
            self._entries.move_to_end(lora_id)
            return entry[1]
        pending = self._loading.pop(lora_id, None)
        try:
            adapter = pending[1].result() if pending is not None else self._read(lora_request)
        except ValueError:
            self._known.pop(lora_id, None)
            raise
        self._failed.discard(lora_id)
        self.sync_loads += 1
        self._insert(lora_request, adapter)
        return adapter

    def fetch(self, lora_request: LoRARequest) -> Future:
        """Read the adapter in the background; the future gives the adapter or raises ValueError. It joins the
        cache at the next `collect`."""
        lora_id = lora_request.lora_int_id
        pending = self._loading.get(lora_id)
        if pending is not None and pending[0].lora_path == lora_request.lora_path:
            return pending[1]
        entry = self._entries.get(lora_id)
        if entry is not None and entry[0].lora_path == lora_request.lora_path:
            done: Future = Future()
            done.set_result(entry[1])
            return done
        future = self._pool().submit(self._read, lora_request)
        self._loading[lora_id] = (lora_request, future)
        self._failed.discard(lora_id)
        return future

    def prefetch(self, lora_requests: Sequence[LoRARequest], resident: Collection[int]) -> None:
        """Stage the adapters of waiting requests (in the order they will be admitted): as many distinct ones not
        in `resident` (adapters that keep their place in the cache anyway) as the cache holds beside those."""
        self.collect()
        wanted: dict[int, LoRARequest] = {}
        room = self.capacity - len(resident)
        for lora_request in lora_requests:
            lora_id = lora_request.lora_int_id
            if len(wanted) >= room:
                break
            if lora_id not in resident and lora_id not in wanted:
                wanted[lora_id] = lora_request
        for lora_id, lora_request in wanted.items():
            known = self._known.get(lora_id)
            if known is not None and known[0] != lora_request.lora_path:
                continue  # a new directory under an old id is read when validated, not here
            if lora_id not in self._entries and lora_id not in self._loading and lora_id not in self._failed:
                self.fetch(lora_request)
        for lora_id in reversed(wanted):  # the first to be admitted ends most recently used
            if lora_id in self._entries:
                self._entries.move_to_end(lora_id)

    def finish_loads(self) -> None:
        """Wait for the background reads in flight, and move them into the cache."""
        for _, future in list(self._loading.values()):
            future.exception()  # waits; a failure is collect's to record
        self.collect()

    def collect(self) -> None:
        """Move finished background reads into the cache."""
        for lora_id, (lora_request, future) in list(self._loading.items()):
            if not future.done():
                continue
            del self._loading[lora_id]
            try:
                adapter = future.result()
            except Exception:  # read again, in the foreground, when a request needs it (and fail it there)
                self._failed.add(lora_id)
                continue
            self.prefetch_loads += 1
            self._insert(lora_request, adapter)

    def trim(self) -> None:
        """Evict least recently used adapters that are not pinned while the cache holds more than its size."""
        while len(self._entries) > self.capacity:
            victim = next((i for i in self._entries if not self.pinned(i)), None)
            if victim is None:
                return
            del self._entries[victim]
            self.evictions += 1

    def forget(self, lora_int_id: int) -> bool:
        """Drop the adapter, what is known of it and its read in flight; False if none of these existed."""
        known = self.path(lora_int_id) is not None
        self._entries.pop(lora_int_id, None)
        self._known.pop(lora_int_id, None)
        self._failed.discard(lora_int_id)
        pending = self._loading.pop(lora_int_id, None)
        if pending is not None:
            pending[1].cancel()
        return known

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="foreseer-lora-load")
        return self._executor

    def _read(self, lora_request: LoRARequest) -> LoRAAdapter:
        """Disk to host memory (runs on the loading thread too: touches no shared state)."""
        return load_adapter(lora_request.lora_path, self.targets, self.num_layers, self.max_rank, self.dtype)

    def _insert(self, lora_request: LoRARequest, adapter: LoRAAdapter) -> None:
        lora_id = lora_request.lora_int_id
        self._entries[lora_id] = (lora_request, adapter)
        self._entries.move_to_end(lora_id)
        if self._known.get(lora_id, ("",))[0] != lora_request.lora_path:
            logger.info("read LoRA adapter %r (id %d, rank %d, %s; %.1f MiB)", lora_request.lora_name, lora_id,
                        adapter.rank, ",".join(adapter.target_modules), adapter.num_bytes / 2**20)
        self._known[lora_id] = (lora_request.lora_path, adapter.num_bytes)
        self.trim()
