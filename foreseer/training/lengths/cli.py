"""Command line: foreseer lengths build | train | eval."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import sys
import time

from foreseer.bench.data import DEFAULT_DATASET
from foreseer.commands import add_engine_arguments, make_llm
from foreseer.lengths.remaining import HeadTrainConfig
from foreseer.training.lengths.dataset import MAX_TOKENS, TEMPERATURES
from foreseer.training.lengths.traces import TraceConfig

AT_TOKENS = 64  # the refined prediction is scored after this many generated tokens (the goal's point)

DEFAULT_VAL_FRACTION = 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`foreseer lengths build|train|eval`."""
    commands = parser.add_subparsers(dest="lengths_command", required=True, help="the step")

    build = commands.add_parser("build", help="generate answers to ShareGPT prompts and record their lengths")
    build.add_argument("--output", required=True, help="JSONL file; records already in it are kept (resume)")
    build.add_argument("--dataset", default=DEFAULT_DATASET, help="ShareGPT-format JSON file of the prompts")
    build.add_argument("--num-prompts", type=int, default=1000, help="ShareGPT prompts to take (exact repeats dropped)")
    build.add_argument("--skip-prompts", type=int, default=2000,
                       help="dataset prompts to skip first (the benchmarks use the first ones)")
    build.add_argument("--max-prompt-tokens", type=int, default=512, help="longer questions are shortened to fit")
    build.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="answer length limit (the longest label)")
    build.add_argument("--temperatures", type=float, nargs="+", default=list(TEMPERATURES),
                       help="one answer per prompt at each of these temperatures")
    build.add_argument("--max-prompts-in-flight", type=int, default=64,
                       help="prompts generating together (each with one sequence per temperature)")
    build.add_argument("--sampling-seed", type=int, default=0, help="seed of the answers' sampling")
    build.set_defaults(lengths_main=cmd_build)

    traces = commands.add_parser("traces", help="generate answers and record the remaining-length head's training "
                                 "states at every position (resumable; shards missing beside a kept JSONL are "
                                 "recomputed from its answers first)")
    traces.add_argument("--output", required=True, help="JSONL file of records; shards of states go beside it")
    traces.add_argument("--dataset", default=DEFAULT_DATASET, help="ShareGPT-format JSON file of the prompts")
    traces.add_argument("--num-prompts", type=int, default=2400, help="ShareGPT conversations to take")
    traces.add_argument("--skip-prompts", type=int, default=2000,
                        help="dataset conversations to skip first (the benchmarks use the first ones)")
    traces.add_argument("--layers", type=int, nargs="+", default=list(TraceConfig.layers),
                        help="decoder layers (1-based) whose output is recorded")
    traces.add_argument("--max-tokens-cap", type=int, default=TraceConfig.max_tokens_cap,
                        help="each answer's max_tokens is its ShareGPT answer's length, at most this")
    traces.add_argument("--max-prompt-tokens", type=int, default=TraceConfig.max_prompt_tokens,
                        help="longer questions are shortened to fit")
    traces.add_argument("--max-prompts-in-flight", type=int, default=TraceConfig.max_prompts_in_flight,
                        help="answers generating together")
    traces.set_defaults(lengths_main=cmd_traces)

    train = commands.add_parser("train", help="train a predictor on the train split")
    train.add_argument("--predictor", choices=["remaining", "probe", "lora"], default="remaining",
                       help="remaining: the remaining-length head on a layer's output, from traces; probe: a head on "
                       "the prompt's hidden state; lora: an adapter that makes the model state its length class")
    train.add_argument("--data", required=True,
                       help="JSONL file written by `lengths traces` (remaining, lora) or `lengths build` (probe)")
    train.add_argument("--output-dir", default=None, help="default: the shipped directory of --model's predictor")
    train.add_argument("--train-seed", type=int, default=0, help="seed of the initialization and the batches")
    train.add_argument("--output-json", default=None, help="write the training record to this JSON file")
    probe = train.add_argument_group("probe")
    probe.add_argument("--kind", choices=["regression", "buckets"], default="buckets",
                       help="regression: predict the length; buckets: classify it into length buckets")
    probe.add_argument("--hidden-dim", type=int, default=128, help="MLP width; 0: a linear head")
    probe.add_argument("--num-buckets", type=int, default=16, help="buckets: length classes")
    probe.add_argument("--epochs", type=int, default=300, help="full-batch AdamW steps")
    probe.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    probe.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay")
    remaining = train.add_argument_group("remaining")
    remaining.add_argument("--layers", type=int, nargs="+", default=None,
                           help="recorded layers to choose from on the dev prompts (default: all recorded)")
    remaining.add_argument("--head-epochs", type=int, default=HeadTrainConfig.epochs, help="passes over the positions")
    remaining.add_argument("--head-dim", type=int, default=256, help="MLP width")
    lora = train.add_argument_group("lora (Hugging Face transformers + peft, fp32; then validated through the engine)")
    lora.add_argument("--lora-rank", type=int, default=8, help="the adapter's rank")
    lora.add_argument("--lora-alpha", type=int, default=16, help="the adapter's scale numerator (alpha / rank)")
    lora.add_argument("--lora-target-modules", nargs="+", default=["q_proj", "v_proj"],
                      help="projections the adapter adapts")
    lora.add_argument("--lora-epochs", type=int, default=2, help="passes over the train split")
    lora.add_argument("--lora-lr", type=float, default=1e-3, help="learning rate")
    lora.add_argument("--lora-batch-size", type=int, default=8, help="examples per step, batched by similar length")
    lora.add_argument("--limit", type=int, default=None, help="train on the first N train records (a trial run)")
    train.set_defaults(lengths_main=cmd_train)

    compare = commands.add_parser("compare", help="score length predictors on the validation prompts of traces: at "
                                  "the end of the prefill and after --at-tokens generated tokens")
    compare.add_argument("--data", required=True, help="JSONL file written by `lengths traces`")
    compare.add_argument("--predictors", nargs="+", default=["remaining", "probe", "max_tokens", "oracle"],
                         help="remaining, probe, pia, lora (registered predictors), max_tokens (the cap alone), "
                         "oracle (the realized lengths)")
    compare.add_argument("--at-tokens", type=int, default=AT_TOKENS,
                         help="score the refined prediction after this many generated tokens")
    compare.add_argument("--limit", type=int, default=None, help="score the first N validation prompts")
    compare.add_argument("--output-json", default=None, help="write the table to this JSON file")
    compare.set_defaults(lengths_main=cmd_compare)

    evaluate = commands.add_parser("eval", help="score a predictor on the validation split")
    evaluate.add_argument("--predictor", required=True, help="a registered predictor: pia, lora, probe, constant")
    evaluate.add_argument("--data", required=True, help="JSONL file written by `lengths build`")
    evaluate.add_argument("--weights-dir", default=None,
                          help="probe, lora: the probe or adapter directory (default: the shipped one of --model)")
    evaluate.add_argument("--default-length", type=int, default=None,
                          help="pia's and lora's fallback, constant's value (default: the train split's median label)")
    evaluate.add_argument("--limit", type=int, default=None, help="evaluate on the first N validation prompts")
    evaluate.add_argument("--output-json", default=None, help="write the report to this JSON file")
    evaluate.set_defaults(lengths_main=cmd_eval)

    for sub in (build, traces, train, compare, evaluate):
        sub.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                         help="share of prompts in the validation split (by a hash of the prompt id)")
        sub.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
        add_engine_arguments(sub)


