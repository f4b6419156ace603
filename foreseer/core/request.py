"""A request as the scheduler sees it: one sequence of tokens and how much of it is computed."""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import torch

from foreseer.core.draft_tree import DraftTree
from foreseer.core.length_estimate import RemainingLength
from foreseer.outputs import Logprob, RequestMetrics
from foreseer.sampling_params import SamplingParams

if TYPE_CHECKING:
    from foreseer.lora.request import LoRARequest
    from foreseer.structured import SequenceGrammar


class RequestStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass
class SequenceGroup:
    """What the n sequences of one parent request share: the answer length predicted for its prompt."""

    predicted_length: int | None = None


class Request:
    """One sequence. A parent request with n > 1 becomes n of these, sharing the prompt's cached blocks."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        eos_token_ids: set[int],
        arrival_time: float | None = None,
        priority: int = 0,
        seed: int | None = None,
        group: SequenceGroup | None = None,
        length_hint: int | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)  # prompt + generated, grows each step
        self.params = params
        self.max_tokens = max_tokens  # resolved against the context length
        self.stop_token_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_token_ids)
        self.priority = priority
        self.metrics = RequestMetrics(arrival_time=time.time() if arrival_time is None else arrival_time)
        self.status = RequestStatus.WAITING
        # When it last joined the waiting queue (arrival, or its last preemption): aging policies measure from it.
        self.queued_time = self.metrics.arrival_time
        self.group = group or SequenceGroup()
        # How many tokens it has left, as last predicted (the remaining-length head), or as the client knows it
        # (a length hint: the whole answer's length, which no prediction then replaces).
        self.length_estimate: RemainingLength | None = None
        self.has_length_hint = length_hint is not None
        if length_hint is not None:
            self.length_estimate = RemainingLength.exactly(length_hint)
            self.group.predicted_length = length_hint
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        # Blocks held; a PREEMPTED request that still holds some is paused and resumes without recompute.
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of this request's full blocks, in order
        # Seeds the hash chain: requests whose KV must never be shared (e.g. other adapters) differ here.
        self.cache_salt: int | str | None = None
        self.lora_request: LoRARequest | None = None  # the adapter its tokens run with; None: the base model
        self.generator: torch.Generator | None = None
        # params.bad_words as token id sequences (the engine tokenizes them): the last one is masked after the rest.
        self.bad_words_token_ids: list[list[int]] = []
        # Its params.structured_outputs matcher (the engine compiles it): masks what the grammar forbids.
        self.grammar: SequenceGrammar | None = None
        if seed is not None:
            self.generator = torch.Generator().manual_seed(seed)
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict[int, Logprob]] = []
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.draft = DraftTree()  # speculative tokens to verify in the next step
        self.num_faults = 0  # failed steps traced to it (LLMEngine.step fails it at the second)

    @property
    def predicted_length(self) -> int | None:
        """Of the answer, where the engine predicts it (length probe): one prediction for the whole group."""
        return self.group.predicted_length

    @predicted_length.setter
    def predicted_length(self, length: int | None) -> None:
        self.group.predicted_length = length

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def append_token(self, token: int) -> None:
        self.token_ids.append(token)
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = time.time()

    def check_stop(self) -> bool:
        """Stop on a stop/EOS token or the length limit; stop strings are the detokenizer's job."""
        last = self.token_ids[-1]
        if last in self.stop_token_ids:
            self.finish_reason, self.stop_reason = "stop", last if last in self.params.stop_token_ids else None
        elif self.num_output_tokens >= self.max_tokens:
            self.finish_reason = "length"
        return self.finish_reason is not None
