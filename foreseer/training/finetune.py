"""Fine-tune a PEFT LoRA adapter on (prompt, target) token pairs with transformers, and save it in PEFT format.

The one trainer behind `foreseer lora train` (behaviour adapters, foreseer/training/lora_adapters.py) and
`foreseer lengths train --predictor lora` (the length adapter, foreseer/training/lengths/lora.py). The loss is on
the target tokens only; batches hold examples of similar length; the learning rate warms up linearly, then decays
linearly to zero.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

Example = tuple[list[int], list[int]]  # (prompt token ids, target token ids)


@dataclass
class FinetuneConfig:
    rank: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    dropout: float = 0.05
    epochs: int = 2
    lr: float = 2e-3
    batch_size: int = 8
    seed: int = 0
    warmup_fraction: float = 0.1  # share of the steps whose learning rate rises linearly (at least one step)
    clip_norm: float | None = 1.0  # gradient norm clipping (None: none)
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        for name in ("rank", "alpha", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ValueError("target_modules is empty")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction!r}")


def end_token(tokenizer) -> int:
    """The chat template's end of turn (<|im_end|>) if the vocabulary has it, else EOS."""
    vocab = tokenizer.get_vocab()
    return vocab["<|im_end|>"] if "<|im_end|>" in vocab else tokenizer.eos_token_id


def target_loss(model, examples: Sequence[Example], pad_id: int) -> torch.Tensor:
    """Mean cross-entropy over the target tokens of right-padded (prompt, target) pairs. The LM head runs on the
    target positions alone: on every position it would cost a fifth of the model and a [tokens, vocab] tensor."""
    width = max(len(p) + len(t) for p, t in examples)
    ids, mask, rows, positions, targets = [], [], [], [], []
    for row, (prompt, target) in enumerate(examples):
        pad = width - len(prompt) - len(target)
        ids.append(prompt + target + [pad_id] * pad)
        mask.append([1] * (len(prompt) + len(target)) + [0] * pad)
        rows += [row] * len(target)
        positions += range(len(prompt) - 1, len(prompt) + len(target) - 1)
        targets += target
    hidden = model.model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    logits = model.lm_head(hidden[torch.tensor(rows), torch.tensor(positions)]).float()
    return F.cross_entropy(logits, torch.tensor(targets))


def length_batches(examples: Sequence[Example], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Batches of examples of similar length (little padding), in random order; ties broken at random."""
    order = sorted(range(len(examples)), key=lambda i: (sum(map(len, examples[i])), rng.random()))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def finetune(hf_model, examples: Sequence[Example], output_dir: str, config: FinetuneConfig, pad_id: int,
             base_model: str | None = None, log=print, loss_fn: Callable = target_loss) -> dict:
    """Train a LoRA adapter on a copy of `hf_model` (transformers, float32; left untouched) and save it in PEFT
    format in output_dir (see save_peft_adapter); returns a summary of the training. loss_fn(model, batch, pad_id)
    is the loss of a batch of examples (default: cross-entropy on the target tokens)."""
    from peft import LoraConfig, get_peft_model

    if not examples:
        raise ValueError("no training examples")
    torch.manual_seed(config.seed)
    peft_model = get_peft_model(copy.deepcopy(hf_model), LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
        target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM"))
    inner = peft_model.get_base_model()  # the transformers model, with the LoRA layers injected
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * -(-len(examples) // config.batch_size)
    warmup = max(1, int(steps * config.warmup_fraction))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * max(0.0, 1 - step / steps))
    rng = random.Random(config.seed)
    losses, epoch_losses = [], []
    start = time.perf_counter()
    peft_model.train()
    for epoch in range(config.epochs):
        total, count = 0.0, 0
        for batch in length_batches(examples, config.batch_size, rng):
            loss = loss_fn(inner, [examples[i] for i in batch], pad_id)
            loss.backward()
            if config.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.clip_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            total += loss.item() * len(batch)
            count += len(batch)
        epoch_losses.append(total / count)
        if log is not None:
            log(f"  epoch {epoch + 1}/{config.epochs}: mean loss {epoch_losses[-1]:.4f} "
                f"({time.perf_counter() - start:.0f} s)")
    peft_model.eval()
    save_peft_adapter(peft_model, output_dir, base_model)
    return {"num_examples": len(examples), "example_tokens": sum(len(p) + len(t) for p, t in examples),
            "target_tokens": sum(len(t) for _, t in examples), "steps": len(losses),
            "train_s": round(time.perf_counter() - start, 1), "epoch_losses": [round(x, 4) for x in epoch_losses],
            "first_losses": [round(x, 3) for x in losses[:5]], "last_losses": [round(x, 3) for x in losses[-5:]]}


def save_peft_adapter(peft_model, output_dir: str, base_model: str | None = None) -> None:
    """The adapter's two PEFT files into output_dir, and nothing else (PEFT's save_pretrained would also write or
    rewrite a README.md model card there); base_model, if given, replaces the local path it was loaded from as
    base_model_name_or_path (set only after saving: PEFT would look a model name up on the Hub)."""
    os.makedirs(output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        peft_model.save_pretrained(scratch, save_embedding_layers=False)
        config_path = os.path.join(scratch, "adapter_config.json")
        if base_model is not None:
            with open(config_path) as f:
                adapter_config = json.load(f)
            adapter_config["base_model_name_or_path"] = base_model
            with open(config_path, "w") as f:
                json.dump(adapter_config, f, indent=2, sort_keys=True)
                f.write("\n")
        for name in ADAPTER_FILES:
            shutil.copyfile(os.path.join(scratch, name), os.path.join(output_dir, name))
