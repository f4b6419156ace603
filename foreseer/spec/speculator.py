"""Speculative decoding, between steps: draft tokens for decoding requests and keep acceptance figures.

Before each step the engine asks for drafts; they go into `request.draft`, and the scheduler
schedules them as tokens to compute beside prefill chunks and plain decodes. After the step the sampler
has verified them; `record` updates the per-request and per-engine figures that the next choice uses.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch

from foreseer.config import SpeculativeConfig
from foreseer.core.draft_tree import DraftTree
from foreseer.core.output import ModelRunnerOutput, RequestUpdate, ScheduledRequest, SchedulerOutput
from foreseer.core.request import Request
from foreseer.core.step_hook import StepHook
from foreseer.outputs import SpeculationFigures
from foreseer.registry import DRAFT_PROPOSERS
from foreseer.spec.cost_model import Calibration, StepScales, choose_draft_depth, choose_draft_nodes
from foreseer.spec.proposer import DraftProposer
from foreseer.worker.profiling import StepCostModel

if TYPE_CHECKING:
    from foreseer.core.block_manager import BlockManager
    from foreseer.core.scheduler import Scheduler
    from foreseer.worker.model_runner import ModelRunner

CATCH_UP_HORIZON = 512  # tokens ahead over which a draft model's catch-up may pay for itself
PRIOR_WEIGHT = 4.0  # how many observed tokens a request's own acceptance needs to outweigh the engine's
EVIDENCE_MEMORY = 0.9  # the share of a request's own acceptance evidence that carries over to its next step


class Speculator(StepHook):
    """Speculative decoding as the engine's step hook: drafts before each step, learns from each verification."""

    def __init__(self, config: SpeculativeConfig, proposer: DraftProposer, cost: StepCostModel) -> None:
        self.config = config
        self.proposer = proposer
        self.cost = cost
        self.stats = SpeculationFigures()
        self.hidden_states: dict[str, torch.Tensor] = {}  # request id -> final hidden state of its last token
        self.evidence: dict[str, list[float]] = {}  # request id -> [accepted, rejections], fading (acceptance())
        # Measured against predicted seconds: the target's decode steps, with drafts or without, and a draft model's
        # drafting; and seconds per draft level where no draft model prices it (a Calibration against 1 s a level).
        # One figure for steps with drafts and without: they are the same forward pass, priced by rows and context,
        # and one measured apart goes stale while the other kind runs (a first decode step measured at twice its
        # usual time, never measured again once drafting began, kept layer_skip drafting at a 10% loss).
        self.target_steps, self.drafting = Calibration(), Calibration()
        self.unpriced_drafting = Calibration()
        self._predicted_draft_seconds: float | None = None  # the price of this step's drafting (None: no drafting)
        self._draft_levels = 0  # how deep this step's drafts go
        self._propose_seconds = 0.0  # what this step's drafting took

    @classmethod
    def create(cls, config: SpeculativeConfig, runner: ModelRunner, block_manager: BlockManager,
               max_num_batched_tokens: int) -> Speculator:
        """The configured proposer over this runner, with the target's step costs measured up to the token budget."""
        counts = sorted({min(n, max_num_batched_tokens) for n in (1, 2, 4, 8, 16, 32, 64, 128, 256)})
        proposer = DRAFT_PROPOSERS[config.method].create(config, runner, block_manager)
        return cls(config, proposer, runner.measure_step_costs(counts))

    # -- the step hook --------------------------------------------------------------------------------
    @property
    def needs_hidden_states(self) -> bool:
        return self.proposer.needs_hidden_states

    def before_schedule(self, scheduler: Scheduler) -> None:
        started = time.perf_counter()
        self.propose(*scheduler.speculation_candidates())
        self._propose_seconds = time.perf_counter() - started

    def after_execute(self, sched: SchedulerOutput, output: ModelRunnerOutput, execute_seconds: float) -> None:
        # What drafting and the step really cost, for the next choices.
        self.observe_step(sched.scheduled, self._propose_seconds, execute_seconds)
        if output.hidden_states and self.proposer.needs_hidden_states:
            self.observe(output.hidden_states)

    def after_update(self, updates: list[RequestUpdate]) -> None:
        for update in updates:
            if update.num_drafted:
                self.record(update.request, update.num_drafted, update.draft_depth, update.num_accepted)

    @property
    def scales(self) -> StepScales:
        if not self.config.calibrate:
            return StepScales()
        return StepScales(self.target_steps.ratio, self.drafting.ratio,
                          self.unpriced_drafting.ratio if self.unpriced_drafting.predicted else 0.0)

    def propose(self, decoding: list[Request], num_other_tokens: int) -> None:
        """Set the `draft` of each decoding request (empty where speculation does not pay)."""
        eligible = [r for r in decoding if r.params.speculates]
        self._predicted_draft_seconds = None
        for request in decoding:
            request.draft = DraftTree()
        self.evidence = {r.request_id: [n * EVIDENCE_MEMORY for n in self.evidence[r.request_id]]
                         for r in eligible if r.request_id in self.evidence}
        # A draft longer than the tokens the request may still generate is wasted work.
        room = [min(self.config.num_speculative_tokens, r.max_tokens - r.num_output_tokens - 1) for r in eligible]
        engine_rate = self.engine_acceptance()
        acceptance = [self.acceptance(r, engine_rate) for r in eligible]
        num_base_tokens = len(decoding) + num_other_tokens
        # Each verified draft token reads its request's context again, as its decode row does.
        contexts = [r.num_tokens for r in eligible]
        base_context = sum(r.num_tokens for r in decoding)
        # Where drafting would not pay even if fully used (a large batch), skip it altogether.
        if self.config.adaptive:
            depth = choose_draft_depth(acceptance, room, num_base_tokens, self.cost, self.proposer.draft_step_cost,
                                       contexts, base_context, self._catch_up_seconds(eligible, acceptance),
                                       self.scales)
        else:
            depth = max(room, default=0)
        if depth == 0:
            return
        hidden = None
        if self.proposer.needs_hidden_states:
            self.hidden_states = {r.request_id: self.hidden_states[r.request_id] for r in decoding
                                  if r.request_id in self.hidden_states}
            hidden = [self.hidden_states.get(r.request_id) for r in eligible]
        catch_up = [self.proposer.catch_up_tokens(r) for r in eligible]
        drafts = self.proposer.propose(eligible, [min(n, depth) for n in room], hidden)
        self._draft_levels = max((max(tree.depths()) for tree in drafts if len(tree)), default=0)
        self._predicted_draft_seconds = self._draft_seconds(eligible, drafts, catch_up, self._draft_levels)
        chosen = drafts if not self.config.adaptive else choose_draft_nodes(
            acceptance, drafts, num_base_tokens, self.cost, contexts, base_context)
        for request, draft in zip(eligible, chosen):
            request.draft = draft

    def _catch_up_seconds(self, requests: list[Request], acceptance: list[float]) -> float:
        """A draft model's prefill of the tokens its cache lacks, paid once and shared out over the steps left
        to each request (at 1 + a tokens a step, and at most CATCH_UP_HORIZON tokens ahead): this step's share."""
        draft_cost = self.proposer.draft_step_cost
        if draft_cost is None:
            return 0.0
        if self.proposer.catch_up_on_target_weights:
            draft_cost = self.cost
        seconds = 0.0
        for request, rate in zip(requests, acceptance):
            missing = self.proposer.catch_up_tokens(request)
            if missing:
                steps_left = min(request.max_tokens - request.num_output_tokens, CATCH_UP_HORIZON) / (1 + rate)
                seconds += draft_cost.cost(missing) / max(steps_left, 1.0)
        return seconds

    def _draft_seconds(self, requests: list[Request], drafts: list[DraftTree], catch_up: list[int],
                       levels: int) -> float | None:
        """The cost model's price of the drafting just done: a draft-model step for each of the `levels` of the
        deepest draft over the requests that drafted, and the catch-up of tokens beyond each one's last. 0 for
        proposers with no draft model to price (their drafting is measured as it is); None where a draft model
        drafted nothing."""
        draft_cost = self.proposer.draft_step_cost
        if draft_cost is None:
            return 0.0
        drafted = [r for r, tree in zip(requests, drafts) if len(tree)]
        if not drafted:
            return None
        seconds = levels * draft_cost.cost(len(drafted), sum(r.num_tokens for r in drafted))
        missing = sum(n - 1 for n in catch_up if n > 1)
        if missing:
            seconds += (self.cost if self.proposer.catch_up_on_target_weights else draft_cost).cost(missing)
        return seconds

    def observe_step(self, scheduled: list[ScheduledRequest], propose_seconds: float, step_seconds: float) -> None:
        """The measured seconds of the step just run, against the cost model's prices: its drafting, if any, and
        the step itself where it ran decode rows (with or without drafts) only, which is what the model prices."""
        if self._predicted_draft_seconds:
            self.drafting.add(propose_seconds, self._predicted_draft_seconds)
        elif self._predicted_draft_seconds == 0.0 and self._draft_levels:  # drafted, with nothing to price it by
            self.unpriced_drafting.add(propose_seconds, self._draft_levels)
        if not scheduled or any(item.num_new_tokens - len(item.draft) != 1 for item in scheduled):
            return
        rows = sum(item.num_new_tokens for item in scheduled)
        context = sum(item.request.num_tokens * item.num_new_tokens for item in scheduled)
        self.target_steps.add(step_seconds, self.cost.cost(rows, context))

    def observe(self, hidden_states: dict[str, torch.Tensor]) -> None:
        """The final hidden state of the token each request got last, for proposers that draft from it."""
        self.hidden_states.update(hidden_states)

    def engine_acceptance(self) -> float:
        """The engine's per-token acceptance (accepted / (accepted + first rejections)): a Beta posterior around the
        proposer's prior, read optimistically, at its mean plus one standard deviation. While little is known
        drafting goes on, and learns: a plain estimate turned drafting off for good after one early rejection,
        since only drafting gives evidence. The optimism shrinks as verifications add up."""
        stats = self.stats
        trials = stats.num_accepted_tokens + stats.num_rejections + PRIOR_WEIGHT
        mean = (stats.num_accepted_tokens + PRIOR_WEIGHT * self.proposer.prior_acceptance) / trials
        return min(mean + math.sqrt(mean * (1.0 - mean) / (trials + 1.0)), 1.0)

    def acceptance(self, request: Request, engine_rate: float | None = None) -> float:
        """A request's per-token acceptance: its own evidence, leaning on the engine's rate until it has some.
        That evidence fades by EVIDENCE_MEMORY a step: acceptance changes as a text goes on (copying, then free
        writing), and a request whose drafts stopped paying tries again once the engine's rate says they may."""
        engine_rate = self.engine_acceptance() if engine_rate is None else engine_rate
        accepted, rejections = self.evidence.get(request.request_id, (0.0, 0.0))
        return (accepted + PRIOR_WEIGHT * engine_rate) / (accepted + rejections + PRIOR_WEIGHT)

    def record(self, request: Request, num_drafted: int, depth: int, num_accepted: int) -> None:
        evidence = self.evidence.setdefault(request.request_id, [0.0, 0.0])
        evidence[0] += num_accepted
        evidence[1] += num_accepted < depth
        request.metrics.record(num_drafted, depth, num_accepted)
        self.stats.record(num_drafted, depth, num_accepted)
        self.proposer.record(num_drafted, num_accepted)
