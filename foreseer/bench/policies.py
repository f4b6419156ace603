"""Scheduling policies on a burst: every request arrives at once, and each policy decides who waits.

One engine (one loaded model), a new scheduler per policy and seat count (max_num_seqs), the same prompts:
ShareGPT questions, each with max_tokens = the length of its ShareGPT answer (at most a cap), greedy. The first
policy at each seat count (fcfs by default) gives the reference answers (every policy must give the same ones),
whose lengths feed `sjf-oracle`: sjf with each request's true length given as a length hint. In a burst, aging
(`max_wait_s`) should be longer than the run, else every request waiting that long is promoted and sjf turns into
fcfs. Per row:
mean, p50 and p99 latency (arrival to last token), mean time to first token and the longest wait for it,
throughput, preemptions, and the length predictor's share of the run's time. Each length-aware row also
reports its share of the oracle's gain: (fcfs - row) / (fcfs - oracle) of the mean latency.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from foreseer.bench.data import chat_prompt_ids, sharegpt_answer_budgets
from foreseer.bench.report import write_json
from foreseer.lengths.hook import RemainingLengthHook
from foreseer.llm import LLM
from foreseer.outputs import RequestOutput
from foreseer.registry import SCHEDULING_POLICIES
from foreseer.sampling_params import SamplingParams

ORACLE = "sjf-oracle"


@dataclass
class PolicyBurstArgs:
    dataset: str  # ShareGPT-format JSON file of the prompts
    num_prompts: int = 256  # conversations taken after the skipped ones (exact repeats dropped)
    skip_prompts: int = 0  # start at this conversation (the length heads learnt from 2000 on)
    max_prompt_tokens: int = 512  # longer questions are shortened to fit
    max_tokens_cap: int = 1024  # each request's max_tokens: its ShareGPT answer's length, at most this
    # Policies to run; sjf-oracle is sjf with each true length (from fcfs's answers) as a length hint
    policies: list[str] = field(default_factory=lambda: ["fcfs", "sjf", ORACLE, "mlfq", "s3"])
    seats: list[int] = field(default_factory=lambda: [8, 32])  # max_num_seqs of each run
    output_json: str | None = None  # write the report to this JSON file


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(share * len(ordered)), len(ordered) - 1)]


def latency_figures(outputs: list[RequestOutput]) -> dict:
    latencies = [o.metrics.finished_time - o.metrics.arrival_time for o in outputs]
    waits = [o.metrics.first_token_time - o.metrics.arrival_time for o in outputs]
    return {"mean_latency_s": statistics.fmean(latencies), "p50_latency_s": percentile(latencies, 0.5),
            "p99_latency_s": percentile(latencies, 0.99), "mean_ttft_s": statistics.fmean(waits),
            "longest_wait_s": max(waits), "preemptions": sum(o.metrics.num_preemptions for o in outputs)}


def run(llm: LLM, args: PolicyBurstArgs) -> dict:
    """The engine needs length_predictor="remaining" (sjf and s3 read it; the others ignore it)."""
    unknown = [p for p in args.policies if p != ORACLE and p not in SCHEDULING_POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; available: {', '.join([*sorted(SCHEDULING_POLICIES), ORACLE])}")
    # The first row's answers are the reference (every policy gives the same ones) and the oracle's lengths.
    policies = list(dict.fromkeys(args.policies))
    if not policies or policies[0] == ORACLE:
        policies.insert(0, "fcfs")
    budgets = sharegpt_answer_budgets(llm.tokenizer, args.dataset, args.num_prompts, args.skip_prompts,
                                      args.max_tokens_cap)
    prompts = [chat_prompt_ids(llm.tokenizer, question, args.max_prompt_tokens) for _, question, _ in budgets]
    params = [SamplingParams(temperature=0, max_tokens=limit) for _, _, limit in budgets]
    hook = next((h for h in llm.engine.hooks if isinstance(h, RemainingLengthHook)), None)
    report = {"model": llm.engine.config.model, "num_prompts": len(prompts), "skip_prompts": args.skip_prompts,
              "max_tokens_cap": args.max_tokens_cap, "mean_max_tokens": statistics.fmean(p.max_tokens for p in params),
              "threads": torch.get_num_threads(), "length_predictor": llm.engine.config.length_predictor,
              "length_refresh_tokens": llm.engine.config.length_refresh_tokens,
              "kv_cache_tokens": llm.engine.block_manager.num_blocks * llm.engine.block_manager.block_size,
              "rows": {}}
    for seats in args.seats:
        reference: list[list[int]] = []
        for name in policies:
            llm.engine.reconfigure_scheduler(policy="sjf" if name == ORACLE else name, max_num_seqs=seats)
            hints = [max(len(tokens), 1) for tokens in reference] if name == ORACLE else None
            llm.reset_prefix_cache()
            predicting = hook.seconds if hook is not None else 0.0
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False, length_hint=hints)
            elapsed = time.perf_counter() - start
            errors = [o.error for o in outputs if o.error]
            if errors:
                raise ValueError(f"{len(errors)} requests failed under {name}, e.g. {errors[0]}")
            tokens = [o.outputs[0].token_ids for o in outputs]
            reference = reference or tokens
            row = {"policy": name, "seats": seats, "elapsed_s": elapsed,
                   "output_tokens_per_s": sum(map(len, tokens)) / elapsed, **latency_figures(outputs),
                   "same_answers": sum(a == b for a, b in zip(tokens, reference)),
                   "predictor_share": ((hook.seconds - predicting) / elapsed) if hook is not None else 0.0}
            report["rows"][f"{name}@{seats}"] = row
            print(format_row(row), flush=True)
            write_json(report, args.output_json)  # after every row: a long run's finished rows survive
        _oracle_shares(report["rows"], seats)
    write_json(report, args.output_json)
    print(format_table(report))
    return report


def _oracle_shares(rows: dict, seats: int) -> None:
    """Each row's share of the oracle's mean-latency reduction over fcfs, and its p99 against fcfs's."""
    fcfs, oracle = rows.get(f"fcfs@{seats}"), rows.get(f"{ORACLE}@{seats}")
    if fcfs is None:
        return
    for row in rows.values():
        if row["seats"] != seats:
            continue
        row["p99_vs_fcfs"] = row["p99_latency_s"] / fcfs["p99_latency_s"]
        row["mean_latency_gain_vs_fcfs"] = fcfs["mean_latency_s"] / row["mean_latency_s"]
        gain = None if oracle is None else fcfs["mean_latency_s"] - oracle["mean_latency_s"]
        row["share_of_oracle_gain"] = (fcfs["mean_latency_s"] - row["mean_latency_s"]) / gain if gain else None


def format_row(row: dict) -> str:
    share = row.get("share_of_oracle_gain")
    return (f"{row['policy']:<12}{row['seats']:>6}{row['mean_latency_s']:>9.1f}{row['p50_latency_s']:>9.1f}"
            f"{row['p99_latency_s']:>9.1f}{row['mean_ttft_s']:>9.1f}{row['longest_wait_s']:>9.1f}"
            f"{row['output_tokens_per_s']:>9.1f}{row['preemptions']:>7}{row['same_answers']:>6}"
            f"{'' if share is None else f'{100 * share:.0f}%':>8}")


def format_table(report: dict) -> str:
    header = (f"{'policy':<12}{'seats':>6}{'mean s':>9}{'p50 s':>9}{'p99 s':>9}{'ttft s':>9}{'wait s':>9}"
              f"{'tok/s':>9}{'preempt':>7}{'same':>6}{'oracle':>8}")
    lines = [f"burst of {report['num_prompts']} prompts, max_tokens = ShareGPT answer length (mean "
             f"{report['mean_max_tokens']:.0f}, cap {report['max_tokens_cap']}), greedy", header]
    lines += [format_row(row) for row in report["rows"].values()]
    return "\n".join(lines)
