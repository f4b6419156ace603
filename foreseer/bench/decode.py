"""`foreseer bench decode`: batch-1 decode on the CPU against llama.cpp on the same GGUF and thread count, in one run.

Reports, each as a ratio to its baseline from the same minutes (runs in turns, fastest kept):
- batch-1 greedy decode tokens/s after prompts of each context length: Foreseer (weights as stored) against
  llama.cpp (llama-cpp-python) and against Foreseer's float32 expansion;
- the share of the machine's limits reached: weight and KV bytes streamed per token against the measured read
  bandwidth, FLOPs per token against the fp32 FMA peak;
- the step's overhead (time outside the matmul and attention kernels) with the fused decoder (every layer in one
  C++ call), and with the model's modules running the C++ layer ops or PyTorch's;
- decode attention alone, split-KV against the reference kernels, at long contexts;
- the resident memory of a fresh process after loading the model, Foreseer's and llama.cpp's.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from foreseer.bench.attention import bench_decode_attention
from foreseer.bench.llamacpp import PROMPT_TEXT
from foreseer.bench.machine import machine_limits, rss_after_load
from foreseer.bench.report import write_json
from foreseer.bench.throughput import matmul_weights
from foreseer.bench.turns import fastest_in_turns
from foreseer.layers import cpu_kernels
from foreseer.layers.quantized_linear import QuantizedLinear
from foreseer.llm import LLM
from foreseer.models.cpu_decoder import FusedCpuDecoder
from foreseer.sampling_params import SamplingParams


@dataclass
class DecodeBenchArgs:
    model: str = "smollm2-135m-instruct"  # model name, GGUF file or HF directory
    contexts: tuple[int, ...] = (128, 2048)  # prompt lengths to decode after
    new_tokens: int = 128  # tokens decoded after each prompt
    repeats: int = 3  # runs of each engine, in turns; the fastest is kept
    attention_contexts: tuple[int, ...] = (4096, 8192)  # context lengths of the split-KV attention timing
    llamacpp: bool = True  # also run llama.cpp (needs the `bench` extra)
    output_json: str | None = None  # write the report to this JSON file


def _prompt(llm: LLM, count: int) -> list[int]:
    ids = llm.tokenizer(PROMPT_TEXT * (count // 8 + 1), add_special_tokens=False)["input_ids"]
    if len(ids) < count:
        raise ValueError(f"the prompt text gave {len(ids)} tokens; {count} needed")
    return ids[:count]


def foreseer_decode(llm: LLM, prompt: list[int], new_tokens: int) -> dict:
    """One greedy generation of `new_tokens` after `prompt` (EOS ignored): the decode steps' time per token."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens + 1, ignore_eos=True)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    seconds = out.metrics.e2e_latency - out.metrics.time_to_first_token
    return {"decode_tokens_per_s": new_tokens / seconds, "ms_per_token": 1000 * seconds / new_tokens}


def _streamed_per_token(llm: LLM, context: int) -> tuple[int, float]:
    """(bytes a batch-1 decode step must read: every weight matrix and the context's keys and values,
    FLOPs it must do: 2 per weight of every matmul, and the attention's 4 per head dimension per context token)."""
    cfg = llm.engine.model_config
    matmul_count, weight_bytes = matmul_weights(llm.engine.runner.model)
    kv_bytes = 2 * cfg.num_hidden_layers * context * cfg.num_key_value_heads * cfg.head_dim * 4
    attention_flops = 4 * cfg.num_hidden_layers * context * cfg.num_attention_heads * cfg.head_dim
    return weight_bytes + kv_bytes, 2 * matmul_count + attention_flops


@contextlib.contextmanager
def _kernel_timer(llm: LLM) -> Iterator[collections.Counter]:
    """Time spent inside the matmul and attention kernels while the block runs, by kind, in seconds; a fused decode
    step (every layer's kernels in one C++ call) counts whole."""
    runner = llm.engine.runner
    spent: collections.Counter = collections.Counter()
    patched = [(QuantizedLinear, "matmul", "matmul"), (torch.nn.Linear, "forward", "matmul"),
               (type(runner.backend), "decode", "attention"), (type(runner.backend), "write_kv", "attention"),
               (FusedCpuDecoder, "__call__", "fused")]
    originals = [(cls, name, getattr(cls, name)) for cls, name, _ in patched]

    def timed(function, kind):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = function(*args, **kwargs)
            spent[kind] += time.perf_counter() - start
            return result
        return wrapper

    for (cls, name, kind), (_, _, function) in zip(patched, originals):
        setattr(cls, name, timed(function, kind))
    try:
        yield spent
    finally:
        for cls, name, function in originals:
            setattr(cls, name, function)


@contextlib.contextmanager
def _step_mode(llm: LLM, mode: str) -> Iterator[None]:
    """Decode steps as `mode` runs them: "fused_decoder" (the default: one C++ call for every layer), or the
    model's modules with the C++ layer ops ("modules_cpp_layer_ops") or PyTorch's ("modules_pytorch_layer_ops")."""
    runner = llm.engine.runner
    fused = runner.fused_decoder
    if mode == "fused_decoder" and fused is None:
        raise ValueError("this model has no fused decoder")
    runner.fused_decoder = fused if mode == "fused_decoder" else None
    try:
        with cpu_kernels.layer_ops_enabled(mode != "modules_pytorch_layer_ops"):
            yield
    finally:
        runner.fused_decoder = fused


