"""foreseer bench serve: online serving against an OpenAI-compatible server (foreseer/bench/serve.py), or one
server per scheduling policy (foreseer/bench/serve_policies.py)."""

from __future__ import annotations

import argparse

from foreseer.bench import serve_policies
from foreseer.bench.serve import ServeBenchArgs, run
from foreseer.commands import add_dataclass_arguments, from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, ServeBenchArgs, exclude={"timeout_s"})
    policies = parser.add_argument_group("scheduling policies: start one `foreseer serve` per policy")
    # No policies: one server, already running, is benched at --request-rate.
    add_dataclass_arguments(policies, serve_policies.PolicyBenchArgs,
                            exclude={"serve", "startup_timeout_s", "output_json"},
                            defaults={"policies": None, "request_rates": None})


def main(args: argparse.Namespace) -> int:
    serve_args = from_args(ServeBenchArgs, args)
    if args.policies:
        report = serve_policies.run(from_args(serve_policies.PolicyBenchArgs, args, serve=serve_args,
                                              request_rates=args.request_rates or [args.request_rate]))
        return 0 if all(r["completed"] for r in report["results"]) else 1
    return 0 if run(serve_args)["completed"] else 1
