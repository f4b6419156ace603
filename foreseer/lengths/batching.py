"""Offline batching strategies for LLM.generate: how a known set of requests is cut into batches.

- `continuous` (the default): every request goes to the engine at once; the scheduler refills the batch each step.
- `static`: the baseline of Zheng et al. (2023): fixed batches in arrival order, each run until its last member
  finishes before the next starts.
- `seqsched`: sequence scheduling (Zheng et al., 2023): per group of queries, predict each answer's length, sort,
  bin by predicted length, and cut the sorted queries into batches whose generation limit is the upper bin edge
  of their longest member (Failure Collection and Recomputation: queries cut at that limit are recomputed after
  the group with the full limit); with Variable Batch Size, a batch holds as many queries as the KV cache fits
  at its limit.

Every strategy drives the same engine (add_request / step), so none changes what a request generates.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, ClassVar

from foreseer.engine.detokenizer import IncrementalDetokenizer
from foreseer.lengths.predictors import LengthPredictor, create_predictor
from foreseer.outputs import RequestOutput
from foreseer.sampling_params import SamplingParams

if TYPE_CHECKING:
    from foreseer.llm import LLM
    from foreseer.lora import LoRARequest


@dataclass
class Job:
    """One validated request of a generate call."""

    request_id: str
    prompt: str | list[int]
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved against the context
    priority: int = 0
    lora_request: LoRARequest | None = None
    length_hint: int | None = None  # the answer's length, where the caller knows it


@dataclass
class BatchingStats:
    """What a strategy computed, in the terms of the paper's ablation."""

    num_queries: int = 0
    generated_tokens: int = 0  # every token decoded, recomputed attempts included
    useful_tokens: int = 0  # tokens of the final answers
    padded_tokens: int = 0  # sum over batches of size x longest answer in it (what padded static batching decodes)
    recomputed: list[str] = field(default_factory=list)  # request ids cut at their bin's limit and run again
    prediction_s: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)  # of each batch run, in order
    batch_limits: list[int] = field(default_factory=list)  # the longest generation limit in each batch

    @property
    def average_padded_length(self) -> float:
        return self.padded_tokens / self.num_queries if self.num_queries else 0.0

    @property
    def useful_share(self) -> float:
        return self.useful_tokens / self.padded_tokens if self.padded_tokens else 1.0

    @property
    def num_batches(self) -> int:
        return len(self.batch_sizes)

    @property
    def num_recomputed(self) -> int:
        return len(self.recomputed)

    @property
    def recomputed_share(self) -> float:
        return self.num_recomputed / self.num_queries if self.num_queries else 0.0

    def as_dict(self) -> dict:
        return {"num_queries": self.num_queries, "num_batches": self.num_batches,
                "generated_tokens": self.generated_tokens, "useful_tokens": self.useful_tokens,
                "padded_tokens": self.padded_tokens, "num_recomputed": self.num_recomputed,
                "prediction_s": self.prediction_s, "batch_sizes": self.batch_sizes,
                "batch_limits": self.batch_limits, "average_padded_length": self.average_padded_length,
                "useful_share": self.useful_share, "recomputed_share": self.recomputed_share}


OnOutput = Callable[[RequestOutput], None]


