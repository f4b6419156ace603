"""Speculative decoding: output tokens/s with and without each draft method, across batch sizes and prompt sets.

Two prompt sets: input-grounded prompts (rewrite or summarize a long ShareGPT answer, where the output repeats
the input and prompt lookup should pay) and open chat prompts (ShareGPT questions, where it should not). Every
LLM is built once and reused; each (prompt set, batch size) runs the same prompts, greedy, with that many requests
in flight, on the baseline and on every method in turn, so that machine load drifts alike for all and outputs
compare token by token (speculation must not change greedy output).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import zip_longest

import torch

from foreseer.bench.data import chat_prompt_ids, load_sharegpt_questions, load_sharegpt_turns
from foreseer.bench.report import write_json
from foreseer.bench.throughput import RunResult
from foreseer.bench.turns import fastest_in_turns
from foreseer.llm import LLM
from foreseer.sampling_params import SamplingParams

GROUNDED_TEMPLATES = (
    "Rewrite the following text, keeping its meaning:\n\n{text}",
    "Summarize the following text:\n\n{text}",
)
MIN_TEXT_CHARS = 500  # a "long text": a short answer gives the model little to copy from
WARMUP_PROMPTS, WARMUP_TOKENS = 2, 16
BASELINE = "none"  # the engine without speculation
# A second engine without speculation, timed like the others: how far two identical engines read apart in one run
# (the noise floor that a method's speedup must be read against).
CONTROL = "control"

# Builds an engine: None for no speculation, else a speculative_config dict.
LLMFactory = Callable[[dict | None], LLM]


@dataclass
class SpecBenchArgs:
    dataset: str  # ShareGPT-format JSON file of the prompts
    methods: list[str] | None = None  # draft methods (default: every registered proposer)
    num_speculative_tokens: int = 5  # each method's deepest draft
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])  # requests in flight together
    num_prompts: int = 32  # prompts per set
    batch_1_prompts: int = 8  # batch 1 runs prompts one by one: only the first few, to keep it short
    max_tokens: int = 128  # new tokens per prompt at most
    max_prompt_tokens: int = 512  # longer prompts are shortened to fit
    # Runs of the prompts per engine and batch size (a fresh prefix cache each); the fastest counts
    repeats: int = 1
    control: bool = True  # also time a second engine without speculation: it shows the run's noise
    spec_options: dict = field(default_factory=dict)  # further speculative_config keys, e.g. prompt_lookup_max
    output_json: str | None = None  # write the report to this JSON file
    plot: str | None = None  # PNG of the speedup against batch size


def load_sharegpt_answers(path: str, num: int, min_chars: int = MIN_TEXT_CHARS) -> list[str]:
    """The first gpt turn of the first `num` conversations whose answer has at least `min_chars` characters."""
    texts = [t for t in load_sharegpt_turns(path, "gpt") if len(t) >= min_chars]
    if len(texts) < num:
        raise ValueError(f"dataset {path!r} has {len(texts)} answers of {min_chars}+ characters; {num} asked for")
    return texts[:num]


def build_prompt_sets(tokenizer, args: SpecBenchArgs) -> dict[str, list[list[int]]]:
    """Chat-templated token ids of each set; grounded prompts alternate rewrite and summarize."""
    answers = load_sharegpt_answers(args.dataset, args.num_prompts)
    grounded = [GROUNDED_TEMPLATES[i % len(GROUNDED_TEMPLATES)].format(text=t) for i, t in enumerate(answers)]
    chat = load_sharegpt_questions(args.dataset, args.num_prompts)
    return {name: [chat_prompt_ids(tokenizer, text, args.max_prompt_tokens) for text in texts]
            for name, texts in (("grounded", grounded), ("chat", chat))}


@contextmanager
def requests_in_flight(llm: LLM, count: int) -> Iterator[None]:
    """At most `count` requests running at once in this engine (its max_num_seqs), for the block."""
    config = llm.engine.scheduler.config
    previous, config.max_num_seqs = config.max_num_seqs, count
    try:
        yield
    finally:
        config.max_num_seqs = previous


def run_interleaved(llms: dict[str, LLM], prompts: list[list[int]], batch_size: int, max_tokens: int,
                    repeats: int = 1) -> dict[str, tuple[RunResult, list[list[int]]]]:
    """Every prompt through each engine with `batch_size` requests in flight: continuous batching gives a finished
    request's seat to the next prompt, as a server under that load does. The engines take turns, each one's fastest
    of `repeats` runs counting, each run on a fresh prefix cache (identical engines read 0.96-1.04x of each other
    in single runs)."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    num_prompt_tokens = sum(map(len, prompts))

    def run_once(name: str) -> tuple[RunResult, list[list[int]]]:
        llm = llms[name]
        llm.reset_prefix_cache()
        with requests_in_flight(llm, batch_size):
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            elapsed = time.perf_counter() - start
        for i, out in enumerate(outputs):
            if out.error:
                raise ValueError(f"{name}, prompt {i}: {out.error}")
        tokens = [out.outputs[0].token_ids for out in outputs]
        return RunResult(elapsed, len(prompts), num_prompt_tokens, sum(map(len, tokens))), tokens

    ways = {name: (lambda name=name: run_once(name)) for name in llms}
    return fastest_in_turns(ways, repeats, lambda result: result[0].elapsed_s)


