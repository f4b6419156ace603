"""The paper's length predictor (Zheng et al., 2023): the model itself, with a LoRA adapter instruction-tuned to
answer "how many tokens will your answer have" with a number.

Training runs on Hugging Face transformers with `peft` (rank 8 on q_proj and v_proj by default, the paper's
setting) and saves the adapter in PEFT format, so that the engine serves it like any user adapter, in the same
batches as user requests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from foreseer.lengths.dataset import LengthRecord
from foreseer.lengths.predictors import instruction_prompt

LENGTH_QUESTION = ("How many tokens will your answer to the above have? Do not answer it; reply with one number "
                   "only.")
TRAINING_FILE = "length_training.json"  # beside the adapter: how it was trained and how well it does
WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")
SHIPPED_ADAPTERS = {"smollm2-135m-instruct": "smollm2-135m-instruct-length-lora"}


@dataclass
class LoraTrainConfig:
    rank: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.05
    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 8
    seed: int = 0
    extra: dict = field(default_factory=dict)  # recorded as is (dataset summary, command line)

    def __post_init__(self) -> None:
        for name in ("rank", "alpha", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")


def default_adapter_dir(model: str) -> str:
    """The shipped length adapter of a packaged model; ValueError if none is shipped."""
    if model not in SHIPPED_ADAPTERS:
        raise ValueError(f"no length adapter is shipped for model {model!r}; shipped: {', '.join(SHIPPED_ADAPTERS)} "
                         "(train one with `foreseer lengths train --predictor lora`)")
    return os.path.join(WEIGHTS_DIR, SHIPPED_ADAPTERS[model])


def training_examples(tokenizer, records: Sequence[LengthRecord]) -> list[tuple[list[int], list[int]]]:
    """(prompt, answer) token ids: the chat prompt with the length question, and the label as a number, ended."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    end = end if end is not None else tokenizer.eos_token_id
    examples = []
    for record in records:
        prompt = instruction_prompt(tokenizer, record.prompt_token_ids, LENGTH_QUESTION)
        answer = tokenizer.encode(str(record.max_length), add_special_tokens=False) + [end]
        examples.append((prompt, answer))
    return examples


def _batch(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded inputs; labels only on the answer tokens (-100 elsewhere)."""
    width = max(len(p) + len(a) for p, a in examples)
    ids, labels, mask = [], [], []
    for prompt, answer in examples:
        pad = width - len(prompt) - len(answer)
        ids.append(prompt + answer + [pad_id] * pad)
        labels.append([-100] * len(prompt) + answer + [-100] * pad)
        mask.append([1] * (len(prompt) + len(answer)) + [0] * pad)
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


def train_length_lora(hf_model, tokenizer, records: Sequence[LengthRecord], output_dir: str,
                      config: LoraTrainConfig | None = None) -> dict:
    """Fine-tune a LoRA adapter on `hf_model` (transformers, fp32) to state each prompt's label; saves it in PEFT
    format with a JSON record of the training. Returns that record."""
    from peft import LoraConfig, get_peft_model

    config = config or LoraTrainConfig()
    if not records:
        raise ValueError("no training records")
    torch.manual_seed(config.seed)
    model = get_peft_model(hf_model, LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                                target_modules=list(config.target_modules), bias="none",
                                                task_type="CAUSAL_LM"))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    examples = training_examples(tokenizer, records)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    steps = config.epochs * -(-len(examples) // config.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    order = list(range(len(examples)))
    rng = random.Random(config.seed)
    losses = []
    start = time.perf_counter()
    model.train()
    for _ in range(config.epochs):
        rng.shuffle(order)
        chunks = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        for chunk in chunks:
            loss = model(**_batch([examples[i] for i in chunk], pad_id)).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    model.eval()
    model.save_pretrained(output_dir)
    summary = {"train": {k: v for k, v in dataclasses.asdict(config).items() if k != "extra"}, **config.extra,
               "num_examples": len(examples), "steps": len(losses), "train_s": round(time.perf_counter() - start, 1),
               "first_losses": [round(x, 3) for x in losses[:5]], "last_losses": [round(x, 3) for x in losses[-5:]]}
    write_training_record(output_dir, summary)
    return summary


def write_training_record(output_dir: str, record: dict) -> None:
    with open(os.path.join(output_dir, TRAINING_FILE), "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
