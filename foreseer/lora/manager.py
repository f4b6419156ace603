"""A model's LoRA adapters in three tiers: device slots, a host-memory cache, and disk.

- Device: `max_loras` slots whose adapters' weights are packed on the compute device for the batched kernels;
  a batch holds adapters of these slots only. A slot is kept while a running request uses its adapter
  (pinned); otherwise the least recently used adapter gives up its slot when another needs one (those that no
  unfinished request waits for first). With `lora_memory="unified"`, a slot's adapter also holds KV-block-sized
  pages of the KV cache's pool (BlockManager.reserve) while loaded, and idle adapters give them back when KV
  allocation falls short (S-LoRA's unified paging).
- Host: up to `max_cpu_loras` adapters read from disk and converted (CPU tensors), least recently used evicted
  first; adapters in device slots always stay (their packed weights are rebuilt from these), so the cache may
  hold more than its size while every cached adapter is in a slot and another one is staged.
- Disk: the adapter directories. Adapters of waiting requests are read into the host cache ahead of their
  admission by one background thread (`prefetch`), so that a step waits at most for a load already running.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from foreseer.config import LoRAConfig
from foreseer.lora import ops
from foreseer.lora.adapter import LoRAAdapter, base_targets, load_adapter, module_out_sizes
from foreseer.lora.backends import get_lora_backend
from foreseer.lora.context import LoRABatch
from foreseer.lora.request import LoRARequest

if TYPE_CHECKING:
    from foreseer.core.block_manager import BlockManager

logger = logging.getLogger(__name__)


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


@dataclass
class _Resident:
    slot: int
    adapter: LoRAAdapter
    weights: dict[tuple[int, str], ops.SlotLoRA]  # (layer, projection) -> its weights on the compute device
    pages: list[int] = field(default_factory=list)  # KV blocks reserved for it (unified memory)


class LoRAManager:
    def __init__(self, config: LoRAConfig, model: nn.Module, device: torch.device, dtype: torch.dtype,
                 page_bytes: int = 0) -> None:
        self.config = config
        self.device, self.dtype = device, dtype
        self.targets = base_targets(model)
        self.num_layers = len(model.model.layers)
        self.out_sizes = module_out_sizes(self.targets)  # projection -> its shards' output sizes
        self.backend = get_lora_backend(device, dtype)
        self.unified = config.lora_memory == "unified"
        self.page_bytes = page_bytes  # a KV block's bytes: the page size of unified memory
        self.block_manager: BlockManager | None = None
        self._host: OrderedDict[int, tuple[LoRARequest, LoRAAdapter]] = OrderedDict()  # least recent first
        self._device: OrderedDict[int, _Resident] = OrderedDict()  # least recent first
        self._slots: list[int | None] = [None] * config.max_loras
        self._running: Counter[int] = Counter()  # running requests per adapter: pins its device slot
        self._users: Counter[int] = Counter()  # unfinished requests per adapter
        self._known: dict[int, tuple[str, int]] = {}  # id -> (path, bytes) of adapters read without error
        self._loading: dict[int, tuple[LoRARequest, Future]] = {}  # background reads in flight
        self._failed: set[int] = set()  # background reads that failed: read again only when needed
        self._executor: ThreadPoolExecutor | None = None
        self._stacks: dict[tuple[int, str], ops.LoRAStack] | None = None  # None: the slots changed
        self._sync_loads = self._prefetch_loads = self._device_evictions = self._host_evictions = 0

    def bind_block_manager(self, block_manager: BlockManager) -> None:
        """The KV pool; with unified memory, slots take their pages from it and give idle ones back on demand."""
        self.block_manager = block_manager
        if self.unified:
            block_manager.reclaimer = self.reclaim

    # -- what is where -------------------------------------------------------------------------------------
    @property
    def loaded_ids(self) -> list[int]:
        """Adapters in device slots, least recently used first."""
        return list(self._device)

    @property
    def host_ids(self) -> list[int]:
        """Adapters in the host cache, least recently used first."""
        return list(self._host)

    @property
    def slots(self) -> list[int | None]:
        return list(self._slots)

    def is_resident(self, lora_int_id: int) -> bool:
        return lora_int_id in self._device

    def num_running(self, lora_int_id: int) -> int:
        return self._running[lora_int_id]

    def num_obtainable_slots(self) -> int:
        """Slots free, or held by an adapter no running request uses."""
        return self._slots.count(None) + sum(1 for i in self._device if not self._running[i])

    def pages(self, lora_int_id: int) -> int:
        """KV blocks the adapter takes in a device slot (0 unless unified memory); it must have been read."""
        if not self.unified or lora_int_id not in self._known:
            return 0
        return -(-self._known[lora_int_id][1] // self.page_bytes)

    def stats(self) -> LoRAStats:
        return LoRAStats(
            max_loras=self.config.max_loras, max_cpu_loras=self.config.max_cpu_loras,
            device_adapters=len(self._device), host_adapters=len(self._host),
            device_bytes=sum(self._known[i][1] for i in self._device),
            host_bytes=sum(self._known[i][1] for i in self._host),
            device_pages=sum(len(r.pages) for r in self._device.values()),
            sync_loads=self._sync_loads, prefetch_loads=self._prefetch_loads,
            device_evictions=self._device_evictions, host_evictions=self._host_evictions,
        )

    # -- requests ------------------------------------------------------------------------------------------
    def validate(self, lora_request: LoRARequest) -> int:
        """Check that the adapter can serve this model, reading it if it was never read (or its id now names
        another directory); returns the KV blocks it takes in a device slot. ValueError names the problem."""
        self._check_id(lora_request)
        if self._known.get(lora_request.lora_int_id, ("",))[0] != lora_request.lora_path:
            self._host_adapter(lora_request)
        return self.pages(lora_request.lora_int_id)

    def add_user(self, lora_request: LoRARequest) -> None:
        """A request with this (validated) adapter was queued: it keeps the adapter from being unloaded, and
        the adapter takes a free device slot at once if it is in the host cache."""
        lora_id = lora_request.lora_int_id
        self._users[lora_id] += 1
        entry = self._host.get(lora_id)
        if entry is not None and lora_id not in self._device:
            self._place(lora_request, entry[1], evictable=lambda _: False)

    def release(self, lora_int_id: int) -> None:
        """A request with this adapter finished or was aborted."""
        self._users[lora_int_id] -= 1
        if not self._users[lora_int_id]:
            del self._users[lora_int_id]

    def pin(self, lora_int_id: int) -> None:
        """A request with this adapter starts running: its slot stays until `unpin`."""
        self._running[lora_int_id] += 1
        self._device.move_to_end(lora_int_id)

    def unpin(self, lora_int_id: int) -> None:
        self._running[lora_int_id] -= 1
        if not self._running[lora_int_id]:
            del self._running[lora_int_id]
        if lora_int_id in self._device:
            self._device.move_to_end(lora_int_id)

    # -- loading -------------------------------------------------------------------------------------------
    def load(self, lora_request: LoRARequest) -> LoRAAdapter:
        """Read the adapter into the host cache, and into a device slot if one is free or its adapter has no
        unfinished request (least recently used first); ValueError if it cannot serve this model."""
        self._check_id(lora_request)
        adapter = self._host_adapter(lora_request)
        self._place(lora_request, adapter, evictable=lambda i: not self._users[i])
        return adapter

    def load_to_host(self, lora_request: LoRARequest) -> LoRAAdapter:
        """Read the adapter into the host cache (validating it); ValueError if it cannot serve this model."""
        self._check_id(lora_request)
        return self._host_adapter(lora_request)

    def fetch(self, lora_request: LoRARequest) -> Future:
        """Read the adapter in the background; the future gives the adapter or raises ValueError. It joins the
        host cache at the next `collect` (each step starts with one)."""
        self._check_id(lora_request)
        lora_id = lora_request.lora_int_id
        pending = self._loading.get(lora_id)
        if pending is not None and pending[0].lora_path == lora_request.lora_path:
            return pending[1]
        entry = self._host.get(lora_id)
        if entry is not None and entry[0].lora_path == lora_request.lora_path:
            done: Future = Future()
            done.set_result(entry[1])
            return done
        future = self._pool().submit(self._read, lora_request)
        self._loading[lora_id] = (lora_request, future)
        self._failed.discard(lora_id)
        return future

    def prefetch(self, lora_requests: Sequence[LoRARequest]) -> None:
        """Stage the adapters of waiting requests (in the order they will be admitted) in the host cache: as
        many distinct ones not in device slots as the cache holds beside the slots' adapters."""
        self.collect()
        wanted: dict[int, LoRARequest] = {}
        room = self.config.max_cpu_loras - len(self._device)
        for lora_request in lora_requests:
            lora_id = lora_request.lora_int_id
            if len(wanted) >= room:
                break
            if lora_id not in self._device and lora_id not in wanted:
                wanted[lora_id] = lora_request
        for lora_id, lora_request in wanted.items():
            known = self._known.get(lora_id)
            if known is not None and known[0] != lora_request.lora_path:
                continue  # a new directory under an old id is read when validated, not here
            if lora_id not in self._host and lora_id not in self._loading and lora_id not in self._failed:
                self.fetch(lora_request)
        for lora_id in reversed(wanted):  # the first to be admitted ends most recently used
            if lora_id in self._host:
                self._host.move_to_end(lora_id)

    def finish_loads(self) -> None:
        """Wait for the background reads in flight, and move them into the host cache."""
        for _, future in list(self._loading.values()):
            future.exception()  # waits; a failure is collect's to record
        self.collect()

    def collect(self) -> None:
        """Move finished background reads into the host cache."""
        for lora_id, (lora_request, future) in list(self._loading.items()):
            if not future.done():
                continue
            del self._loading[lora_id]
            try:
                adapter = future.result()
            except Exception:  # read again, in the foreground, when a request needs it (and fail it there)
                self._failed.add(lora_id)
                continue
            self._prefetch_loads += 1
            self._host_insert(lora_request, adapter)

    def activate(self, lora_request: LoRARequest) -> bool:
        """Put the adapter in a device slot for a request about to run, evicting the least recently used
        adapter no running request uses (those no waiting request needs first); False if no slot (or, with
        unified memory, not enough KV blocks) can be had. ValueError if the adapter cannot be read."""
        adapter = self._host_adapter(lora_request)
        return self._place(lora_request, adapter, evictable=lambda _: True)

    def unload(self, lora_int_id: int) -> bool:
        """Forget the adapter in every tier; False if it was not known. LoRAInUseError while requests use it."""
        if self._users[lora_int_id] or self._running[lora_int_id]:
            raise LoRAInUseError(f"LoRA adapter id {lora_int_id} is in use by {self._users[lora_int_id]} "
                                 "unfinished request(s)")
        return self._forget(lora_int_id)

    def reclaim(self, num_blocks: int) -> None:
        """KV allocation is `num_blocks` short (unified memory): idle adapters give their slots' pages back,
        those no waiting request needs first, least recently used first."""
        freed = 0
        for lora_id in self._idle_residents(lambda _: True):
            if freed >= num_blocks:
                break
            freed += len(self._device[lora_id].pages)
            self._evict_device(lora_id)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # -- the step's batch ----------------------------------------------------------------------------------
    def batch(self, runs: Sequence[tuple[int, LoRARequest | None]]) -> LoRABatch | None:
        """The step's LoRA batch from (rows, adapter) of each segment in batch order; None without adapters."""
        if all(lora_request is None for _, lora_request in runs):
            return None
        stacks = self._packed()
        slots = []
        for _, lora_request in runs:
            if lora_request is None:
                slots.append(-1)
                continue
            resident = self._device.get(lora_request.lora_int_id)
            if resident is None:
                raise RuntimeError(f"LoRA adapter {lora_request.lora_name!r} was scheduled without a device slot")
            slots.append(resident.slot)
        token_slots = torch.tensor(slots).repeat_interleave(torch.tensor([n for n, _ in runs]))
        groups = [ops.RowGroup(g.slot, g.rows if isinstance(g.rows, slice) else g.rows.to(self.device))
                  for g in ops.token_groups(token_slots)]
        return LoRABatch(stacks, groups, self.backend)

    def _packed(self) -> dict[tuple[int, str], ops.LoRAStack]:
        # Assembled from the residents' device weights, made when each took its slot: a slot's change costs no
        # copy of the other adapters.
        if self._stacks is None:
            residents = [None if i is None else self._device[i] for i in self._slots]
            self._stacks = {}
            for layer in range(self.num_layers):
                for module, out_sizes in self.out_sizes.items():
                    slots = [None if r is None else r.weights.get((layer, module)) for r in residents]
                    if any(slots):
                        self._stacks[layer, module] = ops.LoRAStack(slots, out_sizes)
        return self._stacks

    # -- internals -----------------------------------------------------------------------------------------
    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="foreseer-lora-load")
        return self._executor

    def _read(self, lora_request: LoRARequest) -> LoRAAdapter:
        """Disk to host memory (runs on the loading thread too: touches no shared state)."""
        return load_adapter(lora_request.lora_path, self.targets, self.num_layers, self.config.max_lora_rank,
                            self.dtype)

    def _check_id(self, lora_request: LoRARequest) -> None:
        """An id that now names another directory: forget the old adapter, unless requests still use it."""
        lora_id = lora_request.lora_int_id
        known = self._known.get(lora_id)
        pending = self._loading.get(lora_id)
        old_path = known[0] if known is not None else pending[0].lora_path if pending is not None else None
        if old_path is None or old_path == lora_request.lora_path:
            return
        if self._users[lora_id] or self._running[lora_id]:
            raise ValueError(f"lora_int_id {lora_id} is in use by adapter {old_path!r}; give "
                             f"{lora_request.lora_path!r} another id")
        self._forget(lora_id)

    def _host_adapter(self, lora_request: LoRARequest) -> LoRAAdapter:
        """The adapter from the host cache, else from a read in flight (waiting for it), else read now."""
        self.collect()
        lora_id = lora_request.lora_int_id
        entry = self._host.get(lora_id)
        if entry is not None:
            self._host.move_to_end(lora_id)
            return entry[1]
        pending = self._loading.pop(lora_id, None)
        try:
            adapter = pending[1].result() if pending is not None else self._read(lora_request)
        except ValueError:
            self._known.pop(lora_id, None)
            raise
        self._failed.discard(lora_id)
        self._sync_loads += 1
        self._host_insert(lora_request, adapter)
        return adapter

    def _host_insert(self, lora_request: LoRARequest, adapter: LoRAAdapter) -> None:
        lora_id = lora_request.lora_int_id
        self._host[lora_id] = (lora_request, adapter)
        self._host.move_to_end(lora_id)
        if self._known.get(lora_id, ("",))[0] != lora_request.lora_path:
            logger.info("read LoRA adapter %r (id %d, rank %d, %s; %.1f MiB)", lora_request.lora_name, lora_id,
                        adapter.rank, ",".join(adapter.target_modules), adapter.num_bytes / 2**20)
        self._known[lora_id] = (lora_request.lora_path, adapter.num_bytes)
        self._trim_host()

    def _trim_host(self) -> None:
        while len(self._host) > self.config.max_cpu_loras:
            victim = next((i for i in self._host if i not in self._device), None)
            if victim is None:
                return
            del self._host[victim]
            self._host_evictions += 1

    def _idle_residents(self, evictable: Callable[[int], bool]) -> list[int]:
        """Adapters in slots that no running request uses, in eviction order."""
        idle = [i for i in self._device if not self._running[i] and evictable(i)]
        return sorted(idle, key=lambda i: self._users[i] > 0)  # stable: least recently used first within

    def _place(self, lora_request: LoRARequest, adapter: LoRAAdapter, evictable: Callable[[int], bool]) -> bool:
        lora_id = lora_request.lora_int_id
        if lora_id in self._device:
            self._device.move_to_end(lora_id)
            return True
        pages = self.pages(lora_id)
        free_slots = self._slots.count(None)
        free_blocks = self.block_manager.num_free_blocks if pages else 0
        victims = []
        candidates = iter(self._idle_residents(evictable))
        while free_slots == 0 or free_blocks < pages:
            victim = next(candidates, None)
            if victim is None:
                return False
            victims.append(victim)
            free_slots += 1
            free_blocks += len(self._device[victim].pages)
        for victim in victims:
            self._evict_device(victim)
        reserved = self.block_manager.reserve(pages) if pages else []
        slot = self._slots.index(None)
        self._slots[slot] = lora_id
        weights = {key: slot_weights.to(self.device) for key, slot_weights in adapter.layout.items()}
        self._device[lora_id] = _Resident(slot, adapter, weights, reserved)
        self._stacks = None
        self._trim_host()
        return True

    def _evict_device(self, lora_id: int) -> None:
        resident = self._device.pop(lora_id)
        self._slots[resident.slot] = None
        if resident.pages:
            self.block_manager.unreserve(resident.pages)
        self._stacks = None
        self._device_evictions += 1
        self._trim_host()

    def _forget(self, lora_id: int) -> bool:
        known = lora_id in self._known or lora_id in self._loading
        if lora_id in self._device:
            self._evict_device(lora_id)
        self._host.pop(lora_id, None)
        self._known.pop(lora_id, None)
        self._failed.discard(lora_id)
        pending = self._loading.pop(lora_id, None)
        if pending is not None:
            pending[1].cancel()
        return known