def main(args: argparse.Namespace) -> int:
    return args.lengths_main(args)


def _setup(args: argparse.Namespace):
    """Thread count first (it must precede any parallel work), then the engine."""
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return make_llm(args)


def cmd_build(args: argparse.Namespace) -> int:
    from foreseer.training.lengths.dataset import BuildConfig, build, load_records, sharegpt_questions, split_records

    config = BuildConfig(tuple(args.temperatures), args.max_tokens, args.max_prompt_tokens,
                         args.max_prompts_in_flight, args.sampling_seed)
    questions = sharegpt_questions(args.dataset, args.num_prompts, args.skip_prompts)
    llm = _setup(args)
    summary = build(llm, questions, args.output, config)
    train, val = split_records(load_records(args.output), args.val_fraction)
    print(json.dumps({**dataclasses.asdict(summary), "train": len(train), "val": len(val)}, indent=2))
    return 0 if not summary.num_failed else 1


def cmd_traces(args: argparse.Namespace) -> int:
    from foreseer.training.lengths.traces import build_traces, restore_trace_states, sharegpt_trace_prompts

    config = TraceConfig(tuple(args.layers), args.max_tokens_cap, args.max_prompt_tokens, args.max_prompts_in_flight)
    llm = _setup(args)
    if os.path.isfile(args.output):
        print(json.dumps(restore_trace_states(llm, args.output, config.layers), indent=2))
    prompts = sharegpt_trace_prompts(llm.engine.tokenizer, args.dataset, args.num_prompts, args.skip_prompts,
                                     config.max_tokens_cap)
    summary = build_traces(llm, prompts, args.output, config)
    print(json.dumps(summary, indent=2))
    return 0 if not summary["num_failed"] else 1


