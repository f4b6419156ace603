"""Command line: foreseer generate | chat | run-batch | serve |
bench throughput|decode|spec|seqsched|lora|serve|policies | spec train-medusa|search-layers |
lengths build|traces|train|compare|eval | lora train.

Each command is a module with `add_arguments(parser)` and `main(args) -> int`, named in COMMANDS and imported only
when its command runs (or when the whole parser is built)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import foreseer
from foreseer.cli.serve import lora_module

__all__ = ["COMMANDS", "Command", "Group", "build_parser", "lora_module", "main"]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    module: str  # has add_arguments(parser) and main(args) -> int


@dataclass(frozen=True)
class Group:
    name: str
    help: str
    commands: tuple[Command, ...]


COMMANDS: tuple[Command | Group, ...] = (
    Command("generate", "generate answers to prompts", "foreseer.cli.generate"),
    Command("chat", "interactive chat, streaming tokens", "foreseer.cli.chat"),
    Command("run-batch", "OpenAI Batch API requests from a JSONL file, run together offline (as vllm run-batch)",
            "foreseer.cli.run_batch"),
    Group("bench", "benchmarks", (
        Command("throughput", "offline throughput on ShareGPT prompts", "foreseer.cli.bench.throughput"),
        Command("decode", "batch-1 CPU decode against llama.cpp (same GGUF, same threads), split-KV attention, "
                          "machine limits, memory", "foreseer.cli.bench.decode"),
        Command("spec", "speculative decoding against none, by batch size, on two prompt sets",
                "foreseer.cli.bench.spec"),
        Command("seqsched", "sequence scheduling ablation: static, binned, FCR, VBS, oracle",
                "foreseer.cli.bench.seqsched"),
        Command("lora", "multi-LoRA throughput over N adapters, against the base model and merging adapters one "
                        "at a time", "foreseer.cli.bench.lora"),
        Command("serve", "online serving benchmark against an OpenAI-compatible server", "foreseer.cli.bench.serve"),
        Command("policies", "scheduling policies (fcfs, sjf, its oracle, mlfq, s3) on a burst of requests: "
                            "latency mean, p50, p99, longest wait", "foreseer.cli.bench.policies"),
        Command("reliability", "fuzzing from the OpenAPI schema, overload, disconnects, a soak and injected "
                "faults: the figures", "foreseer.cli.bench.reliability"),
    )),
    Command("serve", "OpenAI-compatible HTTP server", "foreseer.cli.serve"),
    Group("spec", "speculative decoding tools", (
        Command("train-medusa", "train Medusa heads on the model's own answers", "foreseer.training.train_medusa"),
        Command("search-layers", "choose the layers layer_skip skips, by measured tok/s",
                "foreseer.training.search_layers"),
    )),
    Command("lengths", "response-length prediction: dataset, training, evaluation", "foreseer.training.lengths.cli"),
    Group("lora", "LoRA adapter tools", (
        Command("train", "train the small behaviour adapters (uppercase, json, one_sentence) on the model's own "
                         "answers", "foreseer.training.lora_adapters"),
    )),
)


def _add_commands(parser: argparse.ArgumentParser, dest: str, entries: Sequence[Command | Group],
                  argv: Sequence[str] | None) -> None:
    """A sub-command per entry. With `argv` (what follows this parser's name), only the command it names gets
    its arguments (and its module imported); the others are there for their name and help."""
    subparsers = parser.add_subparsers(dest=dest, required=True, help="the command")
    for entry in entries:
        sub = subparsers.add_parser(entry.name, help=entry.help)
        if argv is not None and argv[:1] != [entry.name]:
            continue
        if isinstance(entry, Group):
            _add_commands(sub, entry.name, entry.commands, None if argv is None else argv[1:])
        else:
            module = importlib.import_module(entry.module)
            module.add_arguments(sub)
            sub.set_defaults(func=module.main)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `foreseer` parser: every command's arguments, or given a command line, only those of its command."""
    parser = argparse.ArgumentParser(prog="foreseer", description="Foreseer LLM inference engine")
    parser.add_argument("--version", action="version", version=f"%(prog)s {foreseer.__version__}")
    _add_commands(parser, "command", COMMANDS, None if argv is None else list(argv))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return args.func(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
