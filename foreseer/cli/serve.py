"""foreseer serve: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse
import json
import os
import signal
from typing import TYPE_CHECKING

from foreseer.commands import add_dataclass_arguments, add_engine_arguments, from_args, make_llm
from foreseer.server.config import ServerConfig

if TYPE_CHECKING:
    from foreseer.llm import LLM


def lora_module(value: str) -> tuple[str, str]:
    """One --lora-modules entry: name=path, or vLLM's JSON form {"name": ..., "path": ...}."""
    if value.lstrip().startswith("{"):
        try:
            entry = json.loads(value)
        except json.JSONDecodeError as error:
            raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {value!r}") from error
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(
                entry.get("path"), str):
            raise argparse.ArgumentTypeError(f'a JSON entry needs "name" and "path" strings, got {value!r}')
        name, path = entry["name"], entry["path"]
    else:
        name, sep, path = value.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected name=path (e.g. sql-lora=/adapters/sql), got {value!r}")
    if not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"both the name and the path must be non-empty, got {value!r}")
    return name.strip(), path.strip()


def _lora_modules(args: argparse.Namespace) -> dict[str, str]:
    modules: dict[str, str] = {}
    for name, path in args.lora_modules or []:
        if name in modules:
            raise ValueError(f"--lora-modules names {name!r} twice")
        modules[name] = path
    if modules and not args.enable_lora:
        raise ValueError("--lora-modules needs --enable-lora")
    return modules


def chat_template(value: str) -> str:
    """A --chat-template: the file's text where the value names a file, else the template as given."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as file:
            return file.read()
    return value


def add_chat_template_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chat-template", type=chat_template, default=None, metavar="PATH_OR_TEMPLATE",
                        help="a Jinja chat template (a file, or the template itself) used instead of the tokenizer's")


def set_chat_template(llm: LLM, args: argparse.Namespace) -> None:
    """Put --chat-template, if given, in the tokenizer's place (the server's tokenizers are copies of this one)."""
    if args.chat_template is not None:
        llm.tokenizer.chat_template = args.chat_template


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="the model to serve, as vLLM takes it (the same as --model, which it overrides)")
    add_chat_template_argument(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn's log level")
    parser.add_argument("--lora-modules", nargs="+", type=lora_module, default=None, metavar="NAME=PATH",
                        help="LoRA adapters served by name (the request's `model` field), as name=path or vLLM's "
                             '\'{"name": ..., "path": ...}\'; needs --enable-lora')
    add_dataclass_arguments(parser.add_argument_group("server"), ServerConfig)
    add_engine_arguments(parser)


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from foreseer.engine.async_engine import AsyncLLMEngine
    from foreseer.server import create_app

    config = from_args(ServerConfig, args)  # before the model loads: a bad flag fails fast
    lora_modules = _lora_modules(args)
    if args.model_tag is not None:
        args.model = args.model_tag
    llm = make_llm(args)
    set_chat_template(llm, args)
    engine = AsyncLLMEngine(llm.engine, config.max_waiting_requests, config.step_timeout_s)
    app = create_app(engine, config, lora_modules)
    # uvicorn drains on SIGTERM: it stops listening, lets running requests finish, then the app stops the engine.
    # Then it raises the signal again, to whatever handler was there before it: with this one, which ignores it, a
    # drained shutdown exits 0, as service managers expect.
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, lambda *_: None)
    # Its own header limit sits above the app's, so that the app's 431 names the limit.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                h11_max_incomplete_event_size=2 * config.max_header_bytes + 4096)
    return 0
