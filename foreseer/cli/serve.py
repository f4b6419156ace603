"""foreseer serve: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse
import json

from foreseer.commands import add_engine_arguments, make_llm
from foreseer.server.protocol import MAX_BODY_BYTES


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    parser.add_argument("--max-waiting-requests", type=int, default=256,
                        help="sequences that may wait for the engine; beyond, requests get 503 with Retry-After")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer <key>' on /v1 endpoints")
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES,
                        help="a request body larger than this gets a 413 before it is read whole")
    parser.add_argument("--protect-metrics", action="store_true",
                        help="with --api-key, /metrics needs the key too (by default it is open, for scrapers)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn's log level")
    parser.add_argument("--lora-modules", nargs="+", type=lora_module, default=None, metavar="NAME=PATH",
                        help="LoRA adapters served by name (the request's `model` field), as name=path or vLLM's "
                             '\'{"name": ..., "path": ...}\'; needs --enable-lora')
    add_engine_arguments(parser)


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from foreseer.engine.async_engine import AsyncLLMEngine
    from foreseer.server import create_app

    if args.protect_metrics and args.api_key is None:
        raise ValueError("--protect-metrics needs --api-key")
    lora_modules = _lora_modules(args)  # before the model loads: a typo fails fast
    engine = AsyncLLMEngine(make_llm(args).engine, max_waiting_requests=args.max_waiting_requests)
    app = create_app(engine, served_model_name=args.served_model_name, api_key=args.api_key,
                     lora_modules=lora_modules, protect_metrics=args.protect_metrics,
                     max_body_bytes=args.max_body_bytes)
    # uvicorn drains on SIGTERM: it stops listening, lets running requests finish, then the app stops the engine.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
