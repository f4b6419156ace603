"""Speculative decoding, between steps: draft tokens for decoding requests and keep acceptance figures.

Before each step the engine asks for drafts; they go into `request.spec_token_ids`, and the scheduler
schedules them as tokens to compute beside prefill chunks and plain decodes. After the step the sampler
has verified them; `record` updates the per-request and per-engine figures that the next choice uses.
"""

from __future__ import annotations

from foreseer.config import SpeculativeConfig
from foreseer.engine.request import Request
from foreseer.outputs import SpeculationFigures
from foreseer.spec.cost_model import StepCostModel, choose_draft_lengths
from foreseer.spec.proposer import DraftProposer

PRIOR_ACCEPTANCE = 0.5  # before any verification
PRIOR_WEIGHT = 4.0  # how many observed tokens a request's own acceptance needs to outweigh the engine's


class Speculator:
    def __init__(self, config: SpeculativeConfig, proposer: DraftProposer, cost: StepCostModel) -> None:
        self.config = config
        self.proposer = proposer
        self.cost = cost
        self.stats = SpeculationFigures()

    def propose(self, decoding: list[Request], num_other_tokens: int) -> None:
        """Set `spec_token_ids` of each decoding request (empty where speculation does not pay)."""
        eligible = [r for r in decoding if r.params.use_speculation]
        for request in decoding:
            request.spec_token_ids = []
        # A draft longer than the tokens the request may still generate is wasted work.
        room = [min(self.config.num_speculative_tokens, r.max_tokens - r.num_output_tokens - 1) for r in eligible]
        drafts = self.proposer.propose(eligible, room)
        lengths = choose_draft_lengths([self.acceptance(r) for r in eligible], [len(d) for d in drafts],
                                       len(decoding) + num_other_tokens, self.cost)
        for request, draft, length in zip(eligible, drafts, lengths):
            request.spec_token_ids = draft[:length]

    def acceptance(self, request: Request) -> float:
        """Per-token acceptance, as a geometric rate: accepted / (accepted + first rejections)."""
        engine = self.stats
        engine_rate = (engine.num_accepted_tokens + PRIOR_WEIGHT * PRIOR_ACCEPTANCE) / (
            engine.num_accepted_tokens + engine.num_rejections + PRIOR_WEIGHT)
        own = request.metrics
        return (own.num_accepted_tokens + PRIOR_WEIGHT * engine_rate) / (
            own.num_accepted_tokens + own.num_rejections + PRIOR_WEIGHT)

    def record(self, request: Request, num_drafted: int, num_accepted: int) -> None:
        request.metrics.record(num_drafted, num_accepted)
        self.stats.record(num_drafted, num_accepted)