def _load_split(args: argparse.Namespace):
    from foreseer.training.lengths.dataset import load_records, split_records

    train, val = split_records(load_records(args.data), args.val_fraction)
    if len(train) < 2 or not val:
        raise ValueError(f"{args.data} has {len(train)} train and {len(val)} validation records; too few")
    return train, val


def cmd_train(args: argparse.Namespace) -> int:
    if args.predictor == "lora":
        return _train_lora(args)
    if args.predictor == "remaining":
        return _train_remaining(args)
    import torch

    from foreseer.lengths.features import prompt_hidden_states
    from foreseer.lengths.predictors import ProbePredictor
    from foreseer.lengths.probe import ProbeConfig, TrainConfig, default_probe_dir, train_probe
    from foreseer.training.lengths.evaluate import evaluate, generation_ms_per_answer, write_json

    train, val = _load_split(args)
    output_dir = args.output_dir or default_probe_dir(args.model)
    llm = _setup(args)
    start = time.perf_counter()
    hidden = prompt_hidden_states(llm.engine, [r.prompt_token_ids for r in train])
    features_s = time.perf_counter() - start
    config = ProbeConfig(hidden_size=hidden.shape[1], kind=args.kind, hidden_dim=args.hidden_dim,
                         num_buckets=args.num_buckets, max_length=max(r.max_tokens for r in train),
                         base_model=args.model)
    train_config = TrainConfig(args.epochs, args.lr, args.weight_decay, args.train_seed)
    start = time.perf_counter()
    head = train_probe(config, hidden, torch.tensor([r.prompt_tokens for r in train]),
                       torch.tensor([r.max_length for r in train]), train_config)
    train_s = time.perf_counter() - start
    report = evaluate(ProbePredictor(llm, head), val, generation_ms_per_answer(train + val))
    head.config.training = {
        "command": _command_line(),
        "dataset": _dataset_summary(args, train, val),
        "train": dataclasses.asdict(train_config),
        "val_metrics": dataclasses.asdict(report.metrics),
        "time_s": {"train_features": round(features_s, 1), "train": round(train_s, 1)},
    }
    head.save(output_dir)
    print(json.dumps({"output_dir": output_dir, **head.config.training}, indent=2))
    if args.output_json:
        write_json(dataclasses.asdict(head.config), args.output_json)
    return 0


def _trace_split(args: argparse.Namespace):
    from foreseer.training.lengths.remaining import split_traces
    from foreseer.training.lengths.traces import load_trace_records

    train, dev, val = split_traces(load_trace_records(args.data), args.val_fraction)
    if len(train) < 2 or not dev or not val:
        raise ValueError(f"{args.data} has {len(train)} train, {len(dev)} dev and {len(val)} validation prompts; "
                         "too few")
    return train, dev, val


