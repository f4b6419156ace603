"""Multi-LoRA serving throughput: one engine serving requests spread over N adapters, against the base model and
against the naive way of serving many adapters (merge one into the weights, run its requests, unmerge, next).

Every cell (N adapters, a popularity) runs the same chat-templated ShareGPT prompts, greedy, with a fixed number of
new tokens (EOS ignored), so that every row generates the same number of tokens:

- lora: one LLM(enable_lora=True) serves all requests at once (continuous batching), each with its adapter. Before
  each cell every adapter is unloaded from every tier, then (as in S-LoRA's experiments, which keep all adapters in
  host memory) the cell's adapters are read into the host cache, untimed (`adapter_read_s` records it); device
  slots start empty, so slot placement and eviction are timed. `cold_start` times the disk reads too;
- naive: the base engine (enable_lora=False) with one adapter at a time merged into its weights (exact: W += B A
  in the model's dtype, as PEFT merges), its requests run together, then the weights restored bit for bit from a
  copy of the projections the adapter touched; merges and unmerges count in the time (disk reads only with
  `cold_start`);
- base: the base engine without any adapter.

Each cell runs the three ways in turns (`repeats` rounds, each way going first in turn) and keeps each way's
fastest run, so that every ratio compares runs of the same minutes on this shared machine.

Adapters: the shipped real ones first (foreseer/lora/weights, for the default model only), then random PEFT
adapters (mixed ranks, every projection) written on demand into a directory, deterministic by seed. The prefix
cache is reset before every run (the cells reuse the prompts) and at every merge and unmerge (KV computed under
other weights must not be reused).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from foreseer.bench.data import chat_prompt_ids, load_sharegpt_questions
from foreseer.bench.report import write_json
from foreseer.bench.throughput import RunResult
from foreseer.bench.turns import fastest_in_turns
from foreseer.layers.quantized_linear import QuantizedLinear
from foreseer.llm import LLM
from foreseer.lora.adapter import SUPPORTED_MODULES, LoRAAdapter, base_targets, load_adapter
from foreseer.lora.request import LoRARequest
from foreseer.sampling_params import SamplingParams

POPULARITIES = ("uniform", "zipf")
WARMUP_PROMPTS, WARMUP_TOKENS = 2, 8
RANDOM_ADAPTER_SCALE = 0.1  # a random adapter's delta, relative to its projection's output (in expectation)
GOALS = {"n512_vs_n1": 0.85, "vs_naive_at_64": 4.0, "overhead_vs_base": 0.25}

# make_llm(enable_lora) -> an engine; both kinds get the same engine settings otherwise.
LLMFactory = Callable[[bool], LLM]


@dataclass
class LoRABenchArgs:
    dataset: str  # ShareGPT-format JSON file of the prompts
    # Adapters the requests are spread over, one cell each
    num_adapters: list[int] = field(default_factory=lambda: [1, 8, 64, 512])
    popularities: list[str] = field(default_factory=lambda: list(POPULARITIES))  # how requests pick their adapter
    zipf_alpha: float = 1.0  # zipf: adapter k drawn with weight 1/(k+1)^alpha
    num_prompts: int = 128  # prompts taken after the skipped ones
    skip_prompts: int = 0  # start at this prompt
    max_prompt_tokens: int = 256  # longer questions are shortened to fit
    max_tokens: int = 64  # new tokens per request (EOS ignored)
    ranks: list[int] = field(default_factory=lambda: [8, 16, 32, 64])  # random adapters' ranks, drawn per adapter
    # Projections the random adapters adapt
    target_modules: list[str] = field(default_factory=lambda: list(SUPPORTED_MODULES))
    shipped: bool = True  # the shipped real adapters first (the default model only)
    adapter_dir: str | None = None  # where random adapters are written (default: a temporary directory, removed)
    adapter_seed: int = 0  # random adapters' weights and ranks, and which adapter each request gets
    naive: bool = True  # also run the baseline that merges one adapter at a time
    repeats: int = 1  # rounds of each cell's three ways; each way's fastest run counts
    cold_start: bool = False  # time the adapters' disk reads too (default: they are in host memory, as in S-LoRA)
    output_json: str | None = None  # write the report to this JSON file
    plot: str | None = None  # PNG of tok/s against the number of adapters


# -- merging an adapter into the model's (fused) projections ---------------------------------------------------


def read_adapter(model: nn.Module, path: str) -> LoRAAdapter:
    """A PEFT adapter directory as the engine reads it (scaling folded into B), in the model's dtype."""
    dtype = next(model.parameters()).dtype
    return load_adapter(path, base_targets(model), len(model.model.layers), max_lora_rank=2**31, dtype=dtype)


