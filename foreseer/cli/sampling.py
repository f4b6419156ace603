"""The sampling flags of generate and chat. Written here rather than generated from SamplingParams: the command
line's defaults are greedy with longer answers, and its seed is named apart from the engine's --seed."""

from __future__ import annotations

import argparse

from foreseer.sampling_params import SamplingParams


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=256, help="new tokens per answer at most")
    group.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    group.add_argument("--top-p", type=float, default=1.0,
                       help="nucleus sampling: the most likely tokens whose probabilities add up to this")
    group.add_argument("--top-k", type=int, default=0, help="sample from this many most likely tokens (0: all)")
    group.add_argument("--min-p", type=float, default=0.0,
                       help="drop the tokens less likely than this times the most likely token")
    group.add_argument("--sampling-seed", type=int, default=None,
                       help="seed of each answer's sampling (default: the engine's generator, see --seed)")
    group.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, seed=args.sampling_seed, stop=args.stop)
