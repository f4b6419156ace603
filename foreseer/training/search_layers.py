"""`foreseer spec search-layers`: choose the layers that self-speculative decoding skips, by measured tokens/s.

Candidates come from one prefill pass over the prompts: a layer whose output is closest (cosine) to its
input changes the residual stream least, so the draft loses least by skipping it (the first and the last
layers are always kept). For each candidate count, the engine decodes the prompts at batch 1 with those layers
skipped, beside the same prompts without speculation in the same run; the fastest set is saved for the model
and becomes `layer_skip`'s default.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from foreseer.bench.data import DEFAULT_DATASET, chat_prompt_ids, load_sharegpt_questions
from foreseer.config import SpeculativeConfig
from foreseer.llm import LLM
from foreseer.outputs import SpeculationFigures
from foreseer.sampling_params import SamplingParams
from foreseer.spec.draft_model import LayerSkipProposer, layer_skip_path
from foreseer.worker.profiling import StepCostModel


@dataclass
class SearchLayersArgs:
    model: str = "smollm2-135m-instruct"
    dataset: str = DEFAULT_DATASET
    num_prompts: int = 6
    skip_prompts: int = 1000  # past the prompts that benchmarks use
    max_prompt_tokens: int = 256
    max_tokens: int = 64
    skip_fractions: list[float] = field(default_factory=lambda: [0.2, 0.35, 0.5])
    num_speculative_tokens: int = 5
    kv_cache_gib: float = 0.5
    output: str | None = None  # default: the file `layer_skip` reads for this model


def layer_redundancy(llm: LLM, prompts: list[list[int]]) -> list[float]:
    """Mean cosine similarity of each decoder layer's output to its input over the prompts' tokens."""
    layers = llm.engine.runner.model.model.layers
    totals = [0.0] * len(layers)
    counts = [0] * len(layers)

    # A layer takes and returns the residual stream in two parts (forward(positions, x, residual) -> (x,
    # residual)), and adds into the residual in place: its input stream is summed before it runs.
    streams_in: list[torch.Tensor] = []

    def before(module, inputs) -> None:
        _, x, residual = inputs
        streams_in.append(x.clone() if residual is None else x + residual)

    def hook(index: int):
        def record(module, inputs, output) -> None:
            stream_out = output[0] + output[1]
            totals[index] += float(torch.cosine_similarity(streams_in.pop(), stream_out, dim=-1).sum())
            counts[index] += stream_out.shape[0]
        return record

    handles = [layer.register_forward_pre_hook(before) for layer in layers]
    handles += [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    finally:
        for handle in handles:
            handle.remove()
    return [t / max(c, 1) for t, c in zip(totals, counts)]


def candidate_sets(redundancy: list[float], fractions: list[float]) -> list[list[int]]:
    """For each fraction, that share of the layers, the most redundant first, never the first or the last."""
    inner = sorted(range(1, len(redundancy) - 1), key=lambda i: -redundancy[i])
    sets = []
    for fraction in fractions:
        count = max(1, min(len(inner), round(fraction * len(redundancy))))
        chosen = sorted(inner[:count])
        if chosen not in sets:
            sets.append(chosen)
    return sets


def _decode_rate(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    """Output tokens per second decoding the prompts one at a time (batch 1), and the outputs."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    outputs, seconds = [], 0.0
    for prompt in prompts:
        start = time.perf_counter()
        outputs.append(llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids)
        seconds += time.perf_counter() - start
    return sum(map(len, outputs)) / seconds, outputs


