"""foreseer bench decode: batch-1 CPU decode against llama.cpp (foreseer/bench/decode.py)."""

from __future__ import annotations

import argparse

import torch

from foreseer.bench.decode import DecodeBenchArgs, run
from foreseer.commands import add_dataclass_arguments, from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, DecodeBenchArgs)
    parser.add_argument("--threads", type=int, default=None, help="threads for both engines (default: torch's)")


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    run(from_args(DecodeBenchArgs, args))
    return 0
