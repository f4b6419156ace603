"""Train Medusa-1 heads (foreseer/spec/medusa.py) for a model on its own greedy answers (self-distillation).

1. The engine answers chat-templated ShareGPT prompts greedily (prompts from `skip_prompts` on, so that the
   benchmarks' first prompts are not training data).
2. Hugging Face transformers, on the same weights, computes the final (post-norm) hidden states of
   prompt + answer with the backbone frozen; only positions whose next token is an answer token are kept.
3. The heads are trained on those cached hidden states with the lm_head frozen: head i at position t against
   token t + i + 2, cross-entropy over the full vocabulary, AdamW with warm-up and cosine decay.
4. Per-head top-1 / top-5 accuracy on held-out prompts (the last `eval_prompts`), before and after training.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from foreseer.bench.data import DEFAULT_DATASET, chat_prompt_ids, load_sharegpt_questions
from foreseer.bench.report import write_json
from foreseer.commands import args_dataclass
from foreseer.spec.medusa import MedusaConfig, MedusaHeads

IGNORE = -100  # cross_entropy's ignore_index: no target (past the end of the answer)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TrainMedusaArgs:
    model: str = "smollm2-135m-instruct"
    dataset: str = DEFAULT_DATASET
    num_prompts: int = 400  # answered prompts in all, held-out ones included
    skip_prompts: int = 1000
    eval_prompts: int = 32
    max_prompt_tokens: int = 256
    max_tokens: int = 192
    num_heads: int = 4
    epochs: int = 3
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 256  # positions per optimizer step
    # The frozen lm_head matmul dominates training; bfloat16 makes it ~3x faster on CPUs with AMX.
    # Hidden states and evaluation always run in float32.
    logits_dtype: str = "bfloat16"
    seed: int = 0
    kv_cache_gib: float | None = None  # the generation engine's KV cache (default: its memory fraction)
    output_dir: str | None = None  # default: ./<model name>-medusa
    output_json: str | None = None
    command: str = ""  # recorded in the heads' config


@dataclass
class HeadData:
    """Positions of answers: final hidden state, the token after it, and each head's target (or IGNORE)."""

    hidden: torch.Tensor  # [M, H] float32
    next_tokens: torch.Tensor  # [M]
    targets: torch.Tensor  # [M, num_heads]

    def __len__(self) -> int:
        return self.hidden.shape[0]


def load_backbone(model: str):
    """The model in transformers (float32, eval mode), from the same GGUF file or HF directory the engine uses."""
    from transformers import AutoModelForCausalLM

    from foreseer.models.loader import resolve_model

    source = resolve_model(model)
    if source.is_gguf:
        hf = AutoModelForCausalLM.from_pretrained(source.directory, gguf_file=os.path.basename(source.path),
                                                  dtype=torch.float32)
    else:
        hf = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
    return hf.eval().requires_grad_(False)


@torch.inference_mode()
def answer_hidden_states(hf_model, prompt_ids: list[int], answer_ids: list[int]) -> torch.Tensor:
    """Final hidden states [len(answer), H] at the positions whose next token is answer[j] (the last prompt
    token .. the second-to-last answer token)."""
    ids = torch.tensor([list(prompt_ids) + list(answer_ids)])
    # logits_to_keep=1: the full-vocabulary logits of the last position only, to check what hidden_states[-1] is.
    out = hf_model(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1][0]
    lm_head = hf_model.get_output_embeddings().weight
    if not torch.allclose(hidden[-1] @ lm_head.t(), out.logits[0, -1], rtol=1e-4, atol=1e-4):
        raise RuntimeError("transformers' last hidden state is not the lm_head's input (the final norm's output)")
    return hidden[len(prompt_ids) - 1:-1].float().clone()


