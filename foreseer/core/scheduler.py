"""Iteration-level scheduler with no phases: each step gives requests "tokens to compute" under a budget.

Running requests come first (decodes, then unfinished prefill chunks), then waiting ones, in the policy's order
(foreseer/core/policies.py), which also may veto an admission. A preemptive policy's better-ranked waiting
request takes the seat of the worst running one the policy lets go (`may_preempt`), which is paused: PREEMPTED
but holding its KV blocks, so it resumes without recompute. When blocks run out, paused requests give theirs up
first (the worst ranked first; they recompute later), then the policy's last running request is preempted: its
blocks are freed and it is recomputed later (its cached prefix blocks usually survive and are reused).

Resources beside seats, tokens and blocks (LoRA adapter slots) are an AdmissionGate's: it claims what a waiting
request needs before the request starts, may pass it over for this step (later requests may still start), and
is told when a request stops running.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from foreseer.config import SchedulerConfig
from foreseer.core.block_manager import BlockManager
from foreseer.core.draft_tree import DraftTree
from foreseer.core.output import ModelRunnerOutput, RequestUpdate, ScheduledRequest, SchedulerOutput
from foreseer.core.policies import SchedulingPolicy
from foreseer.core.request import Request, RequestStatus


class AdmissionError(Exception):
    """A waiting request can never start (e.g. its LoRA adapter can no longer be read): it fails."""


class AdmissionGate:
    """Admission by a resource the policy does not rank by; this one admits every request."""

    def on_schedule(self, waiting: list[Request], running: list[Request], now: float) -> None:
        """The start of a step; `waiting` is in the policy's order."""

    def admit(self, request: Request) -> bool:
        """Claim what the request needs to run, just before it starts or resumes; False passes it over for this
        step. Raises AdmissionError if it can never run."""
        return True

    def release(self, request: Request) -> None:
        """The request stopped running (preempted, paused, finished or aborted): its claim ends."""

    def may_admit(self, request: Request) -> bool:
        """A guess, changing nothing, at whether `admit` would let the waiting request start next step."""
        return True


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, policy: SchedulingPolicy,
                 clock: Callable[[], float] = time.time, gate: AdmissionGate | None = None) -> None:
        self.config = config
        self.block_manager = block_manager
        self.policy = policy
        self.gate = gate or AdmissionGate()
        self.failed: list[tuple[Request, str]] = []  # finished with an AdmissionError, until take_failed
        self.clock = clock  # what the policies' waits and the request metrics are measured with
        self.now = clock()  # the time of the step being scheduled
        self.waiting: list[Request] = []  # new, preempted and paused requests
        self.running: list[Request] = []
        # Requests in a step that failed for a reason no one request could be blamed for; each, in turn, runs
        # alone (in waiting or running meanwhile) until a step of it alone sampled a token.
        self.suspects: list[Request] = []

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def speculation_candidates(self) -> tuple[list[Request], int]:
        """Running requests that decode next step, and about how many prefill tokens it computes beside them."""
        decoding = [r for r in self.running if r.num_computed_tokens >= r.num_tokens - 1]
        # Waiting requests start only into free seats, and not those the gate will pass over (e.g. their adapter
        # has no slot): the others add no tokens to the step.
        seats = max(self.config.max_num_seqs - len(self.running), 0)
        startable = [r for r in self.waiting if self.gate.may_admit(r)][:seats]
        pending = sum(r.num_tokens - r.num_computed_tokens for r in self.running + startable) - len(decoding)
        return decoding, min(pending, max(self.config.max_num_batched_tokens - len(decoding), 0))

    def add_request(self, request: Request) -> None:
        self.policy.on_add(request)
        self.waiting.append(request)

    def _key(self, request: Request) -> tuple:
        return self.policy.key(request, self.now)

    def schedule(self) -> SchedulerOutput:
        self.now = self.clock()
        self.policy.on_schedule(self.waiting, self.now)
        self.waiting.sort(key=self._key)
        self.gate.on_schedule(self.waiting, self.running, self.now)
        self.running.sort(key=self._key)
        if self.suspects:
            alone = self._schedule_alone(self.suspects[0])
            if alone is not None:
                return alone
        if self.policy.preemptive:
            self._pause_for_waiting()
        budget = self.config.max_num_batched_tokens
        out = SchedulerOutput(scheduled=[])
        scheduled_ids: set[str] = set()
        decoding = [r for r in self.running if r.num_computed_tokens >= r.num_tokens - 1]
        prefilling = [r for r in self.running if r.num_computed_tokens < r.num_tokens - 1]
        for request in decoding + prefilling:
            if budget == 0:
                break
            if request.status != RequestStatus.RUNNING:  # preempted earlier in this step
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens + len(request.draft), budget)
            # Drafts (only ever on decoding requests) come last, so a short budget trims them first.
            draft = request.draft.prefix(max(num_new - 1, 0))
            while not self._allocate(request, num_new):
                victim = self._pick_victim(scheduled_ids) or request
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                out.scheduled.append(ScheduledRequest(request, num_new, draft))
                scheduled_ids.add(request.request_id)
                budget -= num_new

        if not out.preempted:
            self._admit_waiting(out, budget)
        return out

    def isolate(self, requests: list[Request]) -> None:
        """A step with these requests in it failed, and nothing says whose fault it was. Each is recomputed (the
        failed step may have left its KV wrong) and then runs alone, one at a time, until a step of it alone
        samples a token: a fault that comes back then is that request's own, and the others are cleared."""
        for request in requests:
            if request.status == RequestStatus.RUNNING:
                self._preempt(request)
            if request not in self.suspects:
                self.suspects.append(request)

    def _schedule_alone(self, request: Request) -> SchedulerOutput | None:
        """A step of one suspect and nothing else (running requests are preempted while it lacks blocks); None if
        the gate passes it over this step (e.g. its adapter has no slot yet): the others then run without it."""
        out = SchedulerOutput(scheduled=[])
        cached: list[int] = []
        if request.status != RequestStatus.RUNNING:
            try:
                if not self.gate.admit(request):
                    return None
            except AdmissionError as error:
                self.finish_request(request, "error")
                self.failed.append((request, str(error)))
                return out
            cached = [] if request.block_table else self.block_manager.find_cached_prefix(request)
        start = request.num_computed_tokens + len(cached) * self.block_manager.block_size
        num_new = min(request.num_tokens - start, self.config.max_num_batched_tokens)
        while not self._allocate(request, num_new, cached):
            if not self._preempt_last(out, request):
                raise RuntimeError(f"request {request.request_id} does not fit in the KV cache alone")
        if request.status != RequestStatus.RUNNING:
            self.waiting.remove(request)
            self._start(request, start)
        out.scheduled.append(ScheduledRequest(request, num_new))
        return out

    def _preempt_last(self, out: SchedulerOutput, keep: Request) -> bool:
        """Preempt the policy's last running request other than `keep`; False if there is none."""
        victim = next((r for r in reversed(self.running) if r is not keep), None)
        if victim is None:
            return False
        self._preempt(victim)
        out.preempted.append(victim)
        return True

    def _start(self, request: Request, num_computed_tokens: int) -> None:
        """A waiting request starts (or resumes) running, its first `num_computed_tokens` already in the cache."""
        request.num_computed_tokens = num_computed_tokens
        if request.metrics.first_scheduled_time is None:
            request.metrics.first_scheduled_time = self.now
            request.metrics.num_cached_tokens = num_computed_tokens
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def _pause_for_waiting(self) -> None:
        """Each waiting request ranked before the worst running one takes its seat, once all seats are taken."""
        seats = self.config.max_num_seqs - len(self.running)
        for request in sorted(self.waiting, key=self._key):
            if not self.gate.may_admit(request):  # it would not start: pausing a request for it gains nothing
                continue
            if seats > 0:
                seats -= 1
                continue
            victim = next((r for r in reversed(self.running) if self.policy.may_preempt(r)), None)
            if victim is not None and self._key(request) < self._key(victim):
                self._preempt(victim, keep_blocks=True)
            else:
                break

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        self.waiting.sort(key=self._key)
        admitted: list[Request] = []
        failed: list[tuple[Request, str]] = []
        for request in self.waiting:
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if request in self.suspects:  # it runs alone
                continue
            if not self.policy.can_admit(request, self.running, self.block_manager):
                break
            try:
                if not self.gate.admit(request):  # e.g. its adapter gets no slot this step: later ones may start
                    continue
            except AdmissionError as error:
                failed.append((request, str(error)))
                continue
            # A paused request resumes where it stopped; others start after their cached prefix.
            cached = [] if request.block_table else self.block_manager.find_cached_prefix(request)
            start = request.num_computed_tokens + len(cached) * self.block_manager.block_size
            num_new = min(request.num_tokens - start, budget)
            if not self._allocate(request, num_new, cached):
                self.gate.release(request)
                break
            self._start(request, start)
            out.scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new
            admitted.append(request)
        if admitted:
            started = {id(r) for r in admitted}
            self.waiting[:] = [r for r in self.waiting if id(r) not in started]
        for request, message in failed:
            self.finish_request(request, "error")
            self.failed.append((request, message))

    def take_failed(self) -> list[tuple[Request, str]]:
        """Requests finished because they could never start, with why, since the last call."""
        failed, self.failed = self.failed, []
        return failed

    def _allocate(self, request: Request, num_new: int, cached: list[int] = ()) -> bool:
        """Blocks for the request's next tokens, taken from paused requests if none are free."""
        while not self.block_manager.allocate_slots(request, num_new, cached):
            paused = [r for r in self.waiting if r.status == RequestStatus.PREEMPTED and r.block_table
                      and r is not request]
            if not paused:
                return False
            victim = max(paused, key=self._key)
            self.block_manager.free(victim)
            victim.num_computed_tokens = 0  # it now recomputes, as a preempted request does
        return True

    def _pick_victim(self, scheduled_ids: set[str]) -> Request | None:
        candidates = [r for r in self.running if r.request_id not in scheduled_ids]
        return candidates[-1] if candidates else None

    def _preempt(self, request: Request, keep_blocks: bool = False) -> None:
        """Back to the waiting queue: paused with its KV kept, or with its blocks freed to recompute later."""
        if not keep_blocks:
            self.block_manager.free(request)
            request.num_computed_tokens = 0
        self.running.remove(request)
        self.gate.release(request)
        request.draft = DraftTree()
        request.status = RequestStatus.PREEMPTED
        request.metrics.num_preemptions += 1
        request.queued_time = self.now
        self.waiting.append(request)

    def update_from_output(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> list[RequestUpdate]:
        """Advance computed tokens, append sampled tokens up to any stop; one update per request that got some."""
        updates = []
        for item in sched.scheduled:
            request = item.request
            tokens = result.sampled.get(request.request_id)
            num_drafted = len(item.draft)
            # The runner moved the accepted drafts' KV right after the request's tokens; rejected drafts' KV
            # stays behind beyond them, not counted, and gets overwritten.
            num_accepted = len(tokens) - 1 if tokens and num_drafted else 0
            request.num_computed_tokens += item.num_new_tokens - num_drafted + num_accepted
            self.block_manager.cache_computed_blocks(request)
            if tokens is None:
                continue
            if self.suspects and request is self.suspects[0]:  # it sampled alone without a fault: cleared
                self.suspects.pop(0)
            logprobs = result.logprobs.get(request.request_id)
            appended = []
            for i, token in enumerate(tokens):
                request.append_token(token)
                appended.append(token)
                if logprobs is not None:
                    logprob, top = logprobs[i]
                    request.cumulative_logprob += logprob
                    request.logprobs.append(top)
                if request.check_stop():
                    self.finish_request(request, request.finish_reason)
                    break
            if appended and not request.is_finished:
                self.policy.on_tokens(request, len(appended))
            if num_drafted and not request.is_finished:
                self.block_manager.free_unneeded_blocks(request)
            depth = max(item.draft.depths(), default=0)
            updates.append(RequestUpdate(request, appended, num_drafted, depth, num_accepted))
        return updates

    def finish_request(self, request: Request, reason: str) -> None:
        if request.is_finished:
            return
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
            self.gate.release(request)
        else:
            self.waiting.remove(request)
        if request in self.suspects:
            self.suspects.remove(request)
        self.block_manager.free(request)
        self.policy.forget(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.metrics.finished_time = self.clock()
