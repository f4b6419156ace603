"""Scheduling policies under load: one `foreseer serve` per policy, the serving benchmark at each request rate.

Every server gets the same engine arguments (make them queue requests: few seats with --max-num-seqs, a small KV
cache) and the same prompts and arrival times, so the policies differ only in the order they serve. Per policy
and rate: mean, p50 and p99 end-to-end latency and time to first token, throughput, and the longest time any
request waited for its first token (the starvation check). A PNG plots latency against request rate.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from dataclasses import dataclass, field

import httpx

from foreseer.bench.report import write_json
from foreseer.bench.serve import ServeBenchArgs
from foreseer.bench.serve import run as run_serve_bench
from foreseer.bench.server_process import serve


@dataclass
class PolicyBenchArgs:
    # Bench a server started with each of these --scheduling-policy values
    policies: list[str] = field(default_factory=lambda: ["fcfs", "sjf", "mlfq", "s3"])
    # Request rates to bench each policy at (the CLI's default: --request-rate)
    request_rates: list[float] = field(default_factory=lambda: [0.5, 1.0])
    server_args: str = ""  # engine arguments for every `foreseer serve`, e.g. "--max-num-seqs 8"
    serve: ServeBenchArgs = field(default_factory=ServeBenchArgs)  # prompts, max_tokens, seed; base_url unused
    startup_timeout_s: float = 600.0
    output_json: str | None = None
    plot: str | None = None  # PNG of latency against request rate per policy


def _warm_up(base_url: str, timeout_s: float) -> None:
    """One short request before the timed ones, so that no policy's first rate pays the server's first-call costs."""
    model = httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8}
    httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=timeout_s).raise_for_status()


def _bench_policy(policy: str, args: PolicyBenchArgs) -> list[dict]:
    with serve(["--scheduling-policy", policy, *shlex.split(args.server_args)], args.startup_timeout_s,
               f"policy {policy}") as server:
        _warm_up(server.base_url, args.startup_timeout_s)
        results = []
        for rate in args.request_rates:
            bench = dataclasses.replace(args.serve, base_url=server.base_url, request_rate=rate, output_json=None)
            report = run_serve_bench(bench)
            report.pop("requests")
            results.append({"policy": policy, "request_rate": rate, **report})
        return results


def run(args: PolicyBenchArgs) -> dict:
    results = [row for policy in args.policies for row in _bench_policy(policy, args)]
    report = {"policies": args.policies, "request_rates": args.request_rates, "server_args": args.server_args,
              "num_prompts": args.serve.num_prompts, "max_tokens": args.serve.max_tokens,
              "output_len_from_dataset": args.serve.output_len_from_dataset, "results": results}
    print(format_table(report))
    write_json(report, args.output_json)
    if args.plot:
        plot_latency(report, args.plot)
    return report


def format_table(report: dict) -> str:
    lengths = " (each its dataset answer's length)" if report.get("output_len_from_dataset") else ""
    lines = [f"{report['num_prompts']} prompts, up to {report['max_tokens']} new tokens{lengths}, server: "
             f"{report['server_args'] or '(defaults)'}",
             f"{'policy':<8}{'rate':>6}{'e2e mean':>10}{'p50':>9}{'p99':>9}{'ttft mean':>11}{'p50':>9}{'p99':>9}"
             f"{'max wait':>10}{'req/s':>8}{'tok/s':>8}   (seconds)"]
    for row in report["results"]:
        e2e, ttft = row["e2e_latency_ms"], row["ttft_ms"]
        values = [e2e["mean"], e2e["p50"], e2e["p99"], ttft["mean"], ttft["p50"], ttft["p99"], ttft["max"]]
        cells = "".join(f"{v / 1000:>{w}.2f}" if v is not None else f"{'-':>{w}}"
                        for v, w in zip(values, (10, 9, 9, 11, 9, 9, 10)))
        lines.append(f"{row['policy']:<8}{row['request_rate']:>6}{cells}{row['request_throughput']:>8.3f}"
                     f"{row['output_throughput']:>8.1f}")
    return "\n".join(lines)


def plot_latency(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = (("e2e_latency_ms", "mean", "mean end-to-end latency (s)"),
              ("e2e_latency_ms", "p99", "p99 end-to-end latency (s)"),
              ("ttft_ms", "max", "longest wait for the first token (s)"))
    for ax, (metric, stat, label) in zip(axes, panels):
        for policy in report["policies"]:
            # An unlimited rate ("inf") has no place on the axis.
            rows = [r for r in report["results"] if r["policy"] == policy and r["request_rate"] != "inf"]
            ax.plot([r["request_rate"] for r in rows], [(r[metric][stat] or 0) / 1000 for r in rows], marker="o",
                    label=policy)
        ax.set_xlabel("request rate (requests/s)")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"Scheduling policies under load ({report['server_args'] or 'default server'})")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