def _linears(model: nn.Module, layer: int) -> dict[str, nn.Linear | QuantizedLinear]:
    return {name.rsplit(".", 1)[-1]: module for name, module in model.model.layers[layer].named_modules()
            if isinstance(module, nn.Linear | QuantizedLinear)}


def _dense_weight(linear: nn.Linear | QuantizedLinear) -> torch.Tensor:
    return linear.dequantize() if isinstance(linear, QuantizedLinear) else linear.weight


# (layer, projection) -> its original weight, or the layer itself where its weights were kept as stored
MergeState = dict[tuple[int, str], torch.Tensor | QuantizedLinear]


def _replace_linear(model: nn.Module, layer: int, module: str, replacement: nn.Module) -> None:
    decoder = model.model.layers[layer]
    path = next(name for name, m in decoder.named_modules() if name.rsplit(".", 1)[-1] == module)
    parent, _, child = path.rpartition(".")
    setattr(decoder.get_submodule(parent), child, replacement)


@torch.no_grad()
def merge_adapter(model: nn.Module, adapter: LoRAAdapter) -> MergeState:
    """W += B A on every projection shard the adapter adapts, in place, in the weights' dtype (as PEFT's merge);
    returns copies of the original weights of the projections it touched, for `unmerge_adapter`. A projection
    kept in its stored format (GGUF blocks) is swapped for a float32 linear layer of its weights plus the delta,
    as merging into a quantized checkpoint gives."""
    saved: MergeState = {}
    for (layer, module), shards in adapter.weights.items():
        linear = _linears(model, layer)[module]
        if isinstance(linear, QuantizedLinear):
            saved[layer, module] = linear
            dense = nn.Linear(linear.in_features, linear.out_features, bias=False)
            dense.weight = nn.Parameter(linear.dequantize(), requires_grad=False)
            dense.bias = linear.bias
            _replace_linear(model, layer, module, dense)
            weight = dense.weight
        else:
            weight = linear.weight
            saved[layer, module] = weight.detach().clone()
        sizes = model.shard_sizes(module) if len(shards) > 1 else [weight.shape[0]]
        offset = 0
        for pair, size in zip(shards, sizes):
            if pair is not None:
                a, b = pair
                weight[offset:offset + size].addmm_(b.to(weight.dtype), a.to(weight.dtype))
            offset += size
    return saved


@torch.no_grad()
def unmerge_adapter(model: nn.Module, saved: MergeState) -> None:
    """Restore the weights `merge_adapter` changed from its copies (or the stored-format layers): bit for bit."""
    for (layer, module), original in saved.items():
        if isinstance(original, QuantizedLinear):
            _replace_linear(model, layer, module, original)
        else:
            _linears(model, layer)[module].weight.copy_(original)


