"""What the training commands share: turning parsed options into their arguments dataclass, and recording the
command line that ran them."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from typing import TypeVar

T = TypeVar("T")


def typed_command(module_name: str, module_file: str) -> str:
    """The command as typed: `foreseer ...` through the CLI, or `python -m <module_name> ...`."""
    program = sys.argv[0]
    if os.path.abspath(program) == os.path.abspath(module_file):
        head = ["python", "-m", module_name]
    else:
        head = [os.path.basename(program)]
    return shlex.join(head + sys.argv[1:])


def args_dataclass(cls: type[T], args: argparse.Namespace, module_name: str, module_file: str) -> T:
    """`cls` from the parsed options that are its fields, with `command` set to the command line ("command" in
    the options is the CLI's sub-command name, not this)."""
    fields = {f.name for f in dataclasses.fields(cls)} - {"command"}
    options = {k: v for k, v in vars(args).items() if k in fields}
    return cls(**options, command=typed_command(module_name, module_file))
