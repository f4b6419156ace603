"""Speculative decoding, between steps: draft tokens for decoding requests and keep acceptance figures.

Before each step the engine asks for drafts; they go into `request.draft`, and the scheduler
schedules them as tokens to compute beside prefill chunks and plain decodes. After the step the sampler
has verified them; `record` updates the per-request and per-engine figures that the next choice uses.
"""

from __future__ import annotations

import torch

from foreseer.config import SpeculativeConfig
from foreseer.engine.request import Request
from foreseer.outputs import SpeculationFigures
from foreseer.spec.cost_model import StepCostModel, choose_draft_depth, choose_draft_nodes
from foreseer.spec.proposer import DraftProposer
from foreseer.spec.tree import DraftTree

CATCH_UP_HORIZON = 512  # tokens ahead over which a draft model's catch-up may pay for itself
PRIOR_WEIGHT = 4.0  # how many observed tokens a request's own acceptance needs to outweigh the engine's


class Speculator:
    def __init__(self, config: SpeculativeConfig, proposer: DraftProposer, cost: StepCostModel) -> None:
        self.config = config
        self.proposer = proposer
        self.cost = cost
        self.stats = SpeculationFigures()
        self.hidden_states: dict[str, torch.Tensor] = {}  # request id -> final hidden state of its last token

    def propose(self, decoding: list[Request], num_other_tokens: int) -> None:
        """Set the `draft` of each decoding request (empty where speculation does not pay)."""
        eligible = [r for r in decoding if r.params.use_speculation]
        for request in decoding:
            request.draft = DraftTree()
        # A draft longer than the tokens the request may still generate is wasted work.
        room = [min(self.config.num_speculative_tokens, r.max_tokens - r.num_output_tokens - 1) for r in eligible]
        acceptance = [self.acceptance(r) for r in eligible]
        num_base_tokens = len(decoding) + num_other_tokens
        # Each verified draft token reads its request's context again, as its decode row does.
        contexts = [r.num_tokens for r in eligible]
        base_context = sum(r.num_tokens for r in decoding)
        # Where drafting would not pay even if fully used (a large batch), skip it altogether.
        depth = choose_draft_depth(acceptance, room, num_base_tokens, self.cost, self.proposer.draft_step_cost,
                                   contexts, base_context, self._catch_up_seconds(eligible, acceptance))
        if depth == 0:
            return
        hidden = None
        if self.proposer.needs_hidden_states:
            self.hidden_states = {r.request_id: self.hidden_states[r.request_id] for r in decoding
                                  if r.request_id in self.hidden_states}
            hidden = [self.hidden_states.get(r.request_id) for r in eligible]
        drafts = self.proposer.propose(eligible, [min(n, depth) for n in room], hidden)
        chosen = choose_draft_nodes(acceptance, drafts, num_base_tokens, self.cost, contexts, base_context)
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

    def observe(self, hidden_states: dict[str, torch.Tensor]) -> None:
        """The final hidden state of the token each request got last, for proposers that draft from it."""
        self.hidden_states.update(hidden_states)

    def acceptance(self, request: Request) -> float:
        """Per-token acceptance, as a geometric rate: accepted / (accepted + first rejections)."""
        engine = self.stats
        engine_rate = (engine.num_accepted_tokens + PRIOR_WEIGHT * self.proposer.prior_acceptance) / (
            engine.num_accepted_tokens + engine.num_rejections + PRIOR_WEIGHT)
        own = request.metrics
        return (own.num_accepted_tokens + PRIOR_WEIGHT * engine_rate) / (
            own.num_accepted_tokens + own.num_rejections + PRIOR_WEIGHT)

    def record(self, request: Request, num_drafted: int, depth: int, num_accepted: int) -> None:
        request.metrics.record(num_drafted, depth, num_accepted)
        self.stats.record(num_drafted, depth, num_accepted)
        self.proposer.record(num_drafted, num_accepted)