def run(args: SearchLayersArgs, command: str = "") -> dict:
    if args.num_prompts < 1 or not args.skip_fractions or not all(0 < f < 1 for f in args.skip_fractions):
        raise ValueError("--num-prompts must be >= 1 and --skip-fractions in (0, 1)")
    plain = LLM(args.model, kv_cache_gib=args.kv_cache_gib)
    questions = load_sharegpt_questions(args.dataset, args.num_prompts, args.skip_prompts)
    prompts = [chat_prompt_ids(plain.tokenizer, q, args.max_prompt_tokens) for q in questions]
    redundancy = layer_redundancy(plain, prompts)
    first = candidate_sets(redundancy, args.skip_fractions)[0]
    spec = LLM(args.model, kv_cache_gib=args.kv_cache_gib, speculative_config={
        "method": "layer_skip", "skip_layers": first, "num_speculative_tokens": args.num_speculative_tokens,
        "calibrate": False})
    _decode_rate(plain, prompts[:1], 8)  # warm-up: kernels and allocator
    _decode_rate(spec, prompts[:1], 8)
    candidates = []
    for skip in candidate_sets(redundancy, args.skip_fractions):
        speculator = spec.engine.speculator
        config = SpeculativeConfig("layer_skip", args.num_speculative_tokens, skip_layers=skip, calibrate=False)
        speculator.proposer = LayerSkipProposer.create(config, spec.engine.runner, spec.engine.block_manager)
        # Timing the new draft ran it over the target's KV cache, which it shares: cached prefixes are gone.
        spec.reset_prefix_cache()
        # Drafting is forced (flat step costs, free drafts) so that each set's own speed shows; when serving,
        # the engine weighs the saved set with its measured costs and drafts only where that pays.
        speculator.cost = StepCostModel([1, 2], [1.0, 1.0])
        speculator.proposer.draft_step_cost = None
        speculator.stats = SpeculationFigures()
        base_rate, expected = _decode_rate(plain, prompts, args.max_tokens)  # in turn: load drifts alike for both
        rate, outputs = _decode_rate(spec, prompts, args.max_tokens)
        if outputs != expected:
            raise RuntimeError(f"layer skip {skip} changed greedy outputs: speculation must be exact")
        stats = speculator.stats
        candidates.append({"skip_layers": skip, "tokens_per_s": rate, "baseline_tokens_per_s": base_rate,
                           "speedup": rate / base_rate, "acceptance_rate": stats.acceptance_rate,
                           "mean_accepted_length": stats.mean_accepted_length})
        acceptance = "-" if stats.acceptance_rate is None else f"{stats.acceptance_rate:.2f}"  # None: no drafts
        print(f"skip {len(skip):2d} layers {skip}: {rate:.1f} tok/s vs {base_rate:.1f} without speculation "
              f"({rate / base_rate:.2f}x), acceptance {acceptance}", flush=True)
    best = max(candidates, key=lambda c: c["speedup"])
    result = {"skip_layers": best["skip_layers"], "model": args.model, "command": command,
              "search": {**asdict(args), "layer_redundancy": redundancy, "candidates": candidates}}
    output = args.output or layer_skip_path(args.model)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"chose {best['skip_layers']} ({best['speedup']:.2f}x); wrote {output}")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SearchLayersArgs()
    parser.add_argument("--model", default=defaults.model, help="model name, GGUF file or HF directory")
    parser.add_argument("--dataset", default=defaults.dataset, help="ShareGPT-format JSON")
    parser.add_argument("--num-prompts", type=int, default=defaults.num_prompts,
                        help="prompts decoded for each candidate set")
    parser.add_argument("--skip-prompts", type=int, default=defaults.skip_prompts,
                        help="dataset prompts to skip first (the benchmarks use the first ones)")
    parser.add_argument("--max-prompt-tokens", type=int, default=defaults.max_prompt_tokens,
                        help="longer questions are shortened to fit")
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="new tokens per prompt")
    parser.add_argument("--skip-fractions", type=float, nargs="+", default=defaults.skip_fractions,
                        help="shares of the layers to try skipping")
    parser.add_argument("--num-speculative-tokens", type=int, default=defaults.num_speculative_tokens,
                        help="the layer_skip draft's deepest draft")
    parser.add_argument("--kv-cache-gib", type=float, default=defaults.kv_cache_gib, help="KV cache of each engine")
    parser.add_argument("--output", default=None, help="default: the file layer_skip reads for the model")


def main(args: argparse.Namespace) -> int:
    options = {k: v for k, v in vars(args).items() if k in SearchLayersArgs.__dataclass_fields__}
    run(SearchLayersArgs(**options), shlex.join(["foreseer", "spec", "search-layers", *sys.argv[3:]]))
    return 0