STEP_MODES = ("fused_decoder", "modules_cpp_layer_ops", "modules_pytorch_layer_ops")


def step_overhead(llm: LLM, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    """Per batch-1 decode step, in each of STEP_MODES that applies: its time, the time in the matmul and attention
    kernels (or the fused call), and the rest (Python, PyTorch dispatch, small ops, scheduling, sampling)."""
    def measured(mode: str) -> dict:
        with _step_mode(llm, mode), _kernel_timer(llm) as spent:
            # The prompt alone (from the prefix cache, as below): its kernels' time is not the steps'.
            llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
            prefill = sum(spent.values())
            spent.clear()
            ms = foreseer_decode(llm, prompt, new_tokens)["ms_per_token"]
        kernels_ms = 1000 * (sum(spent.values()) - prefill) / new_tokens
        return {"step_ms": ms, "kernels_ms": kernels_ms, "overhead_ms": ms - kernels_ms}

    modes = STEP_MODES if llm.engine.runner.fused_decoder is not None else STEP_MODES[1:]
    best = fastest_in_turns({mode: functools.partial(measured, mode) for mode in modes}, repeats,
                            seconds=lambda r: r["step_ms"])
    fastest = best[modes[0]]
    for mode in modes[1:]:
        best[mode]["overhead_vs_" + modes[0]] = best[mode]["overhead_ms"] / max(fastest["overhead_ms"], 1e-9)
        best[mode]["step_vs_" + modes[0]] = best[mode]["step_ms"] / fastest["step_ms"]
    return best


def run(args: DecodeBenchArgs) -> dict:
    threads = torch.get_num_threads()
    report: dict = {"args": asdict(args), "threads": threads}
    print(f"machine limits with {threads} threads ...", flush=True)
    report["machine"] = limits = machine_limits(threads)
    print(f"  fp32 FMA peak {limits['fp32_fma_peak_gflops']:.0f} GFLOP/s, "
          f"read bandwidth {limits['read_bandwidth_gbs']:.1f} GB/s")
    llms = {"foreseer": LLM(args.model, weight_format="auto", kv_cache_gib=0.25),
            "foreseer_float32": LLM(args.model, weight_format="float32", kv_cache_gib=0.25)}
    source = llms["foreseer"].engine.source
    if args.llamacpp and not source.is_gguf:
        raise ValueError("the llama.cpp baseline needs a GGUF model")

    report["decode"] = []
    for context in args.contexts:
        prompt = _prompt(llms["foreseer"], context)
        ways = {name: functools.partial(foreseer_decode, llm, prompt, args.new_tokens) for name, llm in llms.items()}
        if args.llamacpp:
            from foreseer.bench.llamacpp import llamacpp_decode

            ways["llamacpp"] = functools.partial(llamacpp_decode, source.path, context, args.new_tokens, threads,
                                                 repeats=1)
        for way in ways.values():
            way()  # warm-up: kernels built, caches and thread pools started
        best = fastest_in_turns(ways, args.repeats, seconds=lambda r: r["ms_per_token"])
        row = {"context": context, **{f"{name}_tokens_per_s": r["decode_tokens_per_s"] for name, r in best.items()}}
        seconds = best["foreseer"]["ms_per_token"] / 1000
        streamed, flops = _streamed_per_token(llms["foreseer"], context)
        row["bandwidth_share"] = streamed / seconds / 1e9 / limits["read_bandwidth_gbs"]
        row["fma_peak_share"] = flops / seconds / 1e9 / limits["fp32_fma_peak_gflops"]
        row["vs_float32"] = row["foreseer_tokens_per_s"] / row["foreseer_float32_tokens_per_s"]
        if args.llamacpp:
            row["vs_llamacpp"] = row["foreseer_tokens_per_s"] / row["llamacpp_tokens_per_s"]
        report["decode"].append(row)
        print(_line(f"decode after {context} tokens", row), flush=True)

    llm = llms.pop("foreseer")
    del llms  # the float32 copy's memory is not needed any more
    report["step_overhead"] = step_overhead(llm, _prompt(llm, args.contexts[0]), args.new_tokens, args.repeats)
    for mode, row in report["step_overhead"].items():
        print(_line(f"decode step (ms), {mode}", row))

    cfg = llm.engine.model_config
    report["attention"] = bench_decode_attention(
        args.attention_contexts, num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim, block_size=llm.engine.config.cache.block_size)
    for row in report["attention"]:
        print(_line("decode attention", row))

    report["rss_mb"] = {"foreseer": rss_after_load(
        f"import torch\ntorch.set_num_threads({threads})\nfrom foreseer import LLM\n"
        f"llm = LLM({args.model!r}, kv_cache_gib=0.1)\n") / 1e6}
    if args.llamacpp:
        from foreseer.bench.llamacpp import llamacpp_rss_after_load

        report["rss_mb"]["llamacpp"] = llamacpp_rss_after_load(source.path, threads) / 1e6
    if source.is_gguf:
        report["rss_mb"]["gguf_file"] = os.path.getsize(source.path) / 1e6
    print(_line("resident memory after load (MB)", report["rss_mb"]))
    write_json(report, args.output_json)
    return report


def _line(title: str, values: dict) -> str:
    return f"{title}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
