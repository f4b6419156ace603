"""Remaining-length traces: every position of every generated answer is a training example.

The engine generates answers to ShareGPT prompts as it serves any request (continuous batching, paged KV
cache), and a step hook records, for every token it samples, the residual stream after a few decoder layers
at the token that produced it: the states a remaining-length head reads while serving. Row t of an answer of n
tokens is the state once t tokens were generated (t = 0: the end of the prefill), and its label is n - t.

Each prompt's max_tokens is the length of its ShareGPT answer (at most `max_tokens_cap`), as in the serving
benchmark. An answer stopped by that limit is censored: its natural length is at least what was generated, and
the head's training treats it so, not as its true length.

Storage: a JSONL file of records (one per prompt) and safetensors shards of fp16 states beside it. A shard is
written before the records that point into it, so an interrupted build resumes where it stopped: records in
the JSONL are done, and a shard that no record names is left over from the interruption and rewritten.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from foreseer.bench.data import chat_prompt_ids, sharegpt_answer_budgets
from foreseer.core.output import ModelRunnerOutput, SchedulerOutput
from foreseer.core.step_hook import StepHook
from foreseer.sampling_params import SamplingParams
from foreseer.training.lengths.dataset import drop_partial_last_line

logger = logging.getLogger(__name__)


@dataclass
class TraceConfig:
    # Decoder layers (1-based) whose output is recorded; validation picks the head's layer among them.
    layers: tuple[int, ...] = (6, 12, 18, 24, 30)
    max_tokens_cap: int = 1024  # each prompt's max_tokens: its dataset answer's length, at most this
    max_prompt_tokens: int = 512  # longer questions are shortened to fit
    max_prompts_in_flight: int = 64
    shard_prompts: int = 64  # prompts per shard file
    temperature: float = 0.0

    def __post_init__(self) -> None:
        if not self.layers or any(layer < 1 for layer in self.layers):
            raise ValueError(f"layers must be decoder layer numbers >= 1, got {self.layers!r}")
        for name in ("max_tokens_cap", "max_prompt_tokens", "max_prompts_in_flight", "shard_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")


@dataclass
class TraceRecord:
    id: str
    prompt_token_ids: list[int]  # chat-templated, as generated from
    output_length: int  # tokens generated
    max_tokens: int
    censored: bool  # stopped at max_tokens: the natural answer is at least output_length tokens
    shard: str  # file name of the shard (beside the JSONL) that holds its states
    offset: int  # its first row there; rows offset .. offset + output_length - 1
    # Wall-clock seconds since the previous record finished (the throughput-amortized time of its answer).
    generation_s: float
    # The answer itself: with the prompt, what a later build needs to recompute the states by one prefill, so the
    # JSONL alone (a few MB) keeps the generated dataset. Empty in files written before it was recorded.
    output_token_ids: list[int] = dataclasses.field(default_factory=list)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class TracePrompt:
    id: str
    prompt: str | list[int]  # a question (chat-templated and shortened here) or the prompt's token ids
    max_tokens: int


class _Recorder(StepHook):
    """The step hook that collects each request's layer states, one row per sampled token."""

    def __init__(self, layers: Sequence[int]) -> None:
        self.capture_layers = tuple(layers)
        self.rows: dict[str, list[torch.Tensor]] = {}  # request id -> [num_layers, hidden] fp16 per token

    def after_execute(self, sched: SchedulerOutput, output: ModelRunnerOutput, execute_seconds: float) -> None:
        requests = {item.request.request_id: item.request for item in sched.scheduled}
        for request_id, states in output.layer_states.items():
            rows = self.rows.setdefault(request_id, [])
            if len(rows) != requests[request_id].num_output_tokens:
                raise RuntimeError(f"request {request_id}: a state for token {len(rows)} is missing (speculative "
                                   "decoding emits several tokens a step; build traces without it)")
            rows.append(torch.stack([states[layer] for layer in self.capture_layers]).to(torch.float16).cpu())


