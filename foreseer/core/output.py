"""The messages between the scheduler and the model runner."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from foreseer.core.draft_tree import DraftTree
from foreseer.core.request import Request
from foreseer.outputs import Logprob


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens to compute this step: a prefill chunk, or 1 for a decode, plus any drafts
    draft: DraftTree = field(default_factory=DraftTree)  # speculative tokens to verify, after the rest


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


class RequestFault(Exception):
    """A step failed in work that belongs to these requests alone (e.g. sampling one of them): they fail, and the
    step's other requests run again as if it had not happened."""

    def __init__(self, request_ids: list[str], cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.request_ids = request_ids
        self.cause = cause


@dataclass
class ModelRunnerOutput:
    """Tokens sampled this step, for the requests whose scheduled tokens reached their end: one token, or
    the accepted drafts and the target's token after them (with the logprobs of each, where asked)."""

    sampled: dict[str, list[int]]
    logprobs: dict[str, list[tuple[float, dict[int, Logprob]]]] = field(default_factory=dict)
    # Final hidden state at each request's last emitted token, when a step hook reads them.
    hidden_states: dict[str, torch.Tensor] = field(default_factory=dict)
    # The output of each of the runner's capture_layers at the same token, when a step hook reads them.
    layer_states: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)


@dataclass
class RequestUpdate:
    """What one step did to a request: tokens appended (after stop checks) and drafts verified/accepted."""

    request: Request
    new_token_ids: list[int]
    num_drafted: int = 0  # draft tokens verified (tree nodes)
    draft_depth: int = 0  # positions they covered (the length of a chain)
    num_accepted: int = 0
