"""foreseer chat: interactive chat that streams tokens as they are generated; an empty line or EOF ends it."""

from __future__ import annotations

import argparse

from foreseer.cli.sampling import add_sampling_arguments, sampling_params
from foreseer.commands import add_engine_arguments, make_llm


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", default=None, help="system message")
    add_engine_arguments(parser)
    add_sampling_arguments(parser)


def main(args: argparse.Namespace) -> int:
    llm = make_llm(args)
    params = sampling_params(args)
    engine = llm.engine
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    turn = 0
    print("foreseer chat: type a message, an empty line or Ctrl-D to quit.", flush=True)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        history.append({"role": "user", "content": line})
        try:
            engine.add_request(f"chat-{turn}", llm.apply_chat_template(history), params)
        except ValueError as error:
            print(f"error: {error}", flush=True)
            history.pop()
            continue
        turn += 1
        printed = 0
        reply = ""
        while engine.has_unfinished_requests():
            for out in engine.step():
                reply = out.outputs[0].text
                print(reply[printed:], end="", flush=True)
                printed = len(reply)
        print(flush=True)
        history.append({"role": "assistant", "content": reply})
    return 0