def _recorded_layers(args: argparse.Namespace, record) -> list[int]:
    from safetensors import safe_open

    with safe_open(os.path.join(os.path.dirname(os.path.abspath(args.data)), record.shard), "pt") as f:
        return sorted(int(name.removeprefix("layer_")) for name in f.keys())


def _train_remaining(args: argparse.Namespace) -> int:
    """Choose the layer on the dev prompts, train on the train prompts, score on the validation prompts."""
    import torch

    from foreseer.lengths.remaining import default_head_dir
    from foreseer.training.lengths.evaluate import write_json
    from foreseer.training.lengths.remaining import choose_layer, fit_head, load_examples, score_head

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    train, dev, val = _trace_split(args)
    layers = args.layers or _recorded_layers(args, train[0])
    hidden_size = load_examples(args.data, train[:1], layers[0]).hidden.shape[1]
    config = HeadTrainConfig(epochs=args.head_epochs, seed=args.train_seed)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    start = time.perf_counter()
    layer, dev_scores = (layers[0], {}) if len(layers) == 1 else choose_layer(
        args.data, train, dev, layers, hidden_size, config, args.head_dim, log)
    choose_s = time.perf_counter() - start
    start = time.perf_counter()
    head = fit_head(args.data, train + dev, layer, hidden_size, config, args.head_dim, args.model)
    train_s = time.perf_counter() - start
    scores = score_head(head, val, load_examples(args.data, val, layer))
    positions = sum(r.output_length for r in train + dev)
    head.config.training = {
        "command": _command_line(),
        "dataset": {"path": os.path.basename(args.data), "train_prompts": len(train) + len(dev),
                    "dev_prompts": len(dev), "val_prompts": len(val), "train_positions": positions,
                    "censored_share": sum(r.censored for r in train + dev + val) / len(train + dev + val),
                    "generation_s": round(sum(r.generation_s for r in train + dev + val), 1)},
        "train": dataclasses.asdict(config), "layer": layer, "dev_scores_by_layer": dev_scores,
        "val_scores": dataclasses.asdict(scores),
        "time_s": {"choose_layer": round(choose_s, 1), "train": round(train_s, 1)},
    }
    output_dir = args.output_dir or default_head_dir(args.model)
    head.save(output_dir)
    print(json.dumps({"output_dir": output_dir, **head.config.training}, indent=2))
    if args.output_json:
        write_json(dataclasses.asdict(head.config), args.output_json)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Each predictor's scores on the validation prompts, and its cost per request."""
    from foreseer.lengths.predictors import create_predictor
    from foreseer.training.lengths.evaluate import write_json
    from foreseer.training.lengths.remaining import score_predictions

    _, _, val = _trace_split(args)
    val = val[:args.limit] if args.limit is not None else val
    if "lora" in args.predictors:
        from foreseer.training.lengths.lora import default_adapter_dir

        _enable_lora(args, _adapter_rank(default_adapter_dir(args.model)))
    llm = _setup(args)
    at = args.at_tokens
    prompts = [r.prompt_token_ids for r in val]
    outputs = _answer_prefixes(llm, val, at)
    rows = {}
    for name in args.predictors:
        start = time.perf_counter()
        refined = None
        if name == "oracle":
            prefill = [r.output_length for r in val]
        elif name == "max_tokens":
            prefill = [r.max_tokens for r in val]
        else:
            predictor = create_predictor(name, llm)
            prefill = predictor.predict(prompts)
            long = [i for i, r in enumerate(val) if r.output_length > at]
            refined = predictor.refine([prompts[i] for i in long], [outputs[i] for i in long])
            refined = None if refined is None else dict(zip(long, refined))
        seconds = time.perf_counter() - start
        # A prompt-only prediction counts down; a refined one is read again after `at` tokens.
        later = _counted_down(prefill, val, at) if refined is None else [
            None if r.output_length <= at else max(min(refined[i], r.max_tokens) - at, 1) for i, r in enumerate(val)]
        rows[name] = {**score_predictions(val, prefill, at, later),
                      "ms_per_request": round(1e3 * seconds / len(val), 2)}
        print(json.dumps({name: rows[name]}), flush=True)
    table = {"command": _command_line(), "val_prompts": len(val), "rows": rows}
    if args.output_json:
        write_json(table, args.output_json)
    return 0