class BatchingStrategy(ABC):
    name: ClassVar[str]

    def __init__(self) -> None:
        self.stats = BatchingStats()

    def run(self, llm: LLM, jobs: list[Job], on_output: OnOutput) -> None:
        """Generate every job; `on_output` gets each job's final output once, in any order."""
        self.stats = BatchingStats(num_queries=len(jobs))
        if jobs:
            self._run(llm, jobs, on_output)

    @abstractmethod
    def _run(self, llm: LLM, jobs: list[Job], on_output: OnOutput) -> None: ...

    def _run_batch(self, llm: LLM, jobs: Sequence[Job], limits: Sequence[int] | None = None,
                   padded: bool = False) -> Iterator[tuple[Job, int, RequestOutput]]:
        """Run jobs together until the last finishes, each with its own generation limit (default: its
        max_tokens); yields (job, limit, output) as each finishes.

        `padded` reproduces padded static batching (Hugging Face generate, the paper's baseline): every member
        keeps decoding past its end, as a padded row does, until all members have ended; the outputs are then
        cut at each member's end, which leaves them exactly what an unpadded run generates.
        """
        engine = llm.engine
        limits = [job.max_tokens for job in jobs] if limits is None else limits
        by_id = {}
        for job, limit in zip(jobs, limits):
            params = replace(job.params, max_tokens=limit)
            if padded:  # stop tokens end nothing: the member's end is found in its output (_ended)
                params = replace(params, ignore_eos=True, stop_token_ids=[])
            engine.add_request(job.request_id, job.prompt, params, priority=job.priority,
                               lora_request=job.lora_request, length_hint=job.length_hint)
            by_id[job.request_id] = (job, limit)
        pending = dict(by_id)  # padded: members whose output still lacks its end
        finished: dict[str, RequestOutput] = {}
        longest = 0
        while engine.has_unfinished_requests():
            for output in engine.step():
                job, limit = by_id[output.request_id]
                if padded and output.request_id in pending and _ended(engine, job, output):
                    del pending[output.request_id]
                if output.finished:
                    finished[output.request_id] = output
                    lengths = [len(c.token_ids) for c in output.outputs]
                    self.stats.generated_tokens += sum(lengths)
                    longest = max(longest, *lengths)
                    if not padded:
                        yield job, limit, output
            if padded and not pending:  # every member has ended: the padded rows stop with the batch
                for request_id in [r for r in by_id if r not in finished]:
                    output = engine.abort_request(request_id)
                    finished[request_id] = output
                    lengths = [len(c.token_ids) for c in output.outputs]
                    self.stats.generated_tokens += sum(lengths)
                    longest = max(longest, *lengths)
        if padded:
            for request_id, (job, limit) in by_id.items():
                yield job, limit, _cut_at_end(engine, job, finished[request_id])
        self.stats.batch_sizes.append(len(jobs))
        self.stats.batch_limits.append(max(limits))
        self.stats.padded_tokens += len(jobs) * longest

    def _emit(self, output: RequestOutput, on_output: OnOutput) -> None:
        self.stats.useful_tokens += sum(len(c.token_ids) for c in output.outputs)
        on_output(output)


def _stop_tokens(engine, job: Job) -> set[int]:
    return set(job.params.stop_token_ids) | (set() if job.params.ignore_eos else engine.eos_token_ids)


def _end_index(tokens: list[int], stops: set[int]) -> int | None:
    return next((i for i, token in enumerate(tokens) if token in stops), None)


def _ended(engine, job: Job, output: RequestOutput) -> bool:
    """Whether every sequence of a padded member has reached its own end (a stop token, a stop string, or
    its limit)."""
    stops = _stop_tokens(engine, job)
    return output.finished or all(c.finish_reason is not None or _end_index(c.token_ids, stops) is not None
                                  for c in output.outputs)


def _cut_at_end(engine, job: Job, output: RequestOutput) -> RequestOutput:
    """A padded member's output as an unpadded run ends it: cut after its first stop token, with the text,
    logprobs and finish reason that run gives."""
    stops = _stop_tokens(engine, job)
    completions = []
    for completion in output.outputs:
        end = _end_index(completion.token_ids, stops)
        if end is None:  # it ended by a stop string or its limit, as an unpadded run ends it
            completions.append(replace(completion, finish_reason=completion.finish_reason or "length"))
            continue
        tokens = completion.token_ids[:end + 1]
        detokenizer = IncrementalDetokenizer(engine.tokenizer, output.prompt_token_ids,
                                             job.params.skip_special_tokens, job.params.stop_strings,
                                             job.params.include_stop_str_in_output)
        for token in tokens:
            detokenizer.update(token)
        detokenizer.flush()
        logprobs = completion.logprobs[:end + 1] if completion.logprobs is not None else None
        cumulative = (sum(entry[token].logprob for entry, token in zip(logprobs, tokens))
                      if logprobs is not None else None)
        last = tokens[-1]
        completions.append(replace(
            completion, text=detokenizer.visible_text(True), token_ids=tokens, logprobs=logprobs,
            cumulative_logprob=cumulative, finish_reason="stop",
            stop_reason=last if last in job.params.stop_token_ids else None))
    return replace(output, outputs=completions, finished=True)


