"""Command line: foreseer generate | chat | serve | bench throughput|decode|serve|spec|seqsched|lora |
spec train-medusa|search-layers | lengths build|train|eval | lora train."""

from __future__ import annotations

import argparse
import json
import sys

from foreseer.bench.data import DEFAULT_DATASET
from foreseer.bench.seqsched import ROWS as SEQSCHED_ROWS
from foreseer.training.lengths.cli import add_lengths_parser
from foreseer.training.lora_adapters import add_arguments as add_lora_train_arguments
from foreseer.training.lora_adapters import main as lora_train_main
from foreseer.training.search_layers import add_arguments as add_search_layers_arguments
from foreseer.training.search_layers import main as search_layers_main
from foreseer.training.train_medusa import add_arguments as add_train_medusa_arguments
from foreseer.training.train_medusa import main as train_medusa_main


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--model", default="smollm2-135m-instruct", help="model name, GGUF file or HF directory")
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    group.add_argument("--weight-format", default="auto", choices=["auto", "float32"],
                       help="auto: weights stay as stored (GGUF blocks, F16, BF16; exact kernels); "
                            "float32: expanded at load (the reference)")
    group.add_argument("--device", default="auto")
    group.add_argument("--kv-cache-gib", type=float, default=None, help="KV cache size (default: a memory fraction)")
    group.add_argument("--kv-cache-memory-fraction", type=float, default=0.2)
    group.add_argument("--block-size", type=int, default=16)
    group.add_argument("--max-num-seqs", type=int, default=256)
    group.add_argument("--max-num-batched-tokens", type=int, default=2048)
    group.add_argument("--max-model-len", type=int, default=None)
    group.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority", "sjf", "mlfq", "s3"],
                       help="sjf and s3 predict answer lengths with the length probe at the end of each prefill")
    group.add_argument("--max-wait-s", type=float, default=10.0,
                       help="sjf, mlfq: a request waiting longer than this goes first (aging)")
    group.add_argument("--mlfq-levels", type=int, default=4)
    group.add_argument("--mlfq-base-quantum", type=int, default=16,
                       help="mlfq: decode iterations at the top level; each level below doubles it")
    group.add_argument("--mlfq-prefill-tokens-per-iteration", type=int, default=64,
                       help="mlfq skip-join: prompt tokens that cost one decode iteration")
    group.add_argument("--attention-backend", default="auto", choices=["auto", "cpu", "torch"])
    group.add_argument("--no-prefix-caching", action="store_true")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--speculative-config", type=json.loads, default=None,
                       help='speculative decoding as JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 5}\'')
    group.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters beside the base model")
    group.add_argument("--max-lora-rank", type=int, default=16, help="adapters of a higher rank are refused")
    group.add_argument("--max-loras", type=int, default=4,
                       help="device slots: distinct LoRA adapters in one batch")
    group.add_argument("--max-cpu-loras", type=int, default=None,
                       help="LoRA adapters cached in host memory (default: max(16, --max-loras))")
    group.add_argument("--lora-memory", default="separate", choices=["separate", "unified"],
                       help="unified: loaded adapters take their memory from the KV cache's blocks (S-LoRA)")
    group.add_argument("--length-predictor", default=None,
                       help="'probe' (shipped for the default model) or a probe directory: predict answer lengths")


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=256)
    group.add_argument("--temperature", type=float, default=0.0)
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--sampling-seed", type=int, default=None)
    group.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _make_llm(args: argparse.Namespace):
    from foreseer import LLM

    return LLM(
        args.model, dtype=args.dtype, weight_format=args.weight_format, device=args.device,
        kv_cache_gib=args.kv_cache_gib,
        kv_cache_memory_fraction=args.kv_cache_memory_fraction, block_size=args.block_size,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, scheduling_policy=args.scheduling_policy, max_wait_s=args.max_wait_s,
        mlfq_levels=args.mlfq_levels, mlfq_base_quantum=args.mlfq_base_quantum,
        mlfq_prefill_tokens_per_iteration=args.mlfq_prefill_tokens_per_iteration,
        attention_backend=args.attention_backend, enable_prefix_caching=not args.no_prefix_caching, seed=args.seed,
        speculative_config=args.speculative_config, length_predictor=args.length_predictor,
        enable_lora=args.enable_lora, max_lora_rank=args.max_lora_rank, max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras, lora_memory=args.lora_memory,
    )


