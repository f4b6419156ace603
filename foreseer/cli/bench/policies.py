"""foreseer bench policies: scheduling policies on a burst of requests (foreseer/bench/policies.py)."""

from __future__ import annotations

import argparse

from foreseer.bench.data import DEFAULT_DATASET
from foreseer.bench.policies import PolicyBurstArgs, run
from foreseer.commands import add_dataclass_arguments, add_engine_arguments, from_args, make_llm


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, PolicyBurstArgs, defaults={"dataset": DEFAULT_DATASET})
    add_engine_arguments(parser)


def main(args: argparse.Namespace) -> int:
    run(make_llm(args, length_predictor=args.length_predictor or "remaining"), from_args(PolicyBurstArgs, args))
    return 0
