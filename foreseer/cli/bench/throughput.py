"""foreseer bench throughput: offline throughput on ShareGPT prompts (foreseer/bench/throughput.py)."""

from __future__ import annotations

import argparse

from foreseer.bench.data import DEFAULT_DATASET
from foreseer.bench.throughput import ThroughputArgs, run
from foreseer.commands import add_dataclass_arguments, add_engine_arguments, from_args, make_llm


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, ThroughputArgs, defaults={"dataset": DEFAULT_DATASET},
                            choices={"compare": ("hf", "llamacpp", "float32"),
                                     "batching": ("continuous", "static", "seqsched")})
    add_engine_arguments(parser)


def main(args: argparse.Namespace) -> int:
    run(make_llm(args), from_args(ThroughputArgs, args))
    return 0
