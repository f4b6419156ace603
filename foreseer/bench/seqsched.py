"""The ablation of sequence scheduling (Zheng et al., 2023) on ShareGPT prompts the length probe never saw.

Rows, each on the same prompts and the same engine with a cold prefix cache: the engine's continuous batching
(first: its greedy answers give the true lengths), vanilla static batching (fixed batches in arrival order),
sorting and binning by predicted length, + FCR, + VBS, all together, all together with the true lengths (the
oracle), and continuous batching with length-aware ordering (shortest predicted first). Figures: samples/s,
output tokens/s, average padded length, share of useful tokens, share of queries recomputed, each row's
speedup over vanilla static batching, and whether its answers equal continuous batching's.

With `padded`, static batches (every row but the continuous ones) decode as Hugging Face generate does, the
paper's setting: each member keeps decoding until the batch's last member ends. Without, a finished member
leaves its batch at once (its seat stays empty until the batch ends).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from foreseer.bench.data import chat_prompt_ids, load_sharegpt_questions, sharegpt_answer_budgets
from foreseer.bench.report import write_json
from foreseer.lengths.batching import BatchingStrategy, ContinuousBatching, SequenceScheduling, StaticBatching
from foreseer.lengths.predictors import KnownLengthPredictor, create_predictor
from foreseer.llm import LLM
from foreseer.sampling_params import SamplingParams

ROWS = ("continuous", "static", "sort_bin", "sort_bin_fcr", "sort_bin_vbs", "seqsched", "seqsched_oracle",
        "continuous_sjf")
DESCRIPTIONS = {
    "continuous": "continuous batching (fcfs)",
    "static": "vanilla static batching",
    "sort_bin": "+ sorting and binning",
    "sort_bin_fcr": "+ sorting, binning, FCR",
    "sort_bin_vbs": "+ sorting, binning, VBS",
    "seqsched": "sequence scheduling (all)",
    "seqsched_oracle": "all, true lengths (oracle)",
    "continuous_sjf": "continuous, shortest predicted first",
}


@dataclass
class SeqschedBenchArgs:
    dataset: str  # ShareGPT-format JSON file of the prompts
    num_prompts: int = 512  # prompts taken after the skipped ones
    skip_prompts: int = 0  # start at this prompt (the shipped probe was trained on prompts 2000-2315)
    max_prompt_tokens: int = 512  # longer questions are shortened to fit
    max_tokens: int = 512  # new tokens per prompt at most
    # Each prompt's max_tokens is its ShareGPT answer's length, at most max_tokens (the serving workload)
    max_tokens_from_answers: bool = False
    group_size: int = 256  # queries predicted and sorted together
    bin_width: int = 50  # tokens of predicted length per bin
    predictor: str = "remaining"  # length predictor (remaining, probe, pia, constant)
    # The predictor's options (default: SequenceScheduling's, for the heads {"quantile": 0.9})
    predictor_options: dict | None = None
    rows: list[str] = field(default_factory=lambda: list(ROWS))  # schedules to run (continuous always runs first)
    padded: bool = False  # static batches decode padding until their last member ends, as in the paper
    output_json: str | None = None  # write the report to this JSON file


def run(make_llm: Callable[[str], LLM], args: SeqschedBenchArgs) -> dict:
    """make_llm(scheduling_policy) -> an engine; the sjf row needs its own, every other row shares one."""
    unknown = set(args.rows) - set(ROWS)
    if unknown:
        raise ValueError(f"unknown rows {sorted(unknown)}; available: {', '.join(ROWS)}")
    llm = make_llm("fcfs")
    if args.max_tokens_from_answers:
        budgets = sharegpt_answer_budgets(llm.tokenizer, args.dataset, args.num_prompts, args.skip_prompts,
                                          args.max_tokens)
        questions, limits = [q for _, q, _ in budgets], [limit for _, _, limit in budgets]
    else:
        questions = load_sharegpt_questions(args.dataset, args.num_prompts, args.skip_prompts)
        limits = [args.max_tokens] * len(questions)
    prompts = [chat_prompt_ids(llm.tokenizer, q, args.max_prompt_tokens) for q in questions]
    params = [SamplingParams(temperature=0, max_tokens=limit) for limit in limits]
    options = args.predictor_options
    if options is None:
        options = SequenceScheduling.DEFAULT_PREDICTOR_OPTIONS.get(args.predictor, {})
    predictor = create_predictor(args.predictor, llm, **options)

    def strategy_for(name: str, reference: list[list[int]] | None) -> BatchingStrategy:
        if name in ("continuous", "continuous_sjf"):
            return ContinuousBatching()
        if name == "static":
            return StaticBatching(padded=args.padded)
        lengths = predictor
        if name == "seqsched_oracle":
            lengths = KnownLengthPredictor({tuple(p): max(len(t), 1) for p, t in zip(prompts, reference)})
        fcr = name in ("sort_bin_fcr", "seqsched", "seqsched_oracle")
        vbs = name in ("sort_bin_vbs", "seqsched", "seqsched_oracle")
        return SequenceScheduling(lengths, args.group_size, args.bin_width, fcr=fcr, vbs=vbs, padded=args.padded)

    report = {"model": llm.engine.config.model, "num_prompts": len(prompts), "skip_prompts": args.skip_prompts,
              "max_tokens": args.max_tokens, "max_tokens_from_answers": args.max_tokens_from_answers,
              "mean_max_tokens": sum(limits) / len(limits), "group_size": args.group_size, "bin_width": args.bin_width,
              "predictor": args.predictor, "predictor_options": options, "padded": args.padded,
              "threads": torch.get_num_threads(),
              "kv_cache_tokens": llm.engine.block_manager.num_blocks * llm.engine.block_manager.block_size,
              "max_num_seqs": llm.engine.config.scheduler.max_num_seqs,
              "mean_prompt_tokens": sum(map(len, prompts)) / len(prompts), "rows": {}}
    # Continuous batching runs first: its answers are the reference, their lengths the oracle's.
    rows = ["continuous"] + [r for r in args.rows if r != "continuous"]
    reference: list[list[int]] | None = None
    for name in rows:
        runner = make_llm("sjf") if name == "continuous_sjf" else llm
        strategy = strategy_for(name, reference)
        runner.reset_prefix_cache()
        start = time.perf_counter()
        outputs = runner.generate(prompts, params, batching=strategy)
        elapsed = time.perf_counter() - start
        tokens = [o.outputs[0].token_ids for o in outputs]
        reference = reference or tokens
        stats = strategy.stats
        row = {"description": DESCRIPTIONS[name], "elapsed_s": elapsed, "samples_per_s": len(prompts) / elapsed,
               "output_tokens_per_s": stats.useful_tokens / elapsed,
               "identical_to_continuous": sum(a == b for a, b in zip(tokens, reference)), **stats.as_dict()}
        report["rows"][name] = row
        print(_format_row(name, row, report["rows"].get("static")), flush=True)
        if name == "continuous":
            lengths = [len(t) for t in reference]
            report["answer_lengths"] = {"mean": sum(lengths) / len(lengths),
                                        "share_at_limit": sum(n >= limit for n, limit in zip(lengths, limits))
                                        / len(lengths)}
        base, oracle = report["rows"].get("static"), report["rows"].get("seqsched_oracle")
        for done in report["rows"].values():
            done["speedup_vs_static"] = done["samples_per_s"] / base["samples_per_s"] if base else None
            # The share of the oracle's gain over static batching that this row reaches.
            gain = oracle["samples_per_s"] - base["samples_per_s"] if base and oracle else None
            done["share_of_oracle_gain"] = (done["samples_per_s"] - base["samples_per_s"]) / gain if gain else None
        write_json(report, args.output_json)  # after every row: a long run's finished rows survive an interruption
    print(format_table(report))
    return report


def _format_row(name: str, row: dict, base: dict | None) -> str:
    speedup = f"{row['samples_per_s'] / base['samples_per_s']:.2f}x" if base else "-"
    share = row.get("share_of_oracle_gain")
    return (f"{DESCRIPTIONS[name]:<38}{row['samples_per_s']:>9.3f}{row['output_tokens_per_s']:>9.1f}"
            f"{row['average_padded_length']:>9.1f}{100 * row['useful_share']:>8.1f}%"
            f"{100 * row['recomputed_share']:>8.1f}%{speedup:>10}{row['identical_to_continuous']:>7}"
            f"{'-' if share is None else f'{100 * share:.0f}%':>8}")


def format_table(report: dict) -> str:
    header = (f"{'schedule':<38}{'req/s':>9}{'tok/s':>9}{'padded':>9}{'useful':>9}{'recomp':>9}"
              f"{'vs static':>10}{'same':>7}{'oracle':>8}")
    base = report["rows"].get("static")
    lines = [f"{'padded' if report['padded'] else 'unpadded'} static batches, "
             f"{report['num_prompts']} prompts, up to {report['max_tokens']} new tokens"
             f"{' (ShareGPT answer lengths)' if report['max_tokens_from_answers'] else ''}, groups of "
             f"{report['group_size']}, bins of {report['bin_width']} tokens, predictor {report['predictor']}, "
             f"KV cache {report['kv_cache_tokens']} tokens", header]
    lines += [_format_row(name, row, base) for name, row in report["rows"].items()]
    return "\n".join(lines)