class ContinuousBatching(BatchingStrategy):
    """Everything to the engine at once: its scheduler batches continuously under its own policy."""

    name = "continuous"

    def _run(self, llm: LLM, jobs: list[Job], on_output: OnOutput) -> None:
        for _, _, output in self._run_batch(llm, jobs):
            self._emit(output, on_output)
        # No padding: a finished request leaves the batch at once.
        self.stats.padded_tokens = self.stats.generated_tokens


def kv_batch_size(llm: LLM, prompt_lengths: Sequence[int], limit: int) -> int:
    """How many of these prompts, each generating `limit` tokens, the KV cache holds at once (at least 1),
    capped at the engine's max_num_seqs so that the engine never queues part of a batch."""
    blocks = llm.engine.block_manager
    free = blocks.num_blocks
    count = 0
    for length in prompt_lengths:
        need = blocks.blocks_needed(length + limit)
        if need > free or count == llm.engine.config.scheduler.max_num_seqs:
            break
        free -= need
        count += 1
    return max(count, 1)


class StaticBatching(BatchingStrategy):
    """Fixed batches in arrival order, each run until its last member finishes (the paper's vanilla baseline).

    The batch size is `batch_size`, or by default as many queries of mean prompt length at the full
    generation limit as the KV cache holds (what a static batch must reserve).
    """

    name = "static"

    def __init__(self, batch_size: int | None = None, padded: bool = False) -> None:
        super().__init__()
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.batch_size = batch_size
        self.padded = padded  # members decode until the batch's last one ends (Hugging Face generate)

    def _run(self, llm: LLM, jobs: list[Job], on_output: OnOutput) -> None:
        size = self.batch_size or fixed_batch_size(llm, jobs)
        for start in range(0, len(jobs), size):
            for _, _, output in self._run_batch(llm, jobs[start:start + size], padded=self.padded):
                self._emit(output, on_output)


def fixed_batch_size(llm: LLM, jobs: Sequence[Job]) -> int:
    """The static batch size for these jobs: queries of mean prompt length at the longest limit the KV cache holds."""
    mean_prompt = math.ceil(sum(len(j.prompt_token_ids) for j in jobs) / max(len(jobs), 1))
    longest = max((j.max_tokens for j in jobs), default=1)
    return kv_batch_size(llm, [mean_prompt] * len(jobs), longest)