def _answer_prefixes(llm, records, count: int) -> list[list[int]]:
    """The first `count` tokens of each recorded answer: as recorded, or generated again (greedy, as recorded)
    for records written before answers were."""
    from foreseer.sampling_params import SamplingParams

    missing = [r for r in records if len(r.output_token_ids) != r.output_length]
    outputs = llm.generate([r.prompt_token_ids for r in missing], SamplingParams(temperature=0, max_tokens=count),
                           use_tqdm=False) if missing else []
    generated = {r.id: o.outputs[0].token_ids for r, o in zip(missing, outputs)}
    return [list(generated[r.id]) if r.id in generated else r.output_token_ids[:count] for r in records]


def _train_lora(args: argparse.Namespace) -> int:
    """Train the adapter on the train prompts of traces (transformers, the engine's own model source, fp32), then
    score it on their validation prompts through the engine, which serves it as a LoRA adapter, as `lengths
    compare` scores every predictor; the record lands beside the adapter."""
    from foreseer.bench.throughput import load_hf_model
    from foreseer.lengths.predictors import LoraPredictor
    from foreseer.training.lengths.evaluate import write_json
    from foreseer.training.lengths.lora import (
        LoraTrainConfig,
        default_adapter_dir,
        labels_of,
        train_length_lora,
        write_training_record,
    )
    from foreseer.training.lengths.remaining import score_predictions

    train, dev, val = _trace_split(args)
    train = train + dev  # no model choice here needs the dev prompts
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    trained_on = train[:args.limit] if args.limit is not None else train
    output_dir = args.output_dir or default_adapter_dir(args.model)
    config = LoraTrainConfig(rank=args.lora_rank, alpha=args.lora_alpha, target_modules=tuple(args.lora_target_modules),
                             epochs=args.lora_epochs, lr=args.lora_lr, batch_size=args.lora_batch_size,
                             seed=args.train_seed, base_model=args.model)
    _enable_lora(args, args.lora_rank)
    llm = _setup(args)
    config.extra = {"command": _command_line(), "dataset": {
        "path": os.path.basename(args.data), "train_prompts": len(train), "trained_on": len(trained_on),
        "val_prompts": len(val)}}
    hf_model = load_hf_model(llm)
    record = train_length_lora(hf_model, llm.tokenizer, labels_of(trained_on), output_dir, config,
                               log=lambda line: print(line, file=sys.stderr, flush=True))
    del hf_model
    predictor = LoraPredictor(llm, output_dir)
    start = time.perf_counter()
    prefill = predictor.predict([r.prompt_token_ids for r in val])
    seconds = time.perf_counter() - start
    record["val_scores"] = {**score_predictions(val, prefill, AT_TOKENS, _counted_down(prefill, val, AT_TOKENS)),
                            "ms_per_request": round(1e3 * seconds / len(val), 2),
                            "no_letter_share": sum(p is None for p in predictor.last_probabilities) / len(val)}
    write_training_record(output_dir, record)
    print(json.dumps({"output_dir": output_dir, **record}, indent=2))
    if args.output_json:
        write_json(record, args.output_json)
    return 0


def _counted_down(prefill: list, records: list, at: int) -> list:
    """A prompt-only prediction's remaining length after `at` tokens: counted down, within max_tokens (None for
    answers not longer than `at`)."""
    return [None if r.output_length <= at else max(min(max(p, at + 1), r.max_tokens) - at, 1)
            for p, r in zip(prefill, records)]


def _enable_lora(args: argparse.Namespace, rank: int) -> None:
    """The engine for the lora predictor: LoRA on, with room for the adapter's rank."""
    args.enable_lora = True
    args.max_lora_rank = max(args.max_lora_rank, rank)


