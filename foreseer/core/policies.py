"""Scheduling policies: the order in which requests are served, and hooks through which a policy steers admission
and preemption. The scheduler calls the hooks and never asks which policy it runs.

- fcfs: arrival order.
- priority: lower `priority` first, then arrival.
- sjf: shortest predicted remaining answer first (shortest remaining processing time, preemptive for seats like
  mlfq), from the remaining-length head's distribution, refined while the request decodes (TRAIL, Shahout et
  al., 2025). Limited preemption: a request that has generated `sjf_preemption_limit` of its predicted length is
  never paused. Aging: a request kept waiting longer than `max_wait_s` goes before every other one until it
  finishes, so no request starves behind a stream of shorter ones. The first prediction comes from the end of
  the request's own prefill (no extra forward pass); until then a request ranks by what its max_tokens leaves.
- mlfq: FastServe's skip-join multi-level feedback queue (Wu et al., 2023): levels with doubling quanta, a new
  request joins the first level whose quantum covers its prefill, is demoted when it uses up a quantum, and is
  promoted to the top when it waits longer than `max_wait_s`. Preemptive for seats: a better-ranked waiting
  request pauses the worst running one, whose KV stays in the cache while memory allows.
- s3: S³ (Jin et al., 2023): FCFS, but a request is admitted only if the KV cache holds its prompt and predicted
  answer (an upper quantile, `s3_quantile`, of its remaining-length distribution) beside what the running
  requests have reserved for theirs; the reservations follow each request's refined prediction.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from foreseer.config import SchedulerConfig
from foreseer.core.block_manager import BlockManager
from foreseer.core.request import Request, RequestStatus
from foreseer.registry import SCHEDULING_POLICIES


class SchedulingPolicy(ABC):
    name: ClassVar[str]
    # The engine predicts each request's answer length from the hidden state at the end of its prefill.
    needs_predicted_length: ClassVar[bool] = False
    # A waiting request whose key is smaller than a running one's takes its seat when max_num_seqs are running.
    preemptive: ClassVar[bool] = False

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self.config = config or SchedulerConfig()

    @abstractmethod
    def key(self, request: Request, now: float) -> tuple:
        """Smaller keys are served first; among running requests the largest is preempted first."""

    def on_add(self, request: Request) -> None:  # noqa: B027 (a hook most policies skip)
        """A new request joins the waiting queue."""

    def on_schedule(self, waiting: list[Request], now: float) -> None:  # noqa: B027 (a hook most policies skip)
        """The start of a step, before requests are ranked."""

    def on_tokens(self, request: Request, num_tokens: int) -> None:  # noqa: B027 (a hook most policies skip)
        """A running, unfinished request generated `num_tokens` tokens."""

    def can_admit(self, request: Request, running: list[Request], block_manager: BlockManager) -> bool:
        """Whether a waiting request may start (or resume) now, beside the seat and block checks."""
        return True

    def may_preempt(self, request: Request) -> bool:
        """Whether a preemptive policy may pause this running request for a better-ranked waiting one."""
        return True

    def forget(self, request: Request) -> None:  # noqa: B027 (a hook most policies skip)
        """The request finished or was aborted."""


class FCFSPolicy(SchedulingPolicy):
    name = "fcfs"

    def key(self, request: Request, now: float) -> tuple:
        return (request.metrics.arrival_time,)


class PriorityPolicy(SchedulingPolicy):
    """Lower `priority` values first (vLLM's convention), then arrival order."""

    name = "priority"

    def key(self, request: Request, now: float) -> tuple:
        return (request.priority, request.metrics.arrival_time)


def remaining_tokens(request: Request, quantile: float | None = None) -> float:
    """Tokens the request has left to generate, as predicted: the mean (or, with `quantile`, that upper quantile)
    of its remaining-length distribution, conditioned on what it generated since, at most what max_tokens leaves.

    A whole-answer prediction (the probe) counts down as the request generates; one the request outgrows is
    doubled (S3's rule for a misprediction). Without a prediction (none made yet): all max_tokens leaves.
    """
    generated = request.num_output_tokens
    cap = max(request.max_tokens - generated, 0)
    estimate = request.length_estimate
    if estimate is not None:
        return estimate.mean(generated, cap) if quantile is None else estimate.quantile(quantile, generated, cap)
    if request.predicted_length is None:
        return cap
    length = max(min(request.predicted_length, request.max_tokens), 1)
    while length <= generated and length < request.max_tokens:
        length *= 2
    return max(min(length, request.max_tokens) - generated, 0)


def _starved(request: Request, now: float, max_wait_s: float) -> bool:
    return request.status != RequestStatus.RUNNING and now - request.queued_time > max_wait_s


class SJFPolicy(SchedulingPolicy):
    """Shortest predicted remaining length first (SRPT), with TRAIL's limited preemption and aging."""

    name = "sjf"
    needs_predicted_length = True
    preemptive = True

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        super().__init__(config)
        # Starved requests keep their precedence until they finish: else each would be paused again right after
        # it resumed, and wait another max_wait_s per step.
        self.promoted: set[str] = set()
        # request id -> (tokens generated, estimate, remaining): keys are asked for many times a step, and a
        # request's remaining length changes only when it generates or is predicted again.
        self._remaining: dict[str, tuple[int, object, float]] = {}

    def remaining(self, request: Request) -> float:
        cached = self._remaining.get(request.request_id)
        state = (request.num_output_tokens, request.length_estimate or request.predicted_length)
        if cached is None or cached[:2] != state:
            cached = (*state, remaining_tokens(request))
            self._remaining[request.request_id] = cached
        return cached[2]

    def on_schedule(self, waiting: list[Request], now: float) -> None:
        self.promoted.update(r.request_id for r in waiting if _starved(r, now, self.config.max_wait_s))

    def key(self, request: Request, now: float) -> tuple:
        if request.request_id in self.promoted:
            return (0, request.metrics.arrival_time)
        # Not predicted yet (its own prefill predicts it): it ranks by what its max_tokens leaves, an upper bound.
        # Ranking it first instead paused a running request for every arrival (338 pauses in a burst of 252).
        return (1, self.remaining(request), request.metrics.arrival_time)

    def may_preempt(self, request: Request) -> bool:
        """Limited preemption (TRAIL): a request that has generated sjf_preemption_limit of its predicted length
        keeps its seat, for it is close to finishing and pausing it would hold its KV for nothing."""
        generated = request.num_output_tokens
        return generated < self.config.sjf_preemption_limit * (generated + self.remaining(request))

    def forget(self, request: Request) -> None:
        self.promoted.discard(request.request_id)
        self._remaining.pop(request.request_id, None)


@dataclass
class _Level:
    level: int
    used: int = 0  # tokens generated at this level


class MLFQPolicy(SchedulingPolicy):
    """Skip-join multi-level feedback queue; level i's quantum is mlfq_base_quantum * 2**i decode iterations."""

    name = "mlfq"
    preemptive = True

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        super().__init__(config)
        self.levels: dict[str, _Level] = {}  # request id -> its level and what it used of the quantum there

    def quantum(self, level: int) -> int:
        return self.config.mlfq_base_quantum * 2**level

    def level(self, request: Request) -> int:
        return self.levels[request.request_id].level

    def on_add(self, request: Request) -> None:
        # Skip-join: a prefill costing more iterations than a level's quantum would use it up at once.
        cost = -(-request.num_prompt_tokens // self.config.mlfq_prefill_tokens_per_iteration)
        bottom = self.config.mlfq_levels - 1
        level = next((i for i in range(bottom) if self.quantum(i) >= cost), bottom)
        self.levels[request.request_id] = _Level(level)

    def on_schedule(self, waiting: list[Request], now: float) -> None:
        for request in waiting:
            if _starved(request, now, self.config.max_wait_s):
                self.levels[request.request_id] = _Level(0)

    def on_tokens(self, request: Request, num_tokens: int) -> None:
        state = self.levels[request.request_id]
        state.used += num_tokens
        if state.used >= self.quantum(state.level) and state.level < self.config.mlfq_levels - 1:
            state.level, state.used = state.level + 1, 0

    def key(self, request: Request, now: float) -> tuple:
        return (self.level(request), request.metrics.arrival_time)

    def forget(self, request: Request) -> None:
        self.levels.pop(request.request_id, None)


class S3Policy(FCFSPolicy):
    """FCFS admission under KV reservations for each request's prompt and predicted answer."""

    name = "s3"
    needs_predicted_length = True

    def reserved_tokens(self, request: Request) -> int:
        """Answer tokens reserved: those generated and an upper quantile (s3_quantile) of those left."""
        return request.num_output_tokens + math.ceil(remaining_tokens(request, self.config.s3_quantile))

    def can_admit(self, request: Request, running: list[Request], block_manager: BlockManager) -> bool:
        def unheld(r: Request) -> int:  # reserved blocks the request does not hold yet
            reserved = block_manager.blocks_needed(r.num_prompt_tokens + self.reserved_tokens(r))
            return max(reserved - len(r.block_table), 0)

        return block_manager.num_free_blocks - sum(unheld(r) for r in running) >= unheld(request)


def get_policy(name: str, config: SchedulerConfig | None = None) -> SchedulingPolicy:
    if name not in SCHEDULING_POLICIES:
        raise ValueError(f"unknown scheduling_policy {name!r}; available: {', '.join(sorted(SCHEDULING_POLICIES))}")
    return SCHEDULING_POLICIES[name](config)
