"""foreseer generate: answer prompts and print the answers."""

from __future__ import annotations

import argparse
import sys

from foreseer.cli.sampling import add_sampling_arguments, sampling_params
from foreseer.commands import add_engine_arguments, make_llm


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="+", help="prompt(s); chat template applied unless --raw")
    parser.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    add_engine_arguments(parser)
    add_sampling_arguments(parser)


def main(args: argparse.Namespace) -> int:
    llm = make_llm(args)
    params = sampling_params(args)
    if args.raw:
        outputs = llm.generate(args.prompt, params, use_tqdm=False)
    else:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params, use_tqdm=False)
    status = 0
    for prompt, out in zip(args.prompt, outputs):
        if out.error:
            print(f"error: {out.error}", file=sys.stderr)
            status = 1
            continue
        if len(args.prompt) > 1:
            print(f"### {prompt}")
        print(out.outputs[0].text)
        if out.predicted_length is not None:
            print(f"[predicted length {out.predicted_length} tokens, generated {len(out.outputs[0].token_ids)}]",
                  file=sys.stderr)
    return status
