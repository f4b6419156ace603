"""What the commands share: flags generated from dataclass fields, the engine's flags and the LLM they configure,
arguments dataclasses from parsed options, and the command line that ran them.

A field is written once, in its dataclass: its flag is the field's name with dashes, its type and default the
field's own, its help the field's comment. This module imports nothing of foreseer above the configs (LLM only
when one is made), so that the benchmarks, the training commands and the CLI can all use it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import json
import os
import shlex
import sys
import textwrap
import tokenize
import types
import typing
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from foreseer.config import LORA_MEMORY_MODES, WEIGHT_FORMATS, EngineConfig
from foreseer.registry import ATTENTION_BACKENDS, SCHEDULING_POLICIES

if TYPE_CHECKING:
    from foreseer.llm import LLM

T = TypeVar("T")

# The values the engine's string fields accept (the configs check them).
ENGINE_CHOICES: dict[str, Sequence[str]] = {
    "dtype": ("auto", "float32", "float16", "bfloat16"),
    "weight_format": WEIGHT_FORMATS,
    "attention_backend": ("auto", *sorted(ATTENTION_BACKENDS)),
    "policy": tuple(SCHEDULING_POLICIES),
    "lora_memory": LORA_MEMORY_MODES,
}
# Engine flags named otherwise than their field: the name LLM(...) takes too (EngineConfig.from_kwargs' alias).
ENGINE_FLAG_NAMES = {"policy": "scheduling_policy"}


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in the source of `cls`: the comment lines right above the field, then the comment
    that ends its line."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
    found = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above = node.lineno - 1
        while above in comments and lines[above - 1].lstrip().startswith("#"):
            above -= 1
        parts = [comments[line] for line in range(above + 1, node.lineno)]
        if node.end_lineno in comments:
            parts.append(comments[node.end_lineno])
        if parts:
            found[node.target.id] = " ".join(parts)
    return found


def _fields(cls: type, exclude: Collection[str]) -> Iterator[tuple[type, dataclasses.Field, Any]]:
    """(declaring class, field, type) of each field of `cls` set at init, a nested dataclass's fields in its
    place (as EngineConfig.from_kwargs flattens its sections)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name in exclude:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _fields(hints[f.name], exclude)
        else:
            yield cls, f, hints[f.name]


def _type_keywords(hint: Any, default: Any) -> dict[str, Any]:
    """add_argument's keywords for a field of type `hint` (None allowed: it is only ever the default)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(rest) == 1:
            hint = rest[0]
    origin = typing.get_origin(hint) or hint
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction if default else "store_true"}
    if hint is str:
        return {}
    if hint in (int, float):
        return {"type": hint}
    if origin in (list, tuple):
        item = typing.get_args(hint)[0]
        return {"nargs": "+"} if item is str else {"type": item, "nargs": "+"}
    if origin is dict or dataclasses.is_dataclass(hint):
        return {"type": json.loads, "metavar": "JSON"}
    raise TypeError(f"no flag for a field of type {hint}")


def add_dataclass_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                            exclude: Collection[str] = (), defaults: Mapping[str, Any] | None = None,
                            choices: Mapping[str, Sequence[Any]] | None = None,
                            names: Mapping[str, str] | None = None) -> None:
    """A flag for each field of `cls`, its parsed value under the field's name. `defaults` replace the fields'
    own where a command's default differs, `choices` restrict values, `names` rename flags. A bool that is on by
    default gives `--<name>` and `--no-<name>` (vLLM's spelling), and for an `enable_<x>`, `--no-<x>` too."""
    defaults, choices, names = defaults or {}, choices or {}, names or {}
    for owner, f, hint in _fields(cls, exclude):
        if f.name in defaults:
            default = defaults[f.name]
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = f.default
        keywords = _type_keywords(hint, default)
        name = names.get(f.name, f.name)
        help_text = field_comments(owner).get(f.name)
        if default is dataclasses.MISSING:
            keywords["required"] = True
        else:
            keywords["default"] = default
        if f.name in choices:
            keywords["choices"] = choices[f.name]
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=f.name, help=help_text and help_text.replace("%", "%%"), **keywords)
        if keywords.get("action") is argparse.BooleanOptionalAction and name.startswith("enable_"):
            # The shorter spelling, as it was before vLLM's: --no-prefix-caching.
            parser.add_argument("--no-" + flag.removeprefix("--enable-"), dest=f.name, action="store_false",
                                help=f"the same as --no-{flag.removeprefix('--')}")


def from_args(cls: type[T], args: argparse.Namespace, **values: Any) -> T:
    """`cls` from the parsed options named as its fields (a tuple field gets a tuple), and from `values`."""
    hints = typing.get_type_hints(cls)
    options = {}
    for f in dataclasses.fields(cls):
        if f.init and hasattr(args, f.name):
            value = getattr(args, f.name)
            options[f.name] = tuple(value) if typing.get_origin(hints[f.name]) is tuple else value
    return cls(**{**options, **values})


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine's flags, from EngineConfig and its sections; `speculative_config` is one JSON flag."""
    add_dataclass_arguments(parser.add_argument_group("engine"), EngineConfig, choices=ENGINE_CHOICES,
                            names=ENGINE_FLAG_NAMES)


def make_llm(args: argparse.Namespace, **overrides: Any) -> LLM:
    """The LLM the engine flags configure, with `overrides` (engine field names) put in."""
    from foreseer.llm import LLM

    options = {f.name: getattr(args, f.name) for _, f, _ in _fields(EngineConfig, ())}
    return LLM(**{**options, **overrides})


def typed_command(module_name: str, module_file: str) -> str:
    """The command as typed: `foreseer ...` through the CLI, or `python -m <module_name> ...`."""
    program = sys.argv[0]
    if os.path.abspath(program) == os.path.abspath(module_file):
        head = ["python", "-m", module_name]
    else:
        head = [os.path.basename(program)]
    return shlex.join(head + sys.argv[1:])


def args_dataclass(cls: type[T], args: argparse.Namespace, module_name: str, module_file: str) -> T:
    """`cls` from the parsed options that are its fields, with `command` set to the command line (not the CLI's
    sub-command name, which the options hold under "command")."""
    return from_args(cls, args, command=typed_command(module_name, module_file))
