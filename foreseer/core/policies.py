"""Scheduling policies: the order in which requests are admitted, and which are preempted first (the last)."""

from __future__ import annotations

from abc import ABC, abstractmethod

from foreseer.engine.request import Request


class SchedulingPolicy(ABC):
    name: str

    @abstractmethod
    def key(self, request: Request) -> tuple:
        """Smaller keys are served first and preempted last."""


class FCFSPolicy(SchedulingPolicy):
    name = "fcfs"

    def key(self, request: Request) -> tuple:
        return (request.metrics.arrival_time,)


class PriorityPolicy(SchedulingPolicy):
    """Lower `priority` values first (vLLM's convention), then arrival order."""

    name = "priority"

    def key(self, request: Request) -> tuple:
        return (request.priority, request.metrics.arrival_time)


POLICIES: dict[str, type[SchedulingPolicy]] = {p.name: p for p in (FCFSPolicy, PriorityPolicy)}


def get_policy(name: str) -> SchedulingPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown scheduling_policy {name!r}; available: {sorted(POLICIES)}")
    return POLICIES[name]()