def sharegpt_trace_prompts(tokenizer, path: str, num: int, skip: int, max_tokens_cap: int) -> list[TracePrompt]:
    """The prompts of ShareGPT conversations skip .. skip + num, each with its answer's length as max_tokens."""
    return [TracePrompt(*budget) for budget in sharegpt_answer_budgets(tokenizer, path, num, skip, max_tokens_cap)]


def load_trace_records(path: str) -> list[TraceRecord]:
    """The records of a trace JSONL file; a malformed line raises ValueError naming it."""
    if not os.path.isfile(path):
        raise ValueError(f"trace dataset {path!r} not found")
    fields = {f.name for f in dataclasses.fields(TraceRecord)}
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(TraceRecord(**{k: v for k, v in json.loads(line).items() if k in fields}))
            except (json.JSONDecodeError, TypeError) as error:
                raise ValueError(f"{path}:{number}: not a trace record ({error})") from error
    return records


def load_trace_states(path: str, records: Sequence[TraceRecord], layer: int) -> torch.Tensor:
    """[sum of output lengths, hidden] fp16: the recorded states of one layer for these records, in order."""
    from safetensors import safe_open

    directory = os.path.dirname(os.path.abspath(path))
    by_shard: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        by_shard.setdefault(record.shard, []).append(index)
    parts: list[torch.Tensor | None] = [None] * len(records)
    for shard, indices in by_shard.items():
        with safe_open(os.path.join(directory, shard), "pt") as f:
            if f"layer_{layer}" not in f.keys():
                raise ValueError(f"shard {shard} has no states of layer {layer}; it has {sorted(f.keys())}")
            states = f.get_tensor(f"layer_{layer}")
        for index in indices:
            record = records[index]
            parts[index] = states[record.offset:record.offset + record.output_length]
    return torch.cat(parts) if parts else torch.empty(0)


def _save_shard(directory: str, shard: str, states: torch.Tensor, layers: Sequence[int]) -> None:
    """states: [rows, len(layers), hidden]; written whole or not at all (a temporary file, then renamed)."""
    from safetensors.torch import save_file

    tensors = {f"layer_{layer}": states[:, i].to(torch.float16).contiguous() for i, layer in enumerate(layers)}
    temporary = os.path.join(directory, shard + ".tmp")
    save_file(tensors, temporary)
    os.replace(temporary, os.path.join(directory, shard))


def restore_trace_states(llm, path: str, layers: Sequence[int] = TraceConfig.layers, use_tqdm: bool = True) -> dict:
    """Recompute the shards that the records of `path` name but that are missing (the JSONL kept without them):
    each answer's states by one prefill of its prompt and answer (features.answer_layer_states). Returns a
    summary. Records written before answers were recorded (no output_token_ids) cannot be restored."""
    from foreseer.lengths.features import answer_layer_states

    drop_partial_last_line(path)
    records = load_trace_records(path)
    directory = os.path.dirname(os.path.abspath(path))
    by_shard: dict[str, list[TraceRecord]] = {}
    for record in records:
        by_shard.setdefault(record.shard, []).append(record)
    missing = {shard: rows for shard, rows in by_shard.items() if not os.path.isfile(os.path.join(directory, shard))}
    for shard, rows in missing.items():
        unrecorded = [r.id for r in rows if len(r.output_token_ids) != r.output_length]
        if unrecorded:
            raise ValueError(f"shard {shard} is missing and records {unrecorded[:5]} hold no answer to restore it from")
    start = time.perf_counter()
    for shard, rows in tqdm(missing.items(), desc="restore", unit="shard", disable=not use_tqdm):
        rows = sorted(rows, key=lambda r: r.offset)
        if [r.offset for r in rows] != [sum(r.output_length for r in rows[:i]) for i in range(len(rows))]:
            raise ValueError(f"the records of shard {shard} do not cover its rows one after another")
        states = answer_layer_states(llm.engine, [r.prompt_token_ids for r in rows],
                                     [r.output_token_ids for r in rows], layers)
        _save_shard(directory, shard, torch.cat(states), layers)
    return {"path": path, "num_records": len(records), "num_shards": len(by_shard), "num_restored": len(missing),
            "seconds": round(time.perf_counter() - start, 3)}


