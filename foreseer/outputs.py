"""What the engine returns for each request, in the shape of vLLM's RequestOutput."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    stop_reason: int | str | None = None  # the stop string or stop token that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(kw_only=True)
class SpeculationFigures:
    """Speculative decoding counters: of one request (in its metrics) or of the whole engine."""

    num_draft_tokens: int = 0  # drafted tokens that were verified
    num_accepted_tokens: int = 0
    num_verifications: int = 0  # steps that verified a draft
    num_rejections: int = 0  # verifications that rejected a draft token
    drafted_per_position: list[int] = field(default_factory=list)  # index i: drafts reaching position i
    accepted_per_position: list[int] = field(default_factory=list)

    def record(self, num_drafted: int, depth: int, num_accepted: int) -> None:
        """One verification of `num_drafted` tokens covering `depth` positions (a tree has more tokens)."""
        self.add(num_drafted, num_accepted, 1, int(num_accepted < depth), [1] * depth, [1] * num_accepted)

    def absorb(self, other: SpeculationFigures) -> None:
        self.add(other.num_draft_tokens, other.num_accepted_tokens, other.num_verifications, other.num_rejections,
                 other.drafted_per_position, other.accepted_per_position)

    def add(self, drafted: int, accepted: int, verifications: int, rejections: int,
            drafted_per_position: list[int], accepted_per_position: list[int]) -> None:
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += accepted
        self.num_verifications += verifications
        self.num_rejections += rejections
        for counts, more in ((self.drafted_per_position, drafted_per_position),
                             (self.accepted_per_position, accepted_per_position)):
            counts.extend([0] * (len(more) - len(counts)))
            for position, count in enumerate(more):
                counts[position] += count

    @property
    def acceptance_rate(self) -> float | None:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @property
    def mean_accepted_length(self) -> float | None:
        """tau: tokens produced per verification (accepted drafts plus the target's own token)."""
        if not self.num_verifications:
            return None
        return (self.num_accepted_tokens + self.num_verifications) / self.num_verifications

    @property
    def acceptance_per_position(self) -> list[float]:
        """Of the drafts that reached position i, the share whose i-th token was accepted."""
        return [a / d for a, d in zip(self.accepted_per_position, self.drafted_per_position)]

    def speculation_summary(self) -> dict:
        return {
            "num_draft_tokens": self.num_draft_tokens, "num_accepted_tokens": self.num_accepted_tokens,
            "num_verifications": self.num_verifications, "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
            "acceptance_per_position": self.acceptance_per_position,
        }


@dataclass
class RequestMetrics(SpeculationFigures):
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0
    num_preemptions: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    error: str | None = None  # set when the request was rejected (bad prompt); outputs are then empty
    predicted_length: int | None = None  # the longest answer the length predictor expects, once prefilled
