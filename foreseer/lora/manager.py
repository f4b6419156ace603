"""The adapters resident for a model: loaded on first use, packed per projection, evicted when idle."""

from __future__ import annotations

import importlib.util
import logging
from collections import Counter, OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from foreseer.config import LoRAConfig
from foreseer.lora import ops
from foreseer.lora.adapter import LoRAAdapter, base_targets, load_adapter
from foreseer.lora.context import LoRABatch
from foreseer.lora.request import LoRARequest

logger = logging.getLogger(__name__)


class LoRAManager:
    """A registry of loaded adapters by lora_int_id. An adapter stays while unfinished requests use it; beyond
    max_loras, loading another evicts the least recently used idle ones (while every adapter is in use, more than
    max_loras stay loaded: admission by free adapter slots needs the scheduler, later)."""

    def __init__(self, config: LoRAConfig, model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        self.config = config
        self.device, self.dtype = device, dtype
        self.targets = base_targets(model)
        self.num_layers = len(model.model.layers)
        self.out_sizes: dict[str, list[int]] = {}  # projection -> its shards' output sizes
        for target in sorted(self.targets.values(), key=lambda t: t.shard):
            self.out_sizes.setdefault(target.module, []).append(target.out_features)
        self.use_triton = device.type == "cuda" and importlib.util.find_spec("triton") is not None
        self._adapters: OrderedDict[int, tuple[LoRARequest, LoRAAdapter]] = OrderedDict()  # least recent first
        self._users: Counter[int] = Counter()  # unfinished requests per adapter id
        self._stacks: dict[tuple[int, str], ops.LoRAStack] | None = None  # None: the resident set changed
        self._slots: dict[int, int] = {}  # adapter id -> its slot in the stacks

    @property
    def loaded_ids(self) -> list[int]:
        return list(self._adapters)

    def load(self, lora_request: LoRARequest) -> LoRAAdapter:
        """Make the adapter resident (reading it on first use); ValueError if it cannot serve this model."""
        lora_id = lora_request.lora_int_id
        entry = self._adapters.get(lora_id)
        if entry is not None and entry[0].lora_path != lora_request.lora_path:
            if self._users[lora_id]:
                raise ValueError(f"lora_int_id {lora_id} is in use by adapter {entry[0].lora_path!r}; give "
                                 f"{lora_request.lora_path!r} another id")
            self._drop(lora_id)
            entry = None
        if entry is None:
            adapter = load_adapter(lora_request.lora_path, self.targets, self.num_layers, self.config.max_lora_rank,
                                   self.dtype)
            self._evict(self.config.max_loras - 1)
            entry = self._adapters[lora_id] = (lora_request, adapter)
            self._stacks = None
            logger.info("loaded LoRA adapter %r (id %d, rank %d, %s; %.1f MiB)", lora_request.lora_name, lora_id,
                        adapter.rank, ",".join(adapter.target_modules), adapter.num_bytes / 2**20)
        self._adapters.move_to_end(lora_id)
        return entry[1]

    def acquire(self, lora_request: LoRARequest) -> LoRAAdapter:
        """Load the adapter if needed and hold it for one more request until `release`."""
        adapter = self.load(lora_request)
        self._users[lora_request.lora_int_id] += 1
        return adapter

    def release(self, lora_int_id: int) -> None:
        self._users[lora_int_id] -= 1
        if not self._users[lora_int_id]:
            del self._users[lora_int_id]
            self._evict(self.config.max_loras)

    def batch(self, runs: Sequence[tuple[int, LoRARequest | None]]) -> LoRABatch | None:
        """The step's LoRA batch from (rows, adapter) of each segment in batch order; None without adapters."""
        if all(lora_request is None for _, lora_request in runs):
            return None
        stacks = self._packed()
        slots = torch.tensor([-1 if r is None else self._slots[r.lora_int_id] for _, r in runs])
        token_slots = slots.repeat_interleave(torch.tensor([n for n, _ in runs]))
        groups = [ops.RowGroup(g.slot, g.rows if isinstance(g.rows, slice) else g.rows.to(self.device))
                  for g in ops.token_groups(token_slots)]
        return LoRABatch(stacks, groups, self.use_triton)

    def _packed(self) -> dict[tuple[int, str], ops.LoRAStack]:
        if self._stacks is None:
            adapters = [adapter for _, adapter in self._adapters.values()]
            self._slots = {lora_id: slot for slot, lora_id in enumerate(self._adapters)}
            self._stacks = {}
            for layer in range(self.num_layers):
                for module, out_sizes in self.out_sizes.items():
                    stack = ops.build_stack([a.weights.get((layer, module)) for a in adapters], out_sizes,
                                            self.device)
                    if stack is not None:
                        self._stacks[layer, module] = stack
        return self._stacks

    def _evict(self, keep: int) -> None:
        """Drop idle adapters, least recently used first, until at most `keep` stay loaded."""
        idle = [lora_id for lora_id in self._adapters if not self._users[lora_id]]
        for lora_id in idle[:max(len(self._adapters) - keep, 0)]:
            self._drop(lora_id)

    def _drop(self, lora_id: int) -> None:
        del self._adapters[lora_id]
        self._stacks = None
        logger.info("evicted LoRA adapter id %d", lora_id)
