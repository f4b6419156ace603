"""foreseer bench lora: multi-LoRA throughput over N adapters (foreseer/bench/lora.py)."""

from __future__ import annotations

import argparse

from foreseer.bench.data import DEFAULT_DATASET
from foreseer.bench.lora import POPULARITIES, LoRABenchArgs, run
from foreseer.commands import add_dataclass_arguments, add_engine_arguments, from_args, make_llm
from foreseer.lora.adapter import SUPPORTED_MODULES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, LoRABenchArgs, defaults={"dataset": DEFAULT_DATASET},
                            choices={"popularities": POPULARITIES, "target_modules": SUPPORTED_MODULES},
                            names={"popularities": "popularity"})
    add_engine_arguments(parser)
    # Room for the random adapters' ranks, and for several adapters in a batch.
    parser.set_defaults(max_lora_rank=64, max_loras=8)


def main(args: argparse.Namespace) -> int:
    run(lambda enable_lora: make_llm(args, enable_lora=enable_lora), from_args(LoRABenchArgs, args))
    return 0