def build_traces(llm, prompts: Sequence[TracePrompt], path: str, config: TraceConfig | None = None,
                 use_tqdm: bool = True) -> dict:
    """Generate an answer to each prompt missing from `path` and record its trace; returns a summary."""
    config = config or TraceConfig()
    engine = llm.engine
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    drop_partial_last_line(path)
    records = load_trace_records(path) if os.path.isfile(path) else []
    done = {r.id for r in records}
    stem = os.path.splitext(os.path.basename(path))[0]
    named = {r.shard for r in records}
    for name in os.listdir(directory):  # shards an interrupted build wrote but no record names
        if name.startswith(f"{stem}-") and name.endswith((".safetensors", ".tmp")) and name not in named:
            os.remove(os.path.join(directory, name))
    next_shard = len(named)
    todo = [p for p in prompts if p.id not in done]
    recorder = _Recorder(config.layers)
    engine.add_hook(recorder)
    pending = iter(todo)
    in_flight: dict[str, tuple[TracePrompt, list[int]]] = {}
    finished: list[tuple[TracePrompt, list[int], list[int], bool, float]] = []
    num_failed = 0
    start = last = time.perf_counter()
    bar = tqdm(total=len(todo), desc="traces", unit="prompt", disable=not use_tqdm)

    def write_shard() -> None:
        nonlocal next_shard
        shard = f"{stem}-{next_shard:05d}.safetensors"
        next_shard += 1
        rows, offset, lines = [], 0, []
        for prompt, ids, output_ids, censored, seconds in finished:
            states = torch.stack(recorder.rows.pop(f"{prompt.id}#0"))  # [length, num_layers, hidden]
            rows.append(states)
            lines.append(TraceRecord(prompt.id, ids, len(output_ids), prompt.max_tokens, censored, shard, offset,
                                     seconds, output_ids))
            offset += len(output_ids)
        _save_shard(directory, shard, torch.cat(rows), config.layers)
        with open(path, "a") as out:
            for line in lines:
                out.write(json.dumps(dataclasses.asdict(line)) + "\n")
        finished.clear()

    try:
        while True:
            while len(in_flight) < config.max_prompts_in_flight:
                prompt = next(pending, None)
                if prompt is None:
                    break
                ids = prompt.prompt if isinstance(prompt.prompt, list) else chat_prompt_ids(
                    engine.tokenizer, prompt.prompt, config.max_prompt_tokens)
                params = SamplingParams(temperature=config.temperature, max_tokens=prompt.max_tokens)
                try:
                    engine.add_request(prompt.id, ids, params)
                except ValueError as error:
                    logger.warning("prompt %s refused: %s", prompt.id, error)
                    num_failed += 1
                    bar.update(1)
                    continue
                in_flight[prompt.id] = (prompt, ids)
            if not in_flight:
                break
            for output in engine.step():
                if output.finished:
                    prompt, ids = in_flight.pop(output.request_id)
                    now = time.perf_counter()
                    completion = output.outputs[0]
                    finished.append((prompt, ids, list(completion.token_ids), completion.finish_reason == "length",
                                     round(now - last, 6)))
                    last = now
                    bar.update(1)
            if len(finished) >= config.shard_prompts:
                write_shard()
        if finished:
            write_shard()
    finally:
        bar.close()
        engine.hooks.remove(recorder)
        engine.runner.capture_layers = ()
    num_records = len(load_trace_records(path)) if os.path.isfile(path) else 0
    return {"path": path, "num_records": num_records, "num_new": num_records - len(records),
            "num_skipped": len(prompts) - len(todo), "num_failed": num_failed,
            "seconds": round(time.perf_counter() - start, 3)}

