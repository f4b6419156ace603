"""foreseer bench spec: speculative decoding against none, by batch size (foreseer/bench/spec.py)."""

from __future__ import annotations

import argparse

from foreseer.bench.data import DEFAULT_DATASET
from foreseer.bench.spec import SpecBenchArgs, run
from foreseer.commands import add_dataclass_arguments, add_engine_arguments, from_args, make_llm


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, SpecBenchArgs, exclude={"spec_options"}, defaults={"dataset": DEFAULT_DATASET})
    add_engine_arguments(parser)


def main(args: argparse.Namespace) -> int:
    # --speculative-config gives further options (e.g. prompt_lookup_max) to every method's engine.
    options = {k: v for k, v in (args.speculative_config or {}).items()
               if k not in ("method", "num_speculative_tokens")}
    run(lambda spec: make_llm(args, speculative_config=spec), from_args(SpecBenchArgs, args, spec_options=options))
    return 0