class SequenceScheduling(BatchingStrategy):
    """Sequence scheduling with response-length perception (Zheng et al., 2023).

    Each group of `group_size` queries (in arrival order) is predicted, sorted by predicted length and binned
    by `bin_width` tokens, and cut into batches in that order; with `fcr`, a batch's generation limit is the
    upper bin edge of its longest predicted member and the queries it cuts off are recomputed after the group
    with their full limit (without, a batch runs until its last member finishes); with `vbs`, a batch holds as
    many queries as the KV cache fits at its limit, else every batch has the static batch size. `padded` runs
    every batch as padded static batching.
    """

    name = "seqsched"

    # FCR pays a whole recomputation for an answer longer than its bin and only padding for a shorter one, so the
    # shipped heads predict an upper quantile of their length distribution here, not its most likely length.
    DEFAULT_PREDICTOR_OPTIONS: ClassVar[dict[str, dict]] = {"probe": {"quantile": 0.9}, "remaining": {"quantile": 0.9}}

    def __init__(self, predictor: str | LengthPredictor = "remaining", group_size: int = 256, bin_width: int = 50,
                 fcr: bool = True, vbs: bool = True, batch_size: int | None = None,
                 predictor_options: dict | None = None, padded: bool = False) -> None:
        super().__init__()
        for name, value in (("group_size", group_size), ("bin_width", bin_width)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.predictor = predictor
        self.predictor_options = predictor_options
        self.group_size = group_size
        self.bin_width = bin_width
        self.fcr = fcr
        self.vbs = vbs
        self.batch_size = batch_size
        self.padded = padded  # members decode until the batch's last one ends (Hugging Face generate)

    def _run(self, llm: LLM, jobs: list[Job], on_output: OnOutput) -> None:
        predictor = self._predictor(llm)
        fixed = self.batch_size or fixed_batch_size(llm, jobs)
        for start in range(0, len(jobs), self.group_size):
            group = jobs[start:start + self.group_size]
            began = time.perf_counter()
            predicted = predictor.predict([j.prompt_token_ids for j in group])
            self.stats.prediction_s += time.perf_counter() - began
            failures: list[tuple[Job, RequestOutput]] = []
            for batch, limits in self._batches(llm, group, predicted, fixed):
                for job, limit, output in self._run_batch(llm, batch, limits, self.padded):
                    if limit < job.max_tokens and any(c.finish_reason == "length" for c in output.outputs):
                        failures.append((job, output))
                    else:
                        self._emit(output, on_output)
            # Failure Collection and Recomputation: the cut-off queries, again from the start, with full limits,
            # re-binned by their whole length as predicted again from the answer they got so far, where the
            # predictor can (else in arrival order, in static batches).
            self.stats.recomputed.extend(job.request_id for job, _ in failures)
            failed = [job for job, _ in failures]
            began = time.perf_counter()
            refined = predictor.refine([job.prompt_token_ids for job in failed],
                                       [output.outputs[0].token_ids for _, output in failures]) if failed else None
            self.stats.prediction_s += time.perf_counter() - began
            batches = ([failed[i:i + fixed] for i in range(0, len(failed), fixed)] if refined is None else
                       [batch for batch, _ in self._batches(llm, failed, refined, fixed, cut=False)])
            for batch in batches:
                for _, _, output in self._run_batch(llm, batch, padded=self.padded):
                    self._emit(output, on_output)

    def _predictor(self, llm: LLM) -> LengthPredictor:
        if isinstance(self.predictor, str):
            options = self.predictor_options
            if options is None:
                options = self.DEFAULT_PREDICTOR_OPTIONS.get(self.predictor, {})
            return create_predictor(self.predictor, llm, **options)
        return self.predictor

    def _batches(self, llm: LLM, group: list[Job], predicted: list[int], fixed: int,
                 cut: bool = True) -> list[tuple[list[Job], list[int]]]:
        """Batches cut from the group in predicted order, with each member's generation limit.

        A batch's limit is the upper bin edge of its longest predicted member (with FCR and `cut`, every
        member's limit; a member of a shorter bin may use the longer edge at no cost, since the batch runs that
        long anyway; else each member's max_tokens).
        With VBS a batch takes queries as long as the KV cache holds them all at that limit, else `fixed` of
        them. A bin's last few queries join the next bin's batch rather than run as a small batch of their own:
        a decode step reads every weight whatever the number of rows, so a token costs several times more in a
        batch of a few rows than in a full one.
        """
        def bin_edge(i: int) -> int:
            return max(math.ceil(predicted[i] / self.bin_width), 1) * self.bin_width

        batches: list[tuple[list[int], int]] = []  # (members, their longest bin edge)
        members: list[int] = []
        for i in sorted(range(len(group)), key=lambda i: predicted[i]):
            if members and not self._fits(llm, [group[j] for j in members + [i]], bin_edge(i), fixed):
                batches.append((members, bin_edge(members[-1])))
                members = []
            members.append(i)
        if members:
            batches.append((members, bin_edge(members[-1])))
        return [([group[i] for i in batch],
                 [min(edge, group[i].max_tokens) if self.fcr and cut else group[i].max_tokens for i in batch])
                for batch, edge in batches]

    def _fits(self, llm: LLM, batch: list[Job], edge: int, fixed: int) -> bool:
        """Whether these queries make one batch at this bin edge: the KV cache holds them all (VBS; without FCR
        an answer longer than predicted may still outgrow it, and the engine then preempts to make room), or
        there are at most `fixed` of them."""
        if not self.vbs:
            return len(batch) <= fixed
        limit = min(edge, max(job.max_tokens for job in batch))
        return kv_batch_size(llm, [len(job.prompt_token_ids) for job in batch], limit) == len(batch)


STRATEGIES: dict[str, type[BatchingStrategy]] = {
    s.name: s for s in (ContinuousBatching, StaticBatching, SequenceScheduling)
}


def get_strategy(batching: str | BatchingStrategy) -> BatchingStrategy:
    if isinstance(batching, BatchingStrategy):
        return batching
    if batching not in STRATEGIES:
        raise ValueError(f"unknown batching {batching!r}; available: {', '.join(STRATEGIES)}")
    return STRATEGIES[batching]()
