"""foreseer bench seqsched: the sequence scheduling ablation (foreseer/bench/seqsched.py)."""

from __future__ import annotations

import argparse

from foreseer.bench.data import DEFAULT_DATASET
from foreseer.bench.seqsched import ROWS, SeqschedBenchArgs, run
from foreseer.commands import add_dataclass_arguments, add_engine_arguments, from_args, make_llm


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, SeqschedBenchArgs, defaults={"dataset": DEFAULT_DATASET}, choices={"rows": ROWS})
    add_engine_arguments(parser)


def main(args: argparse.Namespace) -> int:
    run(lambda policy: make_llm(args, policy=policy), from_args(SeqschedBenchArgs, args))
    return 0
