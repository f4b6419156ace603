"""The most that shortest-job-first can gain over fcfs on this workload: a queue simulation, not a measurement.

Requests arrive as `foreseer bench serve` sends them (Poisson, the ShareGPT prompts in order, each answer as long as
its dataset answer, capped at max_tokens) at a server with `seats` seats whose decode step takes
step_base_ms + step_row_ms per running request (a rough fit to this CPU; the ratios barely move with it: 80 + 2 ms
gives the default's ratios within 0.02). Two schedules: fcfs (a request keeps its seat until it finishes) and sjf
with perfect knowledge of every answer's length (preemptive shortest remaining first, the best order for mean
latency), i.e. a predictor that is never wrong. Prefill and serving overheads are left out for both (the measured
fcfs latencies run about 25% above the simulated ones). Prints mean and p99 end-to-end latency of each, and their
ratios.

    python scripts/sjf_bound.py --num-prompts 32 128 256 --request-rates 0.4 1.6 --max-tokens 512 1024
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
from dataclasses import dataclass

from foreseer.bench.data import DEFAULT_DATASET
from foreseer.bench.serve import ServeBenchArgs, request_lengths


@dataclass
class Result:
    mean_s: float
    p99_s: float


def simulate(lengths: list[int], arrivals: list[float], seats: int, oracle_sjf: bool, step_base_s: float,
             step_row_s: float) -> Result:
    remaining = list(lengths)
    finished: list[float | None] = [None] * len(lengths)
    running: list[int] = []
    now = 0.0
    while any(t is None for t in finished):
        present = [i for i, t in enumerate(finished) if t is None and arrivals[i] <= now]
        if not present:
            now = min(arrivals[i] for i, t in enumerate(finished) if t is None)
            continue
        if oracle_sjf:
            running = sorted(present, key=lambda i: (remaining[i], arrivals[i]))[:seats]
        else:
            running = [i for i in running if finished[i] is None]
            running += [i for i in present if i not in running][:seats - len(running)]
        now += step_base_s + step_row_s * len(running)
        for i in running:
            remaining[i] -= 1
            if remaining[i] == 0:
                finished[i] = now
    latencies = sorted(t - a for t, a in zip(finished, arrivals))
    return Result(statistics.mean(latencies), latencies[round(0.99 * (len(latencies) - 1))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default=DEFAULT_DATASET)
    parser.add_argument("--tokenizer", default="smollm2-135m-instruct")
    parser.add_argument("--num-prompts", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--request-rates", type=float, nargs="+", default=[0.4, 0.8, 1.6])
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--seats", type=int, nargs="+", default=[8])
    parser.add_argument("--seeds", type=int, default=3, help="arrival traces per cell, averaged")
    parser.add_argument("--step-base-ms", type=float, default=54.0)
    parser.add_argument("--step-row-ms", type=float, default=4.5)
    parser.add_argument("--output-json")
    args = parser.parse_args()

    # The answer lengths `foreseer bench serve --output-len-from-dataset` asks for, at the largest cap.
    _, answer_tokens = request_lengths(ServeBenchArgs(
        dataset=args.dataset, num_prompts=max(args.num_prompts), max_tokens=max(args.max_tokens),
        output_len_from_dataset=True, tokenizer=args.tokenizer))
    rows = []
    for n in args.num_prompts:
        for cap in args.max_tokens:
            lengths = [min(cap, t) for t in answer_tokens[:n]]
            for seats in args.seats:
                for rate in args.request_rates:
                    cells = []
                    for seed in range(args.seeds):
                        rng = random.Random(seed)
                        # As bench serve draws them: a gap before every request but the first.
                        arrivals = list(itertools.accumulate([0.0] + [rng.expovariate(rate) for _ in range(n - 1)]))
                        cells.append([simulate(lengths, arrivals, seats, oracle, args.step_base_ms / 1000,
                                               args.step_row_ms / 1000) for oracle in (False, True)])
                    fcfs, sjf = (Result(statistics.mean(c[k].mean_s for c in cells),
                                        statistics.mean(c[k].p99_s for c in cells)) for k in (0, 1))
                    row = {"num_prompts": n, "max_tokens": cap, "seats": seats, "request_rate": rate,
                           "fcfs_mean_s": fcfs.mean_s, "fcfs_p99_s": fcfs.p99_s, "sjf_mean_s": sjf.mean_s,
                           "sjf_p99_s": sjf.p99_s, "mean_ratio": fcfs.mean_s / sjf.mean_s,
                           "p99_ratio": sjf.p99_s / fcfs.p99_s}
                    rows.append(row)
                    print(f"{n:>4} prompts  max_tokens {cap:>4}  {seats:>2} seats  rate {rate:>4}:  fcfs mean/p99 "
                          f"{fcfs.mean_s:6.1f}/{fcfs.p99_s:6.1f} s  oracle sjf {sjf.mean_s:6.1f}/{sjf.p99_s:6.1f} s  "
                          f"mean {row['mean_ratio']:.2f}x lower, p99 {row['p99_ratio']:.2f}x fcfs's", flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