def _difference(after, before):
    """Counters of after minus before, field by field (lists position by position), as the same type."""
    values = {}
    for f in dataclasses.fields(after):
        a, b = getattr(after, f.name), getattr(before, f.name)
        values[f.name] = [x - y for x, y in zip_longest(a, b, fillvalue=0)] if isinstance(a, list) else a - b
    return type(after)(**values)


def speculation_report(figures) -> dict:
    drafted, accepted = figures.drafted_per_position, figures.accepted_per_position
    return {
        "num_draft_tokens": figures.num_draft_tokens, "num_accepted_tokens": figures.num_accepted_tokens,
        "num_verifications": figures.num_verifications, "acceptance_rate": figures.acceptance_rate,
        "mean_accepted_length": figures.mean_accepted_length,
        "drafted_per_position": list(drafted), "accepted_per_position": list(accepted),
        # Of the verified drafts that reached position i, the share whose i-th token was accepted.
        "acceptance_per_position": [a / d if d else None for a, d in zip_longest(accepted, drafted, fillvalue=0)],
    }


def method_report(result: RunResult, tokens: list[list[int]], figures, baseline: RunResult,
                  baseline_tokens: list[list[int]]) -> dict:
    mismatched = [i for i, (a, b) in enumerate(zip(tokens, baseline_tokens)) if a != b]
    return {
        **result.as_dict(), "speedup": result.output_tokens_per_s / baseline.output_tokens_per_s,
        **speculation_report(figures),
        "identical_outputs": len(tokens) - len(mismatched), "mismatched_prompts": mismatched,
    }


COLUMNS = [("prompt set", 10, "s"), ("batch", 5, "d"), ("method", 8, "s"), ("n", 3, "d"), ("base tok/s", 10, ".1f"),
           ("spec tok/s", 10, ".1f"), ("speedup", 7, ".2f"), ("tau", 5, ".2f"), ("accept", 6, ".2f"),
           ("identical", 9, "s"), ("acceptance per position", 0, "s")]


def _row(values: list) -> str:
    cells = []
    for (_, width, fmt), value in zip(COLUMNS, values):
        cells.append(f"{value:>{width}{fmt}}" if value is not None else f"{'-':>{width}}")
    return "  ".join(cells).rstrip()


def _header() -> str:
    return "  ".join(f"{name:>{width}}" for name, width, _ in COLUMNS)


def _table_row(row: dict, method: str) -> str:
    m = row["methods"][method]
    positions = " ".join("-" if a is None else f"{a:.2f}" for a in m["acceptance_per_position"])
    return _row([row["prompt_set"], row["batch_size"], method, row["num_prompts"],
                 row["baseline"]["output_tokens_per_s"], m["output_tokens_per_s"], m["speedup"],
                 m["mean_accepted_length"], m["acceptance_rate"], f"{m['identical_outputs']}/{row['num_prompts']}",
                 positions])