def _sampling_params(args: argparse.Namespace):
    from foreseer import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, seed=args.sampling_seed, stop=args.stop)


def cmd_generate(args: argparse.Namespace) -> int:
    llm = _make_llm(args)
    params = _sampling_params(args)
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


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive chat that streams tokens as they are generated; an empty line or EOF ends it."""
    llm = _make_llm(args)
    params = _sampling_params(args)
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


def cmd_bench_throughput(args: argparse.Namespace) -> int:
    from foreseer.bench.throughput import ThroughputArgs, run

    llm = _make_llm(args)
    run(llm, ThroughputArgs(
        dataset=args.dataset, num_prompts=args.num_prompts, max_tokens=args.max_tokens,
        max_prompt_tokens=args.max_prompt_tokens, compare=tuple(args.compare), hf_batch_size=args.hf_batch_size,
        batching=args.batching, output_json=args.output_json,
    ))
    return 0


def cmd_bench_decode(args: argparse.Namespace) -> int:
    import torch

    from foreseer.bench.decode import DecodeBenchArgs, run

    if args.threads:
        torch.set_num_threads(args.threads)
    run(DecodeBenchArgs(model=args.model, contexts=tuple(args.contexts), new_tokens=args.new_tokens,
                        repeats=args.repeats, attention_contexts=tuple(args.attention_contexts),
                        llamacpp=not args.no_llamacpp, output_json=args.output_json))
    return 0


def cmd_bench_seqsched(args: argparse.Namespace) -> int:
    from foreseer.bench.seqsched import SeqschedBenchArgs, run

    def make_llm(policy: str):
        return _make_llm(argparse.Namespace(**{**vars(args), "scheduling_policy": policy}))

    run(make_llm, SeqschedBenchArgs(
        dataset=args.dataset, num_prompts=args.num_prompts, skip_prompts=args.skip_prompts,
        max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens, group_size=args.group_size,
        bin_width=args.bin_width, predictor=args.predictor, predictor_options=args.predictor_options, rows=args.rows,
        padded=args.padded, output_json=args.output_json,
    ))
    return 0


def cmd_bench_spec(args: argparse.Namespace) -> int:
    from foreseer.bench.spec import SpecBenchArgs, run

    # --speculative-config gives further options (e.g. prompt_lookup_max) to every method's engine.
    options = {k: v for k, v in (args.speculative_config or {}).items()
               if k not in ("method", "num_speculative_tokens")}

    def make_llm(spec: dict | None):
        return _make_llm(argparse.Namespace(**{**vars(args), "speculative_config": spec}))

    run(make_llm, SpecBenchArgs(
        dataset=args.dataset, methods=args.methods, num_speculative_tokens=args.num_speculative_tokens,
        batch_sizes=args.batch_sizes, num_prompts=args.num_prompts, batch_1_prompts=args.batch_1_prompts,
        max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens, repeats=args.repeats,
        control=not args.no_control, spec_options=options, output_json=args.output_json, plot=args.plot,
    ))
    return 0


def cmd_bench_lora(args: argparse.Namespace) -> int:
    from foreseer.bench.lora import LoRABenchArgs, run

    def make_llm(enable_lora: bool):
        return _make_llm(argparse.Namespace(**{**vars(args), "enable_lora": enable_lora}))

    run(make_llm, LoRABenchArgs(
        dataset=args.dataset, num_adapters=args.num_adapters, popularities=args.popularity,
        zipf_alpha=args.zipf_alpha, num_prompts=args.num_prompts, skip_prompts=args.skip_prompts,
        max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens, ranks=args.ranks,
        target_modules=args.target_modules, shipped=not args.no_shipped, adapter_dir=args.adapter_dir,
        adapter_seed=args.adapter_seed, naive=not args.no_naive, repeats=args.repeats, cold_start=args.cold_start,
        output_json=args.output_json, plot=args.plot,
    ))
    return 0


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


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from foreseer.engine.async_engine import AsyncLLMEngine
    from foreseer.server import create_app

    lora_modules = _lora_modules(args)  # before the model loads: a typo fails fast
    engine = AsyncLLMEngine(_make_llm(args).engine, max_waiting_requests=args.max_waiting_requests)
    app = create_app(engine, served_model_name=args.served_model_name, api_key=args.api_key,
                     lora_modules=lora_modules)
    # uvicorn drains on SIGTERM: it stops listening, lets running requests finish, then the app stops the engine.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from foreseer.bench.serve import ServeBenchArgs, run

    serve_args = ServeBenchArgs(
        base_url=args.base_url, model=args.model, dataset=args.dataset, num_prompts=args.num_prompts,
        request_rate=args.request_rate, max_concurrency=args.max_concurrency, max_tokens=args.max_tokens,
        output_len_from_dataset=args.output_len_from_dataset, tokenizer=args.tokenizer, seed=args.seed,
        api_key=args.api_key, output_json=args.output_json,
    )
    if args.policies:
        from foreseer.bench import serve_policies

        rates = args.request_rates or [args.request_rate]
        report = serve_policies.run(serve_policies.PolicyBenchArgs(
            policies=args.policies, request_rates=rates, server_args=args.server_args, serve=serve_args,
            output_json=args.output_json, plot=args.plot))
        return 0 if all(r["completed"] for r in report["results"]) else 1
    report = run(serve_args)
    return 0 if report["completed"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="foreseer", description="Foreseer LLM inference engine")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate answers to prompts")
    generate.add_argument("prompt", nargs="+", help="prompt(s); chat template applied unless --raw")
    generate.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    _add_engine_args(generate)
    _add_sampling_args(generate)
    generate.set_defaults(func=cmd_generate)

    chat = commands.add_parser("chat", help="interactive chat, streaming tokens")
    chat.add_argument("--system", default=None, help="system message")
    _add_engine_args(chat)
    _add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    throughput = bench.add_parser("throughput", help="offline throughput on ShareGPT prompts")
    throughput.add_argument("--dataset", default=DEFAULT_DATASET)
    throughput.add_argument("--num-prompts", type=int, default=200)
    throughput.add_argument("--max-prompt-tokens", type=int, default=512)
    throughput.add_argument("--max-tokens", type=int, default=256)
    throughput.add_argument("--compare", nargs="+", choices=["hf", "llamacpp", "float32"], default=[],
                            help="also run these baselines: transformers, llama.cpp (same GGUF and threads; the "
                                 "`bench` extra), this engine with float32 weights")
    throughput.add_argument("--hf-batch-size", type=int, default=32)
    throughput.add_argument("--batching", choices=["continuous", "static", "seqsched"], default="continuous",
                            help="how Foreseer batches the prompts (seqsched: sequence scheduling by predicted length)")
    throughput.add_argument("--output-json", default=None)
    _add_engine_args(throughput)
    throughput.set_defaults(func=cmd_bench_throughput)

    decode = bench.add_parser("decode", help="batch-1 CPU decode against llama.cpp (same GGUF, same threads), "
                                             "split-KV attention, machine limits, memory")
    decode.add_argument("--model", default="smollm2-135m-instruct")
    decode.add_argument("--contexts", type=int, nargs="+", default=[128, 2048], help="prompt lengths to decode after")
    decode.add_argument("--new-tokens", type=int, default=128)
    decode.add_argument("--repeats", type=int, default=3, help="runs of each engine, in turns; the fastest is kept")
    decode.add_argument("--attention-contexts", type=int, nargs="+", default=[4096, 8192])
    decode.add_argument("--threads", type=int, default=None, help="threads for both engines (default: torch's)")
    decode.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp (no `bench` extra installed)")
    decode.add_argument("--output-json", default=None)
    decode.set_defaults(func=cmd_bench_decode)

    spec = bench.add_parser("spec", help="speculative decoding against none, by batch size, on two prompt sets")
    spec.add_argument("--dataset", default=DEFAULT_DATASET)
    spec.add_argument("--methods", nargs="+", default=None, help="draft methods (default: all)")
    spec.add_argument("--num-speculative-tokens", type=int, default=5)
    spec.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], help="requests in flight together")
    spec.add_argument("--num-prompts", type=int, default=32, help="prompts per set")
    spec.add_argument("--batch-1-prompts", type=int, default=8, help="prompts per set at batch size 1")
    spec.add_argument("--max-prompt-tokens", type=int, default=512)
    spec.add_argument("--max-tokens", type=int, default=128)
    spec.add_argument("--repeats", type=int, default=1,
                      help="runs of the prompts per engine and batch size (a fresh prefix cache each); the fastest "
                           "counts")
    spec.add_argument("--no-control", action="store_true",
                      help="skip the second engine without speculation that shows the run's noise")
    spec.add_argument("--output-json", default=None)
    spec.add_argument("--plot", default=None, help="PNG of the speedup against batch size")
    _add_engine_args(spec)
    spec.set_defaults(func=cmd_bench_spec)

    seqsched = bench.add_parser("seqsched", help="sequence scheduling ablation: static, binned, FCR, VBS, oracle")
    seqsched.add_argument("--dataset", default=DEFAULT_DATASET)
    seqsched.add_argument("--num-prompts", type=int, default=512)
    seqsched.add_argument("--skip-prompts", type=int, default=0,
                          help="start at this prompt (the shipped probe was trained on prompts 2000-2315)")
    seqsched.add_argument("--max-prompt-tokens", type=int, default=512)
    seqsched.add_argument("--max-tokens", type=int, default=512)
    seqsched.add_argument("--group-size", type=int, default=256, help="queries predicted and sorted together")
    seqsched.add_argument("--bin-width", type=int, default=50, help="tokens of predicted length per bin")
    seqsched.add_argument("--predictor", default="probe", help="length predictor (probe, pia, constant)")
    seqsched.add_argument("--predictor-options", type=json.loads, default=None,
                          help='JSON options of the predictor (default for the probe: \'{"quantile": 0.9}\')')
    seqsched.add_argument("--padded", action="store_true",
                          help="static batches decode padding until their last member ends (the paper's setting)")
    seqsched.add_argument("--rows", nargs="+", default=list(SEQSCHED_ROWS), choices=SEQSCHED_ROWS,
                          help="schedules to run (continuous always runs first: the reference)")
    seqsched.add_argument("--output-json", default=None)
    _add_engine_args(seqsched)
    seqsched.set_defaults(func=cmd_bench_seqsched)

    from foreseer.bench.lora import POPULARITIES as LORA_POPULARITIES
    from foreseer.lora.adapter import SUPPORTED_MODULES as LORA_MODULES

    bench_lora = bench.add_parser("lora", help="multi-LoRA throughput over N adapters, against the base model and "
                                               "merging adapters one at a time")
    bench_lora.add_argument("--dataset", default=DEFAULT_DATASET)
    bench_lora.add_argument("--num-adapters", type=int, nargs="+", default=[1, 8, 64, 512],
                            help="adapters the requests are spread over, one cell each")
    bench_lora.add_argument("--popularity", nargs="+", default=list(LORA_POPULARITIES), choices=LORA_POPULARITIES,
                            help="how requests pick their adapter")
    bench_lora.add_argument("--zipf-alpha", type=float, default=1.0, help="adapter k drawn with weight 1/(k+1)^alpha")
    bench_lora.add_argument("--num-prompts", type=int, default=128)
    bench_lora.add_argument("--skip-prompts", type=int, default=0)
    bench_lora.add_argument("--max-prompt-tokens", type=int, default=256)
    bench_lora.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (EOS ignored)")
    bench_lora.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64],
                            help="random adapters' ranks (one drawn per adapter)")
    bench_lora.add_argument("--target-modules", nargs="+", default=list(LORA_MODULES), choices=LORA_MODULES,
                            help="projections the random adapters adapt")
    bench_lora.add_argument("--no-shipped", action="store_true",
                            help="random adapters only (default: the shipped real ones first, default model only)")
    bench_lora.add_argument("--adapter-dir", default=None,
                            help="keep the random adapters here (default: a temporary directory, removed)")
    bench_lora.add_argument("--adapter-seed", type=int, default=0,
                            help="seed of the random adapters and of which adapter each request gets")
    bench_lora.add_argument("--no-naive", action="store_true", help="skip the merge-one-at-a-time baseline")
    bench_lora.add_argument("--repeats", type=int, default=1,
                            help="rounds of each cell's base, multi-LoRA and naive runs; each one's fastest counts")
    bench_lora.add_argument("--cold-start", action="store_true",
                            help="time the adapters' disk reads too (default: the cell's adapters start in host "
                                 "memory, as in S-LoRA's experiments)")
    bench_lora.add_argument("--output-json", default=None)
    bench_lora.add_argument("--plot", default=None, help="PNG of tok/s against the number of adapters")
    _add_engine_args(bench_lora)
    bench_lora.set_defaults(func=cmd_bench_lora, max_lora_rank=64, max_loras=8)

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    serve.add_argument("--max-waiting-requests", type=int, default=256,
                       help="sequences that may wait for the engine; beyond, requests get 503 with Retry-After")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer <key>' on /v1 endpoints")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--lora-modules", nargs="+", type=lora_module, default=None, metavar="NAME=PATH",
                       help="LoRA adapters served by name (the request's `model` field), as name=path or vLLM's "
                            '\'{"name": ..., "path": ...}\'; needs --enable-lora')
    _add_engine_args(serve)
    serve.set_defaults(func=cmd_serve)

    bench_serve = bench.add_parser("serve", help="online serving benchmark against an OpenAI-compatible server")
    bench_serve.add_argument("--base-url", default="http://127.0.0.1:8000")
    bench_serve.add_argument("--model", default=None, help="model name to request (default: the server's first)")
    bench_serve.add_argument("--dataset", default=DEFAULT_DATASET)
    bench_serve.add_argument("--num-prompts", type=int, default=100)
    bench_serve.add_argument("--request-rate", type=float, default=float("inf"),
                             help="requests per second, Poisson arrivals; inf sends all at once")
    bench_serve.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    bench_serve.add_argument("--max-tokens", type=int, default=256)
    bench_serve.add_argument("--output-len-from-dataset", action="store_true",
                             help="each request's max_tokens: its dataset answer's length (at most --max-tokens)")
    bench_serve.add_argument("--tokenizer", default="smollm2-135m-instruct",
                             help="model whose tokenizer counts the dataset answers' tokens")
    bench_serve.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    bench_serve.add_argument("--api-key", default=None)
    bench_serve.add_argument("--output-json", default=None)
    policies = bench_serve.add_argument_group("scheduling policies: start one `foreseer serve` per policy")
    policies.add_argument("--policies", nargs="+", default=None,
                          help="bench a server started with each of these --scheduling-policy values")
    policies.add_argument("--request-rates", type=float, nargs="+", default=None,
                          help="request rates to bench each policy at (default: --request-rate)")
    policies.add_argument("--server-args", default="",
                          help="engine arguments of every server, e.g. '--max-num-seqs 8 --kv-cache-gib 1'")
    policies.add_argument("--plot", default=None, help="PNG of latency against request rate per policy")
    bench_serve.set_defaults(func=cmd_bench_serve)

    spec_tools = commands.add_parser("spec", help="speculative decoding tools").add_subparsers(dest="spec",
                                                                                              required=True)
    train_medusa = spec_tools.add_parser("train-medusa", help="train Medusa heads on the model's own answers")
    add_train_medusa_arguments(train_medusa)
    train_medusa.set_defaults(func=train_medusa_main)
    search = spec_tools.add_parser("search-layers", help="choose the layers layer_skip skips, by measured tok/s")
    add_search_layers_arguments(search)
    search.set_defaults(func=search_layers_main)

    add_lengths_parser(commands)

    lora_tools = commands.add_parser("lora", help="LoRA adapter tools").add_subparsers(dest="lora", required=True)
    lora_train = lora_tools.add_parser("train", help="train the small behaviour adapters (uppercase, json, "
                                                     "one_sentence) on the model's own answers")
    add_lora_train_arguments(lora_train)
    lora_train.set_defaults(func=lora_train_main)
    return parser


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