@contextmanager
def merged(llm: LLM, adapter: LoRAAdapter | str) -> Iterator[None]:
    """The engine's model with the adapter (or adapter directory) merged into its weights, for the duration. The
    prefix cache is reset on the way in and out: KV computed under other weights is not reused. The engine must
    be idle."""
    model = llm.engine.runner.model
    if isinstance(adapter, str):
        adapter = read_adapter(model, adapter)
    llm.reset_prefix_cache()
    saved = merge_adapter(model, adapter)
    llm.engine.runner.refresh_fused_decoder()
    try:
        yield
    finally:
        unmerge_adapter(model, saved)
        llm.engine.runner.refresh_fused_decoder()
        llm.reset_prefix_cache()


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 of every parameter's and buffer's bytes, in order: equal fingerprints, bit-identical weights."""
    digest = hashlib.sha256()
    for name, param in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# -- random adapters --------------------------------------------------------------------------------------------


def _hf_module_path(name: str) -> str:
    return f"self_attn.{name}" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else f"mlp.{name}"


def weight_stds(model: nn.Module) -> dict[tuple[int, str], float]:
    """The standard deviation of each (layer, HF projection)'s base weight, to size random deltas."""
    targets = base_targets(model)
    stds = {}
    for layer in range(len(model.model.layers)):
        linears = _linears(model, layer)
        for name, target in targets.items():
            weight = _dense_weight(linears[target.module])
            sizes = model.shard_sizes(target.module) if name in model.stacked_params else [weight.shape[0]]
            start = sum(sizes[:target.shard])
            stds[layer, name] = weight[start:start + sizes[target.shard]].float().std().item()
    return stds


def write_random_adapter(directory: str, model: nn.Module, rank: int, seed: int,
                         target_modules: Sequence[str] = SUPPORTED_MODULES, base_model: str | None = None,
                         scale: float = RANDOM_ADAPTER_SCALE, stds: dict[tuple[int, str], float] | None = None,
                         dtype: torch.dtype = torch.float16) -> str:
    """A random PEFT LoRA adapter for `model` (adapter_config.json, adapter_model.safetensors), deterministic by
    seed: lora_alpha = 2 rank, A ~ N(0, 1/in), B sized so that B A x is about `scale` times W x."""
    from safetensors.torch import save_file

    unknown = sorted(set(target_modules) - set(SUPPORTED_MODULES))
    if unknown or not target_modules:
        raise ValueError(f"target modules must be among {', '.join(SUPPORTED_MODULES)}, got {list(target_modules)}")
    targets = base_targets(model)
    stds = stds if stds is not None else weight_stds(model)
    alpha = 2 * rank
    scaling = alpha / rank
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(len(model.model.layers)):
        for name in target_modules:
            target = targets[name]
            fan_in = target.in_features
            a = torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
            # |A x| ~ |x| sqrt(rank / in); |B A x| ~ std(B) sqrt(rank) |A x|; |W x| ~ std(W) |x| sqrt(out / in).
            b_std = scale * stds[layer, name] * (target.out_features / rank) ** 0.5 / rank**0.5 / scaling
            b = torch.randn(target.out_features, rank, generator=generator) * b_std
            prefix = f"base_model.model.model.layers.{layer}.{_hf_module_path(name)}"
            tensors[f"{prefix}.lora_A.weight"] = a.to(dtype).contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.to(dtype).contiguous()
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
              "target_modules": list(target_modules), "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "inference_mode": True, "base_model_name_or_path": base_model}
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return directory


class AdapterPool:
    """Adapter i (0-based; lora_int_id i + 1): the shipped real ones first, then random ones, written on first
    use. A random adapter's rank and weights depend only on (seed, i)."""

    def __init__(self, model: nn.Module, root: str, shipped: Sequence[tuple[str, str]], ranks: Sequence[int],
                 target_modules: Sequence[str], seed: int, base_model: str | None) -> None:
        if not ranks or min(ranks) < 1:
            raise ValueError(f"random adapter ranks must be >= 1, got {list(ranks)}")
        self.model, self.root, self.shipped = model, root, list(shipped)
        self.ranks, self.target_modules, self.seed = list(ranks), list(target_modules), seed
        self.base_model = base_model
        self._stds: dict[tuple[int, str], float] | None = None
        self._requests: dict[int, LoRARequest] = {}
        self.write_s = 0.0

    def rank(self, index: int) -> int:
        if index < len(self.shipped):
            with open(os.path.join(self.shipped[index][1], "adapter_config.json")) as f:
                return json.load(f)["r"]
        return random.Random(f"{self.seed}:{index}").choice(self.ranks)

    def request(self, index: int) -> LoRARequest:
        if index not in self._requests:
            if index < len(self.shipped):
                name, path = self.shipped[index]
            else:
                rank = self.rank(index)
                name = f"random-{index:04d}-r{rank}"
                path = os.path.join(self.root, name)
                if not os.path.isfile(os.path.join(path, "adapter_model.safetensors")):
                    start = time.perf_counter()
                    if self._stds is None:
                        self._stds = weight_stds(self.model)
                    write_random_adapter(path, self.model, rank, seed=hash_seed(self.seed, index),
                                         target_modules=self.target_modules, base_model=self.base_model,
                                         stds=self._stds)
                    self.write_s += time.perf_counter() - start
            self._requests[index] = LoRARequest(name, index + 1, path)
        return self._requests[index]


