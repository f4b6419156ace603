"""foreseer bench reliability: fuzzing, overload, disconnects, a soak and injected faults, with figures
(foreseer/bench/reliability.py)."""

from __future__ import annotations

import argparse

from foreseer.bench.reliability import ReliabilityArgs, run, shortfalls
from foreseer.commands import add_dataclass_arguments, from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, ReliabilityArgs)


def main(args: argparse.Namespace) -> int:
    missed = shortfalls(run(from_args(ReliabilityArgs, args)))
    for line in missed:
        print(f"MISSED: {line}")
    return 1 if missed else 0
