"""The messages between the scheduler and the model runner."""

from __future__ import annotations

from dataclasses import dataclass, field

from foreseer.engine.request import Request
from foreseer.outputs import Logprob


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens to compute this step: a prefill chunk, or 1 for a decode


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class ModelRunnerOutput:
    """Tokens sampled this step, for the requests whose scheduled tokens reached their end."""

    sampled: dict[str, int]
    logprobs: dict[str, tuple[float, dict[int, Logprob] | None]] = field(default_factory=dict)