def hash_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little") & (2**63 - 1)


def assign_adapters(num_requests: int, num_adapters: int, popularity: str, alpha: float, seed: int) -> list[int]:
    """Each request's adapter index: uniform, or Zipf (adapter k drawn with weight 1 / (k + 1)^alpha)."""
    if popularity not in POPULARITIES:
        raise ValueError(f"popularity must be one of {', '.join(POPULARITIES)}, got {popularity!r}")
    rng = random.Random(f"{seed}:{num_adapters}:{popularity}:{alpha}")
    if popularity == "uniform":
        return [rng.randrange(num_adapters) for _ in range(num_requests)]
    weights = [1 / (k + 1) ** alpha for k in range(num_adapters)]
    return rng.choices(range(num_adapters), weights=weights, k=num_requests)


def shipped_adapters(model: str) -> list[tuple[str, str]]:
    """(name, directory) of the real adapters shipped for this model (foreseer/lora/weights); [] for others."""
    from foreseer.lora.shipped import shipped_adapters as shipped

    return list(shipped(model).items())


# -- runs -------------------------------------------------------------------------------------------------------


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def _tokens(outputs, what: str) -> list[list[int]]:
    for i, out in enumerate(outputs):
        if out.error:
            raise ValueError(f"{what}, prompt {i}: {out.error}")
    return [out.outputs[0].token_ids for out in outputs]


def _result(elapsed: float, prompts: list[list[int]], tokens: list[list[int]]) -> RunResult:
    return RunResult(elapsed, len(prompts), sum(map(len, prompts)), sum(map(len, tokens)))


