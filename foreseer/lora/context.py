"""The step's LoRA batch, visible to the model's projections for one forward pass (as attention's forward_context):
model code adds adapter deltas without knowing requests or the scheduler."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from foreseer.lora import ops

if TYPE_CHECKING:
    from foreseer.lora.backends import LoRABackend


@dataclass
class LoRABatch:
    """Which rows of the flattened batch use which resident adapter, and the adapters' weights."""

    stacks: Mapping[tuple[int, str], ops.LoRAStack]  # (layer, projection) -> weights; absent: nobody adapts it
    groups: list[ops.RowGroup]  # one per adapter in the batch
    backend: LoRABackend
    _prepared: object = field(default=None, repr=False)  # the groups as the backend reads them, at first use

    def add(self, y: torch.Tensor, x: torch.Tensor, stack: ops.LoRAStack) -> None:
        if self._prepared is None:
            self._prepared = self.backend.prepare(self.groups, y.device)
        self.backend.add(y, x, self._prepared, stack)


_current: LoRABatch | None = None


@contextmanager
def lora_context(batch: LoRABatch | None) -> Iterator[None]:
    """Make the step's adapters visible to the model's projections; None (no adapter in the batch) costs nothing."""
    global _current
    previous, _current = _current, batch
    try:
        yield
    finally:
        _current = previous


def apply_lora(y: torch.Tensor, x: torch.Tensor, layer: int, module: str) -> torch.Tensor:
    """Add the current batch's LoRA deltas for projection `module` of `layer` to its output y (in place, for its
    input x); returns y."""
    batch = _current
    if batch is not None:
        stack = batch.stacks.get((layer, module))
        if stack is not None:
            batch.add(y, x, stack)
    return y