def _dataset_summary(args: argparse.Namespace, train: list, val: list) -> dict:
    records = train + val
    return {
        "path": os.path.basename(args.data), "records": len(records), "train": len(train), "val": len(val),
        "val_fraction": args.val_fraction, "prompt_tokens": sum(r.prompt_tokens for r in records),
        "answer_tokens": sum(sum(r.lengths) for r in records), "temperatures": records[0].temperatures,
        "max_tokens": records[0].max_tokens, "generation_s": round(sum(r.generation_s for r in records), 1),
    }


def cmd_eval(args: argparse.Namespace) -> int:
    from foreseer.lengths.predictors import PREDICTORS, create_predictor
    from foreseer.training.lengths.evaluate import evaluate, generation_ms_per_answer, write_json
    from foreseer.training.lengths.lora import default_adapter_dir

    if args.predictor not in PREDICTORS:
        raise ValueError(f"unknown length predictor {args.predictor!r}; available: {', '.join(sorted(PREDICTORS))}")
    train, val = _load_split(args)
    if args.limit is not None:
        val = val[:args.limit]
    default = args.default_length or round(statistics.median(r.max_length for r in train))
    options = {"pia": {"default": default}, "constant": {"value": default},
               "probe": {"weights_dir": args.weights_dir},
               "lora": {"weights_dir": args.weights_dir, "default": default}}.get(args.predictor, {})
    if args.predictor == "lora":
        _enable_lora(args, _adapter_rank(args.weights_dir or default_adapter_dir(args.model)))
    llm = _setup(args)
    predictor = create_predictor(args.predictor, llm, **options)
    report = evaluate(predictor, val, generation_ms_per_answer(train + val))
    report.extra = {"command": _command_line(), "dataset": _dataset_summary(args, train, val), **options,
                    **_predictor_extra(predictor, val, report.generation_ms)}
    summary = {k: v for k, v in dataclasses.asdict(report).items() if k != "items"}
    print(json.dumps(summary, indent=2))
    if args.output_json:
        write_json(report, args.output_json)
    return 0


def _adapter_rank(adapter_dir: str) -> int:
    """The rank in an adapter's config (0 if unreadable: the engine then says what is wrong with it)."""
    try:
        with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
            rank = json.load(f).get("r", 0)
    except (OSError, ValueError):
        return 0
    return rank if isinstance(rank, int) else 0


def _predictor_extra(predictor, val: list, generation_ms: float) -> dict:
    """PiA and LoRA: how often the model stated no usable length (LoRA: no class letter). Probe: the head's own
    cost, the only one at serving time (the engine's prefill computes the hidden states anyway)."""
    from foreseer.lengths.features import prompt_hidden_states
    from foreseer.lengths.predictors import LoraPredictor, PiaPredictor, ProbePredictor, parse_pia_length

    if isinstance(predictor, PiaPredictor):
        failed = sum(parse_pia_length(text) is None for text in predictor.last_texts)
        return {"fallback_share": failed / len(val), "sample_answers": predictor.last_texts[:10]}
    if isinstance(predictor, LoraPredictor):
        failed = sum(p is None for p in predictor.last_probabilities)
        return {"fallback_share": failed / len(val), "adapter_dir": predictor.adapter_dir,
                "sample_probabilities": [None if p is None else [round(x, 3) for x in p.tolist()]
                                         for p in predictor.last_probabilities[:10]]}
    if isinstance(predictor, ProbePredictor):
        hidden = prompt_hidden_states(predictor.llm.engine, [r.prompt_token_ids for r in val])
        start = time.perf_counter()
        predictor.predict_from_hidden(hidden, [r.prompt_tokens for r in val])
        head_ms = 1e3 * (time.perf_counter() - start) / len(val)
        return {"head_ms_per_request": head_ms, "head_share": head_ms / generation_ms}
    return {}


def _command_line() -> str:
    """As `foreseer lengths ...`, whether run through foreseer's CLI or this module."""
    argv = sys.argv[1:]
    return "foreseer lengths " + " ".join(shlex.quote(a) for a in argv[argv[:1] == ["lengths"]:])