def run_base(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[RunResult, list[list[int]]]:
    llm.reset_prefix_cache()
    start = time.perf_counter()
    outputs = llm.generate(prompts, _params(max_tokens), use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = _tokens(outputs, "base")
    return _result(elapsed, prompts, tokens), tokens


def run_lora(llm: LLM, prompts: list[list[int]], loras: list[LoRARequest], max_tokens: int,
             cold_start: bool) -> tuple[RunResult, list[list[int]], dict]:
    """All requests at once, each with its adapter, with no adapter in a device slot, and the cell's adapters in
    the host cache unless `cold_start` (nothing loaded in any tier)."""
    engine = llm.engine
    manager = engine.lora
    for lora_id in list(manager.host_ids) + list(manager.loaded_ids):
        engine.unload_lora(lora_id)
    read_start = time.perf_counter()
    if not cold_start:
        for lora in dict.fromkeys(loras):
            manager.load_to_host(lora)
    read_s = time.perf_counter() - read_start
    llm.reset_prefix_cache()
    before = engine.lora_stats()
    start = time.perf_counter()
    outputs = llm.generate(prompts, _params(max_tokens), use_tqdm=False, lora_request=loras)
    elapsed = time.perf_counter() - start
    after = engine.lora_stats()
    stats = {key: getattr(after, key) - getattr(before, key)
             for key in ("sync_loads", "prefetch_loads", "device_evictions", "host_evictions")}
    tokens = _tokens(outputs, "lora")
    return _result(elapsed, prompts, tokens), tokens, {**stats, "adapter_read_s": read_s}


def run_naive(llm: LLM, prompts: list[list[int]], loras: list[LoRARequest], max_tokens: int,
              cold_start: bool) -> tuple[RunResult, list[list[int]], dict]:
    """One adapter at a time (in order of first use): merge it, run its requests together, unmerge. The adapters
    are read before the clock starts unless `cold_start`."""
    model = llm.engine.runner.model
    tokens: list[list[int] | None] = [None] * len(prompts)
    merge_s = 0.0
    order = list(dict.fromkeys(loras))
    read = {} if cold_start else {lora: read_adapter(model, lora.lora_path) for lora in order}
    start = time.perf_counter()
    for lora in order:
        indices = [i for i, other in enumerate(loras) if other == lora]
        merge_start = time.perf_counter()
        adapter = read.pop(lora, None) or read_adapter(model, lora.lora_path)
        llm.reset_prefix_cache()
        saved = merge_adapter(model, adapter)
        llm.engine.runner.refresh_fused_decoder()
        merge_s += time.perf_counter() - merge_start
        try:
            outputs = llm.generate([prompts[i] for i in indices], _params(max_tokens), use_tqdm=False)
        finally:
            unmerge_start = time.perf_counter()
            unmerge_adapter(model, saved)
            llm.engine.runner.refresh_fused_decoder()
            llm.reset_prefix_cache()
            merge_s += time.perf_counter() - unmerge_start
        for i, got in zip(indices, _tokens(outputs, f"naive, adapter {lora.lora_name}")):
            tokens[i] = got
    elapsed = time.perf_counter() - start
    return _result(elapsed, prompts, tokens), tokens, {"merges": len(order), "merge_unmerge_s": merge_s}


# -- the benchmark ----------------------------------------------------------------------------------------------


def run_cell(base_llm: LLM, lora_llm: LLM, prompts: list[list[int]], loras: list[LoRARequest],
             args: LoRABenchArgs) -> dict[str, tuple]:
    """The cell's requests the three ways (the base model, multi-LoRA, naive), in turns, each way's fastest of
    `args.repeats` runs kept (what run_base, run_lora and run_naive return)."""
    ways = {"base": lambda: run_base(base_llm, prompts, args.max_tokens),
            "lora": lambda: run_lora(lora_llm, prompts, loras, args.max_tokens, args.cold_start)}
    if args.naive:
        ways["naive"] = lambda: run_naive(base_llm, prompts, loras, args.max_tokens, args.cold_start)
    return fastest_in_turns(ways, args.repeats, lambda result: result[0].elapsed_s)


def run(make_llm: LLMFactory, args: LoRABenchArgs) -> dict:
    if (not args.num_adapters or min(args.num_adapters) < 1 or args.num_prompts < 1 or args.max_tokens < 1
            or args.repeats < 1):
        raise ValueError("--num-adapters, --num-prompts, --max-tokens and --repeats must be >= 1")
    unknown = sorted(set(args.popularities) - set(POPULARITIES))
    if unknown or not args.popularities:
        raise ValueError(f"popularities must be among {', '.join(POPULARITIES)}, got {args.popularities}")
    base_llm = make_llm(False)
    lora_llm = make_llm(True)
    model_name = base_llm.engine.config.model
    max_rank = lora_llm.engine.config.lora.max_lora_rank
    if max(args.ranks) > max_rank:
        raise ValueError(f"random adapters of rank up to {max(args.ranks)} need --max-lora-rank >= {max(args.ranks)}")
    shipped = shipped_adapters(model_name) if args.shipped else []
    questions = load_sharegpt_questions(args.dataset, args.num_prompts, args.skip_prompts)
    prompts = [chat_prompt_ids(base_llm.tokenizer, q, args.max_prompt_tokens) for q in questions]

    owned = args.adapter_dir is None
    root = tempfile.mkdtemp(prefix="foreseer-bench-lora-") if owned else args.adapter_dir
    try:
        pool = AdapterPool(base_llm.engine.runner.model, root, shipped, args.ranks, args.target_modules,
                           args.adapter_seed, model_name)
        # Kernels and allocators settle on first use; the warm-up adapter is unloaded again before the first cell.
        warmup = _params(WARMUP_TOKENS)
        base_llm.generate(prompts[:WARMUP_PROMPTS], warmup, use_tqdm=False)
        lora_llm.generate(prompts[:WARMUP_PROMPTS], warmup, use_tqdm=False, lora_request=pool.request(0))
        fingerprint = weights_fingerprint(base_llm.engine.runner.model) if args.naive else None

        report = {
            "model": model_name, "threads": torch.get_num_threads(),
            "attention_backend": base_llm.engine.runner.backend.name,
            "num_prompts": len(prompts), "skip_prompts": args.skip_prompts, "max_tokens": args.max_tokens,
            "ignore_eos": True, "max_prompt_tokens": args.max_prompt_tokens, "cold_start": args.cold_start,
            "repeats": args.repeats,
            "mean_prompt_tokens": sum(map(len, prompts)) / len(prompts),
            "max_loras": lora_llm.engine.config.lora.max_loras,
            "max_cpu_loras": lora_llm.engine.config.lora.max_cpu_loras, "max_lora_rank": max_rank,
            "max_num_seqs": lora_llm.engine.config.scheduler.max_num_seqs,
            "num_adapters": sorted(set(args.num_adapters)), "popularities": list(args.popularities),
            "zipf_alpha": args.zipf_alpha, "adapter_seed": args.adapter_seed,
            "adapters": {"shipped": [name for name, _ in shipped], "random_ranks": args.ranks,
                         "random_target_modules": args.target_modules, "random_dtype": "float16",
                         "random_scale": RANDOM_ADAPTER_SCALE},
            "merge": "W += B A in the weights' dtype; unmerge restores a copy of the touched projections (bit-exact)",
        }
        print(_header(), flush=True)
        results = []
        for num in report["num_adapters"]:
            for popularity in args.popularities:
                indices = assign_adapters(len(prompts), num, popularity, args.zipf_alpha, args.adapter_seed)
                loras = [pool.request(i) for i in indices]
                counts = Counter(indices)
                best = run_cell(base_llm, lora_llm, prompts, loras, args)
                (base, _), (lora, lora_tokens, lora_stats) = best["base"], best["lora"]
                row = {"num_adapters": num, "popularity": popularity, "distinct_adapters": len(counts),
                       "max_requests_per_adapter": max(counts.values()),
                       "mean_rank": sum(pool.rank(i) for i in indices) / len(indices),
                       "base": base.as_dict(), "lora": {**lora.as_dict(), **lora_stats},
                       "ratio_to_base": lora.output_tokens_per_s / base.output_tokens_per_s}
                if args.naive:
                    naive, naive_tokens, naive_stats = best["naive"]
                    mismatched = [i for i, (a, b) in enumerate(zip(lora_tokens, naive_tokens)) if a != b]
                    row["naive"] = {**naive.as_dict(), **naive_stats}
                    row["ratio_to_naive"] = lora.output_tokens_per_s / naive.output_tokens_per_s
                    row["identical_to_naive"] = len(prompts) - len(mismatched)
                    row["mismatched_prompts"] = mismatched
                one = next((r for r in results if r["num_adapters"] == 1 and r["popularity"] == popularity),
                           row if num == 1 else None)
                row["ratio_to_n1"] = (lora.output_tokens_per_s / one["lora"]["output_tokens_per_s"]
                                      if one is not None else None)
                results.append(row)
                print(_table_row(row, len(prompts)), flush=True)
        if args.naive:
            report["weights_restored"] = weights_fingerprint(base_llm.engine.runner.model) == fingerprint
        report["random_adapters_written_s"] = round(pool.write_s, 2)
    finally:
        if owned:
            shutil.rmtree(root, ignore_errors=True)
    report["results"] = results
    # The fastest base run of any cell: the header's and the plot's reference line.
    report["base"] = max((r["base"] for r in results), key=lambda b: b["output_tokens_per_s"])
    report["goals"] = goals(results)
    print(format_table(report))
    write_json(report, args.output_json)
    if args.plot:
        plot(report, args.plot)
    return report


def goals(results: list[dict]) -> dict:
    """The issue's targets, as measured (None where the cells it needs were not run)."""

    def cells(num: int) -> list[dict]:
        return [r for r in results if r["num_adapters"] == num]

    out = {}
    many = [r["ratio_to_n1"] for r in cells(512) if r.get("ratio_to_n1") is not None]
    out["n512_vs_n1"] = _goal(min(many) if many else None, GOALS["n512_vs_n1"], at_least=True,
                              what="tok/s with 512 adapters over tok/s with 1 (worst popularity)")
    naive = [r["ratio_to_naive"] for r in cells(64) if "ratio_to_naive" in r]
    out["vs_naive_at_64"] = _goal(min(naive) if naive else None, GOALS["vs_naive_at_64"], at_least=True,
                                  what="tok/s over the naive merge-run-unmerge way, 64 adapters (worst popularity)")
    one = [1 - r["ratio_to_base"] for r in cells(1)]
    out["overhead_vs_base"] = _goal(max(one) if one else None, GOALS["overhead_vs_base"], at_least=False,
                                    what="1 - tok/s with one adapter over the base model's")
    return out


def _goal(value: float | None, target: float, at_least: bool, what: str) -> dict:
    met = None if value is None else (value >= target if at_least else value <= target)
    return {"what": what, "value": value, "target": target, "at_least": at_least, "met": met}


COLUMNS = [("N", 4, "d"), ("popularity", 10, "s"), ("used", 4, "d"), ("lora tok/s", 10, ".1f"), ("req/s", 6, ".3f"),
           ("vs base", 7, ".2f"), ("vs N=1", 6, ".2f"), ("naive tok/s", 11, ".1f"), ("vs naive", 8, ".2f"),
           ("same", 7, "s")]


def _header() -> str:
    return "  ".join(f"{name:>{width}}" for name, width, _ in COLUMNS)


def _table_row(row: dict, num_prompts: int) -> str:
    naive = row.get("naive")
    values = [row["num_adapters"], row["popularity"], row["distinct_adapters"], row["lora"]["output_tokens_per_s"],
              row["lora"]["requests_per_s"], row["ratio_to_base"], row.get("ratio_to_n1"),
              naive["output_tokens_per_s"] if naive else None, row.get("ratio_to_naive"),
              f"{row['identical_to_naive']}/{num_prompts}" if naive else None]
    return "  ".join(f"{v:>{w}{f}}" if v is not None else f"{'-':>{w}}" for (_, w, f), v in zip(COLUMNS, values))


def format_table(report: dict) -> str:
    base = report["base"]
    lines = [f"{os.path.basename(report['model'])}: {report['num_prompts']} prompts, {report['max_tokens']} new "
             f"tokens each, max_loras {report['max_loras']}, max_cpu_loras {report['max_cpu_loras']}, "
             f"{report['threads']} thread(s); base model {base['output_tokens_per_s']:.1f} tok/s, "
             f"{base['requests_per_s']:.3f} req/s", _header()]
    lines += [_table_row(row, report["num_prompts"]) for row in report["results"]]
    for goal in report["goals"].values():
        value = "not run" if goal["value"] is None else f"{goal['value']:.2f}"
        verdict = {True: "met", False: "NOT met", None: "-"}[goal["met"]]
        sign = ">=" if goal["at_least"] else "<="
        lines.append(f"goal: {goal['what']}: {value} (target {sign} {goal['target']}): {verdict}")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for popularity, color in zip(report["popularities"], ("tab:blue", "tab:orange")):
        rows = [r for r in report["results"] if r["popularity"] == popularity]
        ns = [r["num_adapters"] for r in rows]
        ax.plot(ns, [r["lora"]["output_tokens_per_s"] for r in rows], marker="o", color=color,
                label=f"multi-LoRA, {popularity}")
        if all("naive" in r for r in rows):
            ax.plot(ns, [r["naive"]["output_tokens_per_s"] for r in rows], marker="s", linestyle="--", color=color,
                    label=f"naive merge/unmerge, {popularity}")
    ax.axhline(report["base"]["output_tokens_per_s"], color="gray", linestyle=":", label="base model, no LoRA")
    ax.set_xscale("log", base=2)
    ax.set_xticks(report["num_adapters"], [str(n) for n in report["num_adapters"]])
    ax.set_xlabel("adapters the requests are spread over")
    ax.set_ylabel("output tok/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Multi-LoRA serving, {os.path.basename(report['model'])}, {report['num_prompts']} requests, "
                 f"max_loras {report['max_loras']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
