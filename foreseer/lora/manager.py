"""A model's LoRA adapters in three tiers: device slots, a host-memory cache, and disk.

- Device (`device_slots`): `max_loras` slots whose adapters' weights are packed on the compute device for the
  batched kernels. A slot is kept while a running request uses its adapter (pinned); otherwise the least recently
  used adapter gives up its slot when another needs one (those that no unfinished request waits for first). With
  `lora_memory="unified"`, idle adapters also give their slots' KV pages back when KV allocation falls short.
- Host (`host_cache`): up to `max_cpu_loras` adapters read from disk, least recently used evicted first; adapters
  in device slots always stay.
- Disk: the adapter directories, read ahead of their requests' admission by the host cache's loading thread.

The manager ties the tiers to the requests: it counts each adapter's unfinished and running requests, and from
them decides which adapters may give up their slots, and in which order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from foreseer.config import LoRAConfig
from foreseer.lora.adapter import LoRAAdapter, base_targets, module_out_sizes
from foreseer.lora.backends import LoRABackend
from foreseer.lora.context import LoRABatch
from foreseer.lora.device_slots import DeviceSlots
from foreseer.lora.host_cache import HostCache
from foreseer.lora.request import LoRARequest

if TYPE_CHECKING:
    from foreseer.core.block_manager import BlockManager


class LoRAInUseError(RuntimeError):
    """The adapter cannot be unloaded: unfinished requests use it."""


@dataclass(frozen=True)
class LoRAStats:
    """A snapshot of the tiers, for metrics."""

    max_loras: int
    max_cpu_loras: int
    device_adapters: int  # adapters in device slots
    host_adapters: int  # adapters in the host cache (those in device slots included)
    device_bytes: int
    host_bytes: int
    device_pages: int  # KV blocks the device slots hold (unified memory; else 0)
    sync_loads: int  # disk reads a step or a caller waited for (first use, or a prefetch still running)
    prefetch_loads: int  # disk reads done in the background, ahead of use
    device_evictions: int
    host_evictions: int


class LoRAManager:
    def __init__(self, config: LoRAConfig, model: nn.Module, device: torch.device, dtype: torch.dtype,
                 page_bytes: int = 0) -> None:
        self.config = config
        targets = base_targets(model)
        num_layers = len(model.model.layers)
        unified_page_bytes = page_bytes if config.lora_memory == "unified" else None
        self.device_slots = DeviceSlots(config.max_loras, num_layers, module_out_sizes(targets), device, dtype,
                                        unified_page_bytes, on_change=self._slot_changed)
        self.host_cache = HostCache(config.max_cpu_loras, targets, num_layers, config.max_lora_rank, dtype,
                                    pinned=self.device_slots.holds)
        self._running: Counter[int] = Counter()  # running requests per adapter: pins its device slot
        self._users: Counter[int] = Counter()  # unfinished requests per adapter

    def bind_block_manager(self, block_manager: BlockManager) -> None:
        """The KV pool; with unified memory, slots take their pages from it and give idle ones back on demand."""
        self.device_slots.block_manager = block_manager
        if self.device_slots.unified:
            block_manager.reclaimer = self.reclaim

    @property
    def backend(self) -> LoRABackend:
        """The kernels the step's batch runs with."""
        return self.device_slots.backend

    @backend.setter
    def backend(self, backend: LoRABackend) -> None:
        self.device_slots.backend = backend

    @property
    def _read(self) -> Callable[[LoRARequest], LoRAAdapter]:
        """The host cache's disk read, foreground and background (replaceable, to observe the reads)."""
        return self.host_cache._read

    @_read.setter
    def _read(self, read: Callable[[LoRARequest], LoRAAdapter]) -> None:
        self.host_cache._read = read

    # -- what is where -------------------------------------------------------------------------------------
    @property
    def loaded_ids(self) -> list[int]:
        """Adapters in device slots, least recently used first."""
        return self.device_slots.ids

    @property
    def host_ids(self) -> list[int]:
        """Adapters in the host cache, least recently used first."""
        return self.host_cache.ids

    @property
    def slots(self) -> list[int | None]:
        return self.device_slots.slots

    def is_resident(self, lora_int_id: int) -> bool:
        return self.device_slots.holds(lora_int_id)

    def num_running(self, lora_int_id: int) -> int:
        return self._running[lora_int_id]

    def num_obtainable_slots(self) -> int:
        """Slots free, or held by an adapter no running request uses."""
        return self.device_slots.num_free + sum(1 for i in self.device_slots.ids if not self._running[i])

    def pages(self, lora_int_id: int) -> int:
        """KV blocks the adapter takes in a device slot (0 unless unified memory); it must have been read."""
        known = self.host_cache.known(lora_int_id)
        return 0 if known is None else self.device_slots.pages_for(known[1])

    def stats(self) -> LoRAStats:
        host, device = self.host_cache, self.device_slots
        return LoRAStats(
            max_loras=self.config.max_loras, max_cpu_loras=self.config.max_cpu_loras,
            device_adapters=len(device.ids), host_adapters=len(host.ids),
            device_bytes=host.bytes_of(device.ids), host_bytes=host.bytes_of(host.ids),
            device_pages=device.num_pages,
            sync_loads=host.sync_loads, prefetch_loads=host.prefetch_loads,
            device_evictions=device.evictions, host_evictions=host.evictions,
        )

    # -- requests ------------------------------------------------------------------------------------------
    def validate(self, lora_request: LoRARequest) -> int:
        """Check that the adapter can serve this model, reading it if it was never read (or its id now names
        another directory); returns the KV blocks it takes in a device slot. ValueError names the problem."""
        self._check_id(lora_request)
        known = self.host_cache.known(lora_request.lora_int_id)
        if known is None or known[0] != lora_request.lora_path:
            self.host_cache.load(lora_request)
        return self.pages(lora_request.lora_int_id)

    def add_user(self, lora_request: LoRARequest) -> None:
        """A request with this (validated) adapter was queued: it keeps the adapter from being unloaded, and
        the adapter takes a free device slot at once if it is in the host cache."""
        lora_id = lora_request.lora_int_id
        self._users[lora_id] += 1
        adapter = self.host_cache.get(lora_id)
        if adapter is not None and not self.device_slots.holds(lora_id):
            self._place(lora_id, adapter, evictable=lambda _: False)

    def release(self, lora_int_id: int) -> None:
        """A request with this adapter finished or was aborted."""
        self._users[lora_int_id] -= 1
        if not self._users[lora_int_id]:
            del self._users[lora_int_id]

    def pin(self, lora_int_id: int) -> None:
        """A request with this adapter starts running: its slot stays until `unpin`."""
        self._running[lora_int_id] += 1
        self.device_slots.touch(lora_int_id)

    def unpin(self, lora_int_id: int) -> None:
        self._running[lora_int_id] -= 1
        if not self._running[lora_int_id]:
            del self._running[lora_int_id]
        if self.device_slots.holds(lora_int_id):
            self.device_slots.touch(lora_int_id)

    # -- loading -------------------------------------------------------------------------------------------
    def load(self, lora_request: LoRARequest) -> LoRAAdapter:
        """Read the adapter into the host cache, and into a device slot if one is free or its adapter has no
        unfinished request (least recently used first); ValueError if it cannot serve this model."""
        self._check_id(lora_request)
        adapter = self.host_cache.load(lora_request)
        self._place(lora_request.lora_int_id, adapter, evictable=lambda i: not self._users[i])
        return adapter

    def load_to_host(self, lora_request: LoRARequest) -> LoRAAdapter:
        """Read the adapter into the host cache (validating it); ValueError if it cannot serve this model."""
        self._check_id(lora_request)
        return self.host_cache.load(lora_request)

    def fetch(self, lora_request: LoRARequest) -> Future:
        """Read the adapter in the background; the future gives the adapter or raises ValueError. It joins the
        host cache at the next `collect` (each step starts with one)."""
        self._check_id(lora_request)
        return self.host_cache.fetch(lora_request)

    def prefetch(self, lora_requests: Sequence[LoRARequest]) -> None:
        """Stage the adapters of waiting requests (in the order they will be admitted) in the host cache: as
        many distinct ones not in device slots as the cache holds beside the slots' adapters."""
        self.host_cache.prefetch(lora_requests, resident=self.device_slots.ids)

    def finish_loads(self) -> None:
        """Wait for the background reads in flight, and move them into the host cache."""
        self.host_cache.finish_loads()

    def collect(self) -> None:
        """Move finished background reads into the host cache."""
        self.host_cache.collect()

    def activate(self, lora_request: LoRARequest) -> bool:
        """Put the adapter in a device slot for a request about to run, evicting the least recently used
        adapter no running request uses (those no waiting request needs first); False if no slot (or, with
        unified memory, not enough KV blocks) can be had. ValueError if the adapter cannot be read."""
        adapter = self.host_cache.load(lora_request)
        return self._place(lora_request.lora_int_id, adapter, evictable=lambda _: True)

    def unload(self, lora_int_id: int) -> bool:
        """Forget the adapter in every tier; False if it was not known. LoRAInUseError while requests use it."""
        if self._users[lora_int_id] or self._running[lora_int_id]:
            raise LoRAInUseError(f"LoRA adapter id {lora_int_id} is in use by {self._users[lora_int_id]} "
                                 "unfinished request(s)")
        return self._forget(lora_int_id)

    def reclaim(self, num_blocks: int) -> None:
        """KV allocation is `num_blocks` short (unified memory): idle adapters give their slots' pages back,
        those no waiting request needs first, least recently used first."""
        self.device_slots.reclaim(num_blocks, self._idle_residents(lambda _: True))

    def close(self) -> None:
        self.host_cache.close()

    # -- the step's batch ----------------------------------------------------------------------------------
    def batch(self, runs: Sequence[tuple[int, LoRARequest | None]]) -> LoRABatch | None:
        """The step's LoRA batch from (rows, adapter) of each segment in batch order; None without adapters."""
        return self.device_slots.batch(runs)

    # -- internals -----------------------------------------------------------------------------------------
    def _check_id(self, lora_request: LoRARequest) -> None:
        """An id that now names another directory: forget the old adapter, unless requests still use it."""
        lora_id = lora_request.lora_int_id
        old_path = self.host_cache.path(lora_id)
        if old_path is None or old_path == lora_request.lora_path:
            return
        if self._users[lora_id] or self._running[lora_id]:
            raise ValueError(f"lora_int_id {lora_id} is in use by adapter {old_path!r}; give "
                             f"{lora_request.lora_path!r} another id")
        self._forget(lora_id)

    def _idle_residents(self, evictable: Callable[[int], bool]) -> list[int]:
        """Adapters in slots that no running request uses, in eviction order."""
        idle = [i for i in self.device_slots.ids if not self._running[i] and evictable(i)]
        return sorted(idle, key=lambda i: self._users[i] > 0)  # stable: least recently used first within

    def _place(self, lora_id: int, adapter: LoRAAdapter, evictable: Callable[[int], bool]) -> bool:
        return self.device_slots.place(lora_id, adapter, self._idle_residents(evictable))

    def _slot_changed(self) -> None:
        # A slot taken or given up changes which cached adapters are pinned: the host cache trims to its size.
        self.host_cache.trim()

    def _forget(self, lora_id: int) -> bool:
        if self.device_slots.holds(lora_id):
            self.device_slots.evict(lora_id)
        return self.host_cache.forget(lora_id)