def head_targets(answer_ids: list[int], num_heads: int) -> torch.Tensor:
    """[len(answer), num_heads]: at answer position j (whose next token is answer[j]), head i's target is
    answer[j + i + 1], the token i + 2 after the position's own token; IGNORE past the end."""
    answer = torch.tensor(list(answer_ids) + [IGNORE] * num_heads)
    n = len(answer_ids)
    return torch.stack([answer[i + 1:i + 1 + n] for i in range(num_heads)], dim=1)


def build_head_data(hf_model, examples: list[tuple[list[int], list[int]]], num_heads: int,
                    desc: str = "hidden states") -> HeadData:
    """Hidden states and targets of (prompt, answer) pairs; positions where no head has a target are dropped."""
    hidden, next_tokens, targets = [], [], []
    for prompt, answer in tqdm(examples, desc=desc, unit="seq"):
        if len(answer) < 2:
            continue
        hidden.append(answer_hidden_states(hf_model, prompt, answer)[:-1])
        next_tokens.append(torch.tensor(answer[:-1]))
        targets.append(head_targets(answer, num_heads)[:-1])
    if not hidden:
        raise ValueError("no answer has two tokens or more: nothing to train the heads on")
    return HeadData(torch.cat(hidden), torch.cat(next_tokens), torch.cat(targets))


def head_logits(heads: MedusaHeads, hidden: torch.Tensor, lm_head_weight: torch.Tensor) -> torch.Tensor:
    """[num_heads, N, vocab] float32 logits: each head's hidden states through the (frozen) lm_head."""
    return (heads(hidden).to(lm_head_weight.dtype) @ lm_head_weight.t()).float()


@torch.no_grad()
def evaluate(heads: MedusaHeads, lm_head_weight: torch.Tensor, data: HeadData, batch_size: int = 256) -> dict:
    """Per-head top-1 / top-5 accuracy and mean loss; base_top1 is the lm_head's own accuracy on the next token
    (near 1.0: the answers are the model's greedy choices)."""
    k = heads.num_heads
    hit1, hit5, count = torch.zeros(k), torch.zeros(k), torch.zeros(k)
    loss_sum, base_hits = 0.0, 0
    for start in range(0, len(data), batch_size):
        hidden = data.hidden[start:start + batch_size]
        targets = data.targets[start:start + batch_size].t()  # [k, n]
        logits = head_logits(heads, hidden, lm_head_weight)
        valid = targets != IGNORE
        top5 = logits.topk(5, dim=-1).indices
        hit1 += ((top5[..., 0] == targets) & valid).sum(1)
        hit5 += ((top5 == targets.unsqueeze(-1)).any(-1) & valid).sum(1)
        count += valid.sum(1)
        loss_sum += F.cross_entropy(logits[valid], targets[valid], reduction="sum").item()
        base_hits += int(((hidden @ lm_head_weight.t()).argmax(-1) == data.next_tokens[start:start + batch_size]).sum())
    return {
        "loss": loss_sum / count.sum().item(),
        "top1": [round(x, 4) for x in (hit1 / count).tolist()],
        "top5": [round(x, 4) for x in (hit5 / count).tolist()],
        "positions": [int(x) for x in count.tolist()],
        "base_top1": round(base_hits / len(data), 4),
    }


