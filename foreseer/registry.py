"""Plug-ins by name, each given as "module:attribute" and imported only when asked for.

Configs check the names they are given against these without importing what they name, so this module (and
the configs) sit below every plug-in: a scheduling policy, a draft proposer or an attention backend may import
the configs, never the other way round.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping


class Registry(Mapping[str, type]):
    """A read-only mapping from a plug-in's name to its class, imported on first lookup."""

    def __init__(self, kind: str, locations: dict[str, str]) -> None:
        self.kind = kind
        self._locations = locations

    def __getitem__(self, name: str) -> type:
        if name not in self._locations:
            raise KeyError(f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self))}")
        module, attribute = self._locations[name].split(":")
        return getattr(importlib.import_module(module), attribute)

    def __iter__(self) -> Iterator[str]:
        return iter(self._locations)

    def __len__(self) -> int:
        return len(self._locations)


SCHEDULING_POLICIES = Registry("scheduling_policy", {
    "fcfs": "foreseer.core.policies:FCFSPolicy",
    "priority": "foreseer.core.policies:PriorityPolicy",
    "sjf": "foreseer.core.policies:SJFPolicy",
    "mlfq": "foreseer.core.policies:MLFQPolicy",
    "s3": "foreseer.core.policies:S3Policy",
})

DRAFT_PROPOSERS = Registry("speculative_config.method", {
    "ngram": "foreseer.spec.ngram:NgramProposer",
    "draft": "foreseer.spec.draft_model:DraftModelProposer",
    "medusa": "foreseer.spec.medusa_proposer:MedusaProposer",
    "layer_skip": "foreseer.spec.draft_model:LayerSkipProposer",
})

ATTENTION_BACKENDS = Registry("attention_backend", {
    "torch": "foreseer.attention.torch_backend:TorchPagedAttention",
    "cpu": "foreseer.attention.cpu_backend:CpuPagedAttention",
})
