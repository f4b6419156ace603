"""The device tier of a model's LoRA adapters: the slots whose adapters a step's batch may use.

- Device: `max_loras` slots whose adapters' weights are packed on the compute device for the batched kernels;
  a batch holds adapters of these slots only. With `lora_memory="unified"`, a slot's adapter also holds
  KV-block-sized pages of the KV cache's pool (BlockManager.reserve) while loaded, and gives them back with its
  slot (S-LoRA's unified paging). Which adapters may give up their slots, and in which order, is the owner's
  choice (the manager's): the slots only take the candidates it lists.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from foreseer.lora import ops
from foreseer.lora.adapter import LoRAAdapter
from foreseer.lora.backends import LoRABackend, get_lora_backend
from foreseer.lora.context import LoRABatch
from foreseer.lora.request import LoRARequest

if TYPE_CHECKING:
    from foreseer.core.block_manager import BlockManager


@dataclass
class _Resident:
    slot: int
    adapter: LoRAAdapter
    weights: dict[tuple[int, str], ops.SlotLoRA]  # (layer, projection) -> its weights on the compute device
    pages: list[int] = field(default_factory=list)  # KV blocks reserved for it (unified memory)


class DeviceSlots:
    """Adapters in device slots, least recently used first, their packed weights, and the step's batch of them."""

    def __init__(self, num_slots: int, num_layers: int, out_sizes: dict[str, list[int]], device: torch.device,
                 dtype: torch.dtype, page_bytes: int | None, on_change: Callable[[], None]) -> None:
        self.num_layers = num_layers
        self.out_sizes = out_sizes  # projection -> its shards' output sizes
        self.device = device
        self.backend: LoRABackend = get_lora_backend(device, dtype)
        self.page_bytes = page_bytes  # a KV block's bytes: the page size of unified memory; None: no pages
        self.block_manager: BlockManager | None = None
        self.on_change = on_change  # after a slot is taken or given up
        self._residents: OrderedDict[int, _Resident] = OrderedDict()  # least recent first
        self._slots: list[int | None] = [None] * num_slots
        self._stacks: dict[tuple[int, str], ops.LoRAStack] | None = None  # None: the slots changed
        self.evictions = 0

    @property
    def unified(self) -> bool:
        return self.page_bytes is not None

    @property
    def ids(self) -> list[int]:
        """Adapters in slots, least recently used first."""
        return list(self._residents)

    @property
    def slots(self) -> list[int | None]:
        return list(self._slots)

    @property
    def num_free(self) -> int:
        return self._slots.count(None)

    @property
    def num_pages(self) -> int:
        """KV blocks the slots hold (unified memory; else 0)."""
        return sum(len(r.pages) for r in self._residents.values())

    def holds(self, lora_int_id: int) -> bool:
        return lora_int_id in self._residents

    def touch(self, lora_int_id: int) -> None:
        """The adapter was used: it becomes the most recently used (KeyError if it has no slot)."""
        self._residents.move_to_end(lora_int_id)

    def pages_for(self, num_bytes: int) -> int:
        """KV blocks an adapter of `num_bytes` takes in a slot (0 unless unified memory)."""
        return 0 if self.page_bytes is None else -(-num_bytes // self.page_bytes)

    def place(self, lora_int_id: int, adapter: LoRAAdapter, candidates: Iterable[int]) -> bool:
        """Give the adapter a slot, evicting from `candidates` (in their order) as many as a free slot and its
        pages need; False, evicting none, if they do not suffice."""
        if lora_int_id in self._residents:
            self._residents.move_to_end(lora_int_id)
            return True
        pages = self.pages_for(adapter.num_bytes)
        free_slots = self.num_free
        free_blocks = self.block_manager.num_free_blocks if pages else 0
        victims = []
        remaining = iter(candidates)
        while free_slots == 0 or free_blocks < pages:
            victim = next(remaining, None)
            if victim is None:
                return False
            victims.append(victim)
            free_slots += 1
            free_blocks += len(self._residents[victim].pages)
        for victim in victims:
            self.evict(victim)
        reserved = self.block_manager.reserve(pages) if pages else []
        slot = self._slots.index(None)
        self._slots[slot] = lora_int_id
        weights = {key: slot_weights.to(self.device) for key, slot_weights in adapter.layout.items()}
        self._residents[lora_int_id] = _Resident(slot, adapter, weights, reserved)
        self._stacks = None
        self.on_change()
        return True

    def reclaim(self, num_blocks: int, candidates: Iterable[int]) -> None:
        """Evict from `candidates` (in their order) until their slots have given back `num_blocks` KV blocks."""
        freed = 0
        for lora_int_id in candidates:
            if freed >= num_blocks:
                break
            freed += len(self._residents[lora_int_id].pages)
            self.evict(lora_int_id)

    def evict(self, lora_int_id: int) -> None:
        resident = self._residents.pop(lora_int_id)
        self._slots[resident.slot] = None
        if resident.pages:
            self.block_manager.unreserve(resident.pages)
        self._stacks = None
        self.evictions += 1
        self.on_change()

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
            resident = self._residents.get(lora_request.lora_int_id)
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
            residents = [None if i is None else self._residents[i] for i in self._slots]
            self._stacks = {}
            for layer in range(self.num_layers):
                for module, out_sizes in self.out_sizes.items():
                    slots = [None if r is None else r.weights.get((layer, module)) for r in residents]
                    if any(slots):
                        self._stacks[layer, module] = ops.LoRAStack(slots, out_sizes)
        return self._stacks