def train_heads(heads: MedusaHeads, lm_head_weight: torch.Tensor, train: HeadData, held_out: HeadData,
                args: TrainMedusaArgs) -> list[dict]:
    """AdamW over shuffled positions, linear warm-up then cosine decay; evaluates after every epoch."""
    optimizer = torch.optim.AdamW(heads.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total = args.epochs * steps_per_epoch
    warmup = max(1, total // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total)))
    train_weight = lm_head_weight.to(DTYPES[args.logits_dtype])
    generator = torch.Generator().manual_seed(args.seed)
    history = []
    for epoch in range(args.epochs):
        start_time, loss_sum = time.perf_counter(), 0.0
        order = torch.randperm(len(train), generator=generator)
        bar = tqdm(range(steps_per_epoch), desc=f"train epoch {epoch + 1}/{args.epochs}", unit="step")
        for step in bar:
            index = order[step * args.batch_size:(step + 1) * args.batch_size]
            logits = head_logits(heads, train.hidden[index], train_weight)
            loss = F.cross_entropy(logits.flatten(0, 1), train.targets[index].t().flatten(), ignore_index=IGNORE)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.item()
            bar.set_postfix(loss=f"{loss_sum / (step + 1):.3f}")
        metrics = evaluate(heads, lm_head_weight, held_out, args.batch_size)
        history.append({"epoch": epoch + 1, "train_loss": round(loss_sum / steps_per_epoch, 4),
                        "eval_loss": round(metrics["loss"], 4), "eval_top1": metrics["top1"],
                        "time_s": round(time.perf_counter() - start_time, 1)})
        print(f"epoch {epoch + 1}: train loss {history[-1]['train_loss']}, held-out loss "
              f"{history[-1]['eval_loss']}, held-out top-1 by head {metrics['top1']}")
    return history


def generate_examples(args: TrainMedusaArgs) -> tuple[list[tuple[list[int], list[int]]], str]:
    """(prompt ids, greedy answer ids) from the engine, and the model file's name."""
    from foreseer.llm import LLM
    from foreseer.models.loader import resolve_model
    from foreseer.sampling_params import SamplingParams

    questions = load_sharegpt_questions(args.dataset, args.num_prompts, skip=args.skip_prompts)
    llm = LLM(args.model, seed=args.seed, kv_cache_gib=args.kv_cache_gib)
    prompts = [chat_prompt_ids(llm.tokenizer, q, args.max_prompt_tokens) for q in questions]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.max_tokens))
    examples = [(p, list(o.outputs[0].token_ids)) for p, o in zip(prompts, outputs) if not o.error]
    return examples, os.path.basename(resolve_model(args.model).path)


def run(args: TrainMedusaArgs) -> dict:
    if args.num_prompts <= args.eval_prompts or args.eval_prompts < 1:
        raise ValueError(f"num_prompts ({args.num_prompts}) must exceed eval_prompts ({args.eval_prompts}) >= 1")
    if args.logits_dtype not in DTYPES:
        raise ValueError(f"logits_dtype must be one of {sorted(DTYPES)}, got {args.logits_dtype!r}")
    torch.manual_seed(args.seed)
    times = {}
    begin = time.perf_counter()
    examples, model_file = generate_examples(args)
    times["generate"] = time.perf_counter() - begin
    gc.collect()  # the engine and its KV cache are gone: free them before transformers loads the model

    start = time.perf_counter()
    hf_model = load_backbone(args.model)
    lm_head_weight = hf_model.get_output_embeddings().weight.detach().float()
    train_examples, eval_examples = examples[:-args.eval_prompts], examples[-args.eval_prompts:]
    train = build_head_data(hf_model, train_examples, args.num_heads, desc="hidden states (train)")
    held_out = build_head_data(hf_model, eval_examples, args.num_heads, desc="hidden states (held out)")
    del hf_model
    times["hidden_states"] = time.perf_counter() - start

    start = time.perf_counter()
    heads = MedusaHeads(MedusaConfig(num_heads=args.num_heads, hidden_size=lm_head_weight.shape[1],
                                     base_model=args.model))
    before = evaluate(heads, lm_head_weight, held_out, args.batch_size)
    history = train_heads(heads, lm_head_weight, train, held_out, args)
    after = evaluate(heads, lm_head_weight, held_out, args.batch_size)
    times["train"] = time.perf_counter() - start
    times["total"] = time.perf_counter() - begin

    dataset = {
        "path": args.dataset, "skip_prompts": args.skip_prompts, "prompts": len(examples),
        "train_prompts": len(train_examples), "eval_prompts": len(eval_examples),
        "prompt_tokens": sum(len(p) for p, _ in examples), "answer_tokens": sum(len(a) for _, a in examples),
        "train_positions": len(train), "eval_positions": len(held_out),
        "max_prompt_tokens": args.max_prompt_tokens, "max_tokens": args.max_tokens,
    }
    hyper = {k: getattr(args, k) for k in ("epochs", "lr", "weight_decay", "batch_size", "logits_dtype", "seed")}
    timing = {k: round(v, 1) for k, v in times.items()}
    heads.config.training = {
        "command": args.command, "base_model_file": model_file, "dataset": dataset, **hyper,
        "eval_top1": after["top1"], "eval_top5": after["top5"], "untrained_eval_top1": before["top1"],
        "time_s": timing,
    }
    output_dir = args.output_dir or f"{os.path.basename(args.model.rstrip(os.sep))}-medusa"
    heads.save(output_dir)
    report = {"model": args.model, "base_model_file": model_file, "command": args.command, "num_heads": args.num_heads,
              "dataset": dataset, "training": hyper, "eval_untrained": before, "eval": after, "epochs": history,
              "time_s": timing, "output_dir": output_dir}
    _print_summary(report)
    write_json(report, args.output_json)
    return report


