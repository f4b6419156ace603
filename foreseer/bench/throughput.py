"""Offline throughput: Foreseer against Hugging Face transformers' batched generate on the same prompts."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from foreseer.bench.data import chat_prompt_ids, load_sharegpt_questions
from foreseer.bench.report import write_json
from foreseer.layers.quantized_linear import QuantizedLinear
from foreseer.llm import LLM
from foreseer.sampling_params import SamplingParams


@dataclass
class ThroughputArgs:
    dataset: str  # ShareGPT-format JSON file of the prompts
    num_prompts: int = 200  # the dataset's first prompts
    max_tokens: int = 256  # new tokens per prompt at most
    max_prompt_tokens: int = 512  # longer questions are shortened to fit
    # Also run these baselines: hf (transformers), llamacpp (llama.cpp on the same GGUF and threads; the `bench`
    # extra), float32 (this engine with float32 weights)
    compare: tuple[str, ...] = ()
    batching: str = "continuous"  # LLM.generate's batching (seqsched: sequence scheduling by predicted length)
    hf_batch_size: int = 32  # prompts per batch of the transformers baseline
    output_json: str | None = None  # write the report to this JSON file


@dataclass
class RunResult:
    elapsed_s: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.elapsed_s

    def as_dict(self) -> dict:
        return {**asdict(self), "output_tokens_per_s": self.output_tokens_per_s,
                "requests_per_s": self.requests_per_s}


def run_foreseer(llm: LLM, prompts: list[list[int]], max_tokens: int,
                 batching: str = "continuous") -> tuple[RunResult, list[list[int]]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, batching=batching)
    elapsed = time.perf_counter() - start
    tokens = [o.outputs[0].token_ids for o in outputs]
    return RunResult(elapsed, len(prompts), sum(map(len, prompts)), sum(map(len, tokens))), tokens


def load_hf_model(llm: LLM):
    from transformers import AutoModelForCausalLM

    source = llm.engine.source
    kwargs = {"gguf_file": os.path.basename(source.path)} if source.is_gguf else {}
    return AutoModelForCausalLM.from_pretrained(source.directory, dtype=torch.float32, **kwargs).eval()


def run_hf(model, prompts: list[list[int]], max_tokens: int, batch_size: int, eos_ids: list[int],
           pad_id: int) -> tuple[RunResult, list[list[int]]]:
    """Static batches in arrival order, left padded, each run until its last member stops."""
    outputs: list[list[int]] = []
    start = time.perf_counter()
    for i in tqdm(range(0, len(prompts), batch_size), desc="hf generate", unit="batch"):
        batch = prompts[i:i + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            generated = model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                                       eos_token_id=eos_ids, pad_token_id=pad_id)[:, width:]
        for row in generated.tolist():
            end = next((j + 1 for j, t in enumerate(row) if t in eos_ids), len(row))
            outputs.append(row[:end])
    elapsed = time.perf_counter() - start
    return RunResult(elapsed, len(prompts), sum(map(len, prompts)), sum(map(len, outputs))), outputs


def decode_step_ms(llm: LLM, hf_model, prompt: list[int], steps: int = 64) -> dict:
    """Time per generated token at batch 1, after the first."""
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True),
                       use_tqdm=False)[0]
    result = {"foreseer": 1000 * (out.metrics.e2e_latency - out.metrics.time_to_first_token) / steps}
    if hf_model is not None:
        ids = torch.tensor([prompt])

        def timed(new_tokens: int) -> float:
            start = time.perf_counter()
            with torch.no_grad():
                hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            return time.perf_counter() - start

        timed(2)  # warm-up
        result["hf"] = 1000 * (timed(steps + 1) - timed(1)) / steps
        result["hf_over_foreseer"] = result["hf"] / result["foreseer"]
    return result


def matmul_weights(model: torch.nn.Module) -> tuple[int, int]:
    """(weights multiplied once per token, the bytes they are held in): every linear layer, the lm_head included
    (tied or not); the embedding lookup reads one row, so it does not count."""
    count = held = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            count += module.in_features * module.out_features
            held += sum(p.data.numel() for p in module.parts)
        elif isinstance(module, torch.nn.Linear):
            count += module.weight.numel()
            held += module.weight.numel() * module.weight.element_size()
    return count, held


def compute_limit(llm: LLM, processed_tokens_per_s: float) -> dict:
    """Tokens/s the machine could reach if every FLOP of the weights ran at large-matmul speed."""
    size, reps = 2048, 10
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    gflops = 2 * size**3 * reps / (time.perf_counter() - start) / 1e9
    gflop_per_token = 2 * matmul_weights(llm.engine.runner.model)[0] / 1e9
    limit = gflops / gflop_per_token
    return {"matmul_gflops": gflops, "model_gflop_per_token": gflop_per_token, "limit_tokens_per_s": limit,
            "foreseer_processed_tokens_per_s": processed_tokens_per_s,
            "fraction_of_limit": processed_tokens_per_s / limit}


def _compare_llamacpp(llm: LLM, prompts: list[list[int]], max_tokens: int, ours: RunResult) -> dict:
    """llama.cpp's continuous batching on the same prompt tokens, GGUF and thread count, with as many parallel
    sequences as Foreseer may run at once."""
    from foreseer.bench.llamacpp import llamacpp_batched_throughput

    source = llm.engine.source
    if not source.is_gguf:
        raise ValueError("the llama.cpp baseline needs a GGUF model")
    theirs = llamacpp_batched_throughput(source.path, prompts, max_tokens, torch.get_num_threads(),
                                         n_parallel=llm.engine.config.scheduler.max_num_seqs)
    theirs["foreseer_over_llamacpp"] = ours.output_tokens_per_s / theirs["output_tokens_per_s"]
    print(f"llama.cpp ({theirs['n_parallel']} parallel sequences): {theirs['output_tokens_per_s']:.1f} output tok/s; "
          f"foreseer/llama.cpp = {theirs['foreseer_over_llamacpp']:.2f}x")
    return theirs


def _compare_float32(llm: LLM, prompts: list[list[int]], args: ThroughputArgs, ours: RunResult,
                     our_tokens: list[list[int]]) -> dict:
    """The same engine and prompts with every weight expanded to float32 (the reference path)."""
    reference = LLM.from_config(dataclasses.replace(llm.engine.config, weight_format="float32"))
    theirs, their_tokens = run_foreseer(reference, prompts, args.max_tokens, args.batching)
    result = {**theirs.as_dict(), "speedup": ours.output_tokens_per_s / theirs.output_tokens_per_s,
              "identical_outputs": sum(a == b for a, b in zip(our_tokens, their_tokens))}
    print(f"float32 weights: {theirs.output_tokens_per_s:.1f} output tok/s; stored/float32 = {result['speedup']:.2f}x; "
          f"identical outputs {result['identical_outputs']}/{len(prompts)}")
    return result


def run(llm: LLM, args: ThroughputArgs) -> dict:
    questions = load_sharegpt_questions(args.dataset, args.num_prompts)
    prompts = [chat_prompt_ids(llm.tokenizer, q, args.max_prompt_tokens) for q in questions]
    ours, our_tokens = run_foreseer(llm, prompts, args.max_tokens, args.batching)
    report = {
        "model": llm.engine.config.model,
        "num_prompts": args.num_prompts, "max_tokens": args.max_tokens, "max_prompt_tokens": args.max_prompt_tokens,
        "batching": args.batching, "threads": torch.get_num_threads(),
        "attention_backend": llm.engine.runner.backend.name,
        "foreseer": ours.as_dict(),
    }
    print(f"foreseer: {ours.output_tokens_per_s:.1f} output tok/s, {ours.requests_per_s:.3f} req/s "
          f"({ours.output_tokens} output tokens in {ours.elapsed_s:.1f} s)")
    hf_model = None
    if "llamacpp" in args.compare:
        report["llamacpp"] = _compare_llamacpp(llm, prompts, args.max_tokens, ours)
    if "float32" in args.compare:
        report["float32"] = _compare_float32(llm, prompts, args, ours, our_tokens)
    if "hf" in args.compare:
        hf_model = load_hf_model(llm)
        eos = sorted(llm.engine.eos_token_ids)
        pad = llm.tokenizer.pad_token_id if llm.tokenizer.pad_token_id is not None else eos[0]
        theirs, their_tokens = run_hf(hf_model, prompts, args.max_tokens, args.hf_batch_size, eos, pad)
        ratio = ours.output_tokens_per_s / theirs.output_tokens_per_s
        report["hf"] = {**theirs.as_dict(), "batch_size": args.hf_batch_size}
        report["speedup_vs_hf"] = ratio
        report["identical_outputs"] = sum(a == b for a, b in zip(our_tokens, their_tokens))
        print(f"hf (batch {args.hf_batch_size}): {theirs.output_tokens_per_s:.1f} output tok/s, "
              f"{theirs.requests_per_s:.3f} req/s; foreseer/hf = {ratio:.2f}x; "
              f"identical outputs {report['identical_outputs']}/{len(prompts)}")
    report["decode_step_ms_batch1"] = decode_step_ms(llm, hf_model, prompts[0])
    print("decode step at batch 1 (ms):", _fmt(report["decode_step_ms_batch1"]))
    processed = (ours.prompt_tokens + ours.output_tokens) / ours.elapsed_s
    report["compute_limit"] = compute_limit(llm, processed)
    print("compute limit:", _fmt(report["compute_limit"]))
    write_json(report, args.output_json)
    return report


def _fmt(values: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