def plot_speedups(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in report["methods"]:
        for prompt_set in report["prompt_sets"]:
            rows = [r for r in report["results"] if r["prompt_set"] == prompt_set]
            ax.plot([r["batch_size"] for r in rows], [r["methods"][method]["speedup"] for r in rows], marker="o",
                    label=f"{method}, {prompt_set} prompts")
    controls = [r["control"]["speedup"] for r in report["results"] if "control" in r]
    if controls:  # the spread of an identical engine without speculation: the run's noise
        ax.axhspan(min(controls), max(controls), color="gray", alpha=0.2, label="engine without speculation (noise)")
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(report["batch_sizes"], [str(b) for b in report["batch_sizes"]])
    ax.set_xlabel("batch size (requests in flight)")
    ax.set_ylabel("output tok/s speedup over no speculation")
    ax.set_title(f"Speculative decoding, {os.path.basename(report['model'])}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def run(make_llm: LLMFactory, args: SpecBenchArgs) -> dict:
    from foreseer.spec import PROPOSERS

    methods = list(PROPOSERS) if args.methods is None else list(args.methods)
    unknown = [m for m in methods if m not in PROPOSERS]
    if unknown or not methods:
        raise ValueError(f"methods must be among {', '.join(sorted(PROPOSERS))}, got {methods}")
    if (not args.batch_sizes or min(args.batch_sizes) < 1 or args.num_prompts < 1 or args.batch_1_prompts < 1
            or args.repeats < 1):
        raise ValueError("batch sizes, --num-prompts, --batch-1-prompts and --repeats must be >= 1")
    baseline_llm = make_llm(None)
    controls = {CONTROL: make_llm(None)} if args.control else {}
    llms: dict[str, LLM] = {}
    skipped: dict[str, str] = {}
    for method in methods:
        try:
            llms[method] = make_llm({**args.spec_options, "method": method,
                                     "num_speculative_tokens": args.num_speculative_tokens})
        except ValueError as error:
            # "All methods" means those this model can run (Medusa needs trained heads); a named one must run.
            if args.methods is not None:
                raise
            skipped[method] = str(error)
            print(f"skipping {method}: {error}")
    if not llms:
        raise ValueError(f"no speculative method can run on this model: {skipped}")
    prompt_sets = build_prompt_sets(baseline_llm.tokenizer, args)
    # The C++ kernels compile and the allocator settles on first use; grounded prompts draft, so verification
    # steps warm up too.
    warmup = SamplingParams(temperature=0, max_tokens=WARMUP_TOKENS)
    for llm in [baseline_llm, *controls.values(), *llms.values()]:
        llm.generate(prompt_sets["grounded"][:WARMUP_PROMPTS], warmup, use_tqdm=False)

    report = {
        "model": baseline_llm.engine.config.model, "methods": list(llms), "skipped_methods": skipped,
        "num_speculative_tokens": args.num_speculative_tokens, "spec_options": args.spec_options,
        "batch_sizes": sorted(args.batch_sizes), "num_prompts": args.num_prompts,
        "batch_1_prompts": args.batch_1_prompts, "max_tokens": args.max_tokens,
        "max_prompt_tokens": args.max_prompt_tokens, "repeats": args.repeats, "control": args.control,
        "prompt_sets": list(prompt_sets),
        "mean_prompt_tokens": {name: sum(map(len, p)) / len(p) for name, p in prompt_sets.items()},
        "threads": torch.get_num_threads(), "attention_backend": baseline_llm.engine.runner.backend.name,
        "results": [],
    }
    print(_header())
    for name, all_prompts in prompt_sets.items():
        for batch_size in report["batch_sizes"]:
            prompts = all_prompts[:args.batch_1_prompts] if batch_size == 1 else all_prompts
            before = {m: copy.deepcopy(llm.engine.spec_stats) for m, llm in llms.items()}
            runs = run_interleaved({BASELINE: baseline_llm, **controls, **llms}, prompts, batch_size,
                                   args.max_tokens, args.repeats)
            baseline, baseline_tokens = runs[BASELINE]
            row = {"prompt_set": name, "batch_size": batch_size, "num_prompts": len(prompts),
                   "baseline": baseline.as_dict(), "methods": {}}
            if controls:
                control, control_tokens = runs[CONTROL]
                row["control"] = {**control.as_dict(), "speedup": control.output_tokens_per_s
                                  / baseline.output_tokens_per_s,
                                  "identical_outputs": sum(a == b for a, b in zip(control_tokens, baseline_tokens))}
                print(_row([name, batch_size, CONTROL, len(prompts), baseline.output_tokens_per_s,
                            control.output_tokens_per_s, row["control"]["speedup"], None, None,
                            f"{row['control']['identical_outputs']}/{len(prompts)}", ""]), flush=True)
            for method, llm in llms.items():
                # The engine's totals also hold earlier runs.
                figures = _difference(llm.engine.spec_stats, before[method])
                row["methods"][method] = method_report(*runs[method], figures, baseline, baseline_tokens)
                print(_table_row(row, method), flush=True)
            report["results"].append(row)
    write_json(report, args.output_json)
    if args.plot:
        plot_speedups(report, args.plot)
    return report
