"""The draft proposer interface: every speculative method drafts tokens for running requests."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

from foreseer.config import SpeculativeConfig
from foreseer.core.draft_tree import DraftTree
from foreseer.worker.profiling import StepCostModel

if TYPE_CHECKING:  # the request module imports the draft tree from this package
    from foreseer.core.block_manager import BlockManager
    from foreseer.core.request import Request
    from foreseer.worker.model_runner import ModelRunner


class DraftProposer(ABC):
    """Drafts tokens to follow each request's tokens so far, at most `max_lengths[i]` deep (fewer, or none,
    is fine): a chain, or a tree of alternatives."""

    name: str
    # Proposers that draft from the target model's final hidden state of each request's last token get it.
    needs_hidden_states = False
    # Proposers that run a model of their own time its steps: the engine weighs them against what drafts save.
    draft_step_cost: StepCostModel | None = None
    # A draft model whose prompt prefills run on the target's own weights: they cost what target steps cost.
    catch_up_on_target_weights = False
    prior_acceptance = 0.5  # per-token acceptance expected before any verification

    @classmethod
    def create(cls, config: SpeculativeConfig, runner: ModelRunner, block_manager: BlockManager) -> DraftProposer:
        """The proposer for this engine; those that need the target model take it from the runner, those that
        draft over the target's KV cache take its blocks from `block_manager`."""
        return cls(config)

    @abstractmethod
    def propose(
        self, requests: list[Request], max_lengths: list[int], hidden_states: list[torch.Tensor | None] | None
    ) -> list[DraftTree]:
        """One draft per request. hidden_states: [H] per request (None where unknown), when asked for."""

    def record(self, num_drafted: int, num_accepted: int) -> None:  # noqa: B027 (a hook most proposers skip)
        """What verification made of a draft, for proposers that adapt to it."""

    def catch_up_tokens(self, request: Request) -> int:
        """Tokens of the request a draft model would have to prefill before drafting (0: none to prefill)."""
        return 0