def _print_summary(report: dict) -> None:
    data, before, after = report["dataset"], report["eval_untrained"], report["eval"]
    print(f"data: {data['prompts']} prompts ({data['train_prompts']} train, {data['eval_prompts']} held out), "
          f"{data['prompt_tokens']} prompt + {data['answer_tokens']} answer tokens; "
          f"{data['train_positions']} train / {data['eval_positions']} held-out positions")
    print(f"lm_head top-1 on its own next token (held out): {after['base_top1']}")
    print("head  predicts  top-1 (untrained)  top-5 (untrained)")
    for i in range(report["num_heads"]):
        print(f"{i:>4}  t+{i + 2:<7}  {after['top1'][i]:.3f} ({before['top1'][i]:.3f})      "
              f"{after['top5'][i]:.3f} ({before['top5'][i]:.3f})")
    print(f"time (s): {report['time_s']}; heads saved to {report['output_dir']}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainMedusaArgs()
    parser.add_argument("--model", default=defaults.model, help="model name, GGUF file or HF directory")
    parser.add_argument("--dataset", default=defaults.dataset, help="ShareGPT-format JSON")
    parser.add_argument("--num-prompts", type=int, default=defaults.num_prompts,
                        help="prompts to answer, held-out ones included")
    parser.add_argument("--skip-prompts", type=int, default=defaults.skip_prompts,
                        help="dataset prompts to skip first (the benchmarks use the first ones)")
    parser.add_argument("--eval-prompts", type=int, default=defaults.eval_prompts,
                        help="the last prompts, held out for evaluation")
    parser.add_argument("--max-prompt-tokens", type=int, default=defaults.max_prompt_tokens,
                        help="longer questions are shortened to fit")
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="answer length limit")
    parser.add_argument("--num-heads", type=int, default=defaults.num_heads,
                        help="heads to train: head i predicts the token i + 2 ahead")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over the training positions")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (warm-up, cosine decay)")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="positions per step")
    parser.add_argument("--logits-dtype", default=defaults.logits_dtype, choices=sorted(DTYPES),
                        help="dtype of the frozen lm_head matmul in training")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed of the engine, the heads' initialization and the batches")
    parser.add_argument("--kv-cache-gib", type=float, default=defaults.kv_cache_gib,
                        help="KV cache of the generation engine")
    parser.add_argument("--output-dir", default=defaults.output_dir, help="default: ./<model>-medusa")
    parser.add_argument("--output-json", default=defaults.output_json, help="write the report to this JSON file")


def main(args: argparse.Namespace) -> int:
    run(args_dataclass(TrainMedusaArgs, args, "foreseer.training.train_medusa", __file__))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m foreseer.training.train_medusa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
