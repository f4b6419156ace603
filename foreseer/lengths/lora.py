"""The paper's length predictor (Zheng et al., 2023): the model itself, with a LoRA adapter instruction-tuned to
answer "how many tokens will your answer have" with a number.

Training runs on Hugging Face transformers with `peft` (rank 8 on q_proj and v_proj by default, the paper's
setting) and saves the adapter in PEFT format, so that the engine serves it like any user adapter, in the same
batches as user requests. The predictor that asks the question through the engine is `LoraPredictor`
(foreseer/lengths/predictors.py, registered as "lora").
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from foreseer.lengths.dataset import LengthRecord

LENGTH_QUESTION = ("How many tokens will your answer to the above have? Do not answer it; reply with one number "
                   "only.")
TRAINING_FILE = "length_training.json"  # beside the adapter: how it was trained and how well it does
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")
# Packaged model name -> directory of its trained length adapter under WEIGHTS_DIR.
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
    base_model: str | None = None  # written as base_model_name_or_path (default: what transformers loaded from)
    extra: dict = field(default_factory=dict)  # recorded as is (dataset summary, command line)

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


def default_adapter_dir(model: str) -> str:
    """The shipped length adapter of a packaged model; ValueError if none is shipped."""
    if model not in SHIPPED_ADAPTERS:
        raise ValueError(f"no length adapter is shipped for model {model!r}; shipped: {', '.join(SHIPPED_ADAPTERS)} "
                         "(train one with `foreseer lengths train --predictor lora`)")
    return os.path.join(WEIGHTS_DIR, SHIPPED_ADAPTERS[model])


def _end_token(tokenizer) -> int:
    """The chat template's end of turn (<|im_end|>) if the vocabulary has it, else EOS."""
    vocab = tokenizer.get_vocab()
    return vocab["<|im_end|>"] if "<|im_end|>" in vocab else tokenizer.eos_token_id


def training_examples(tokenizer, records: Sequence[LengthRecord]) -> list[tuple[list[int], list[int]]]:
    """(prompt, answer) token ids: the chat prompt with the length question, and the label as a number, ended."""
    from foreseer.lengths.predictors import instruction_prompt  # predictors imports this module

    end = _end_token(tokenizer)
    examples = []
    for record in records:
        prompt = instruction_prompt(tokenizer, record.prompt_token_ids, LENGTH_QUESTION)
        answer = tokenizer.encode(str(record.max_length), add_special_tokens=False) + [end]
        examples.append((prompt, answer))
    return examples


def _batch(examples: Sequence[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded inputs, the positions whose next token is an answer token, and those answer tokens."""
    width = max(len(p) + len(a) for p, a in examples)
    ids, mask, rows, positions, targets = [], [], [], [], []
    for row, (prompt, answer) in enumerate(examples):
        pad = width - len(prompt) - len(answer)
        ids.append(prompt + answer + [pad_id] * pad)
        mask.append([1] * (len(prompt) + len(answer)) + [0] * pad)
        rows += [row] * len(answer)
        positions += range(len(prompt) - 1, len(prompt) + len(answer) - 1)
        targets += answer
    return (torch.tensor(ids), torch.tensor(mask), torch.tensor(rows), torch.tensor(positions),
            torch.tensor(targets))


def answer_loss(model, examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens (the prompt is context only). The LM head runs on the answer
    positions alone: on every position it would cost a fifth of the model and a [tokens, vocab] tensor."""
    ids, mask, rows, positions, targets = _batch(examples, pad_id)
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    logits = model.lm_head(hidden[rows, positions]).float()
    return F.cross_entropy(logits, targets)


def length_batches(examples: Sequence[tuple[list[int], list[int]]], batch_size: int,
                   rng: random.Random) -> list[list[int]]:
    """Batches of examples of similar length (little padding), in random order; ties broken at random."""
    order = sorted(range(len(examples)), key=lambda i: (sum(map(len, examples[i])), rng.random()))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def train_length_lora(hf_model, tokenizer, records: Sequence[LengthRecord], output_dir: str,
                      config: LoraTrainConfig | None = None, log=print) -> dict:
    """Fine-tune a LoRA adapter on `hf_model` (transformers, fp32; modified in place) to state each prompt's
    label; saves it in PEFT format (adapter_config.json, adapter_model.safetensors) with a JSON record of the
    training (TRAINING_FILE). Returns that record."""
    from peft import LoraConfig, get_peft_model

    config = config or LoraTrainConfig()
    if not records:
        raise ValueError("no training records")
    torch.manual_seed(config.seed)
    model = get_peft_model(hf_model, LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                                target_modules=list(config.target_modules), bias="none",
                                                task_type="CAUSAL_LM"))
    inner = model.get_base_model()  # the transformers model, with the LoRA layers injected
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    examples = training_examples(tokenizer, records)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    steps = config.epochs * -(-len(examples) // config.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    rng = random.Random(config.seed)
    losses, epoch_losses = [], []
    start = time.perf_counter()
    model.train()
    for epoch in range(config.epochs):
        epoch_start, epoch_sum, epoch_count = time.perf_counter(), 0.0, 0
        for batch in length_batches(examples, config.batch_size, rng):
            chosen = [examples[i] for i in batch]
            loss = answer_loss(inner, chosen, pad_id)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            epoch_sum += loss.item() * len(chosen)
            epoch_count += len(chosen)
        epoch_losses.append(epoch_sum / epoch_count)
        if log is not None:
            log(f"epoch {epoch + 1}/{config.epochs}: mean loss {epoch_losses[-1]:.4f}, "
                f"{time.perf_counter() - epoch_start:.0f} s")
    model.eval()
    save_adapter(model, output_dir, config.base_model)
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "extra"}
    settings["target_modules"] = list(config.target_modules)  # as the JSON record reads back
    summary = {"train": settings, **config.extra,
               "num_examples": len(examples), "example_tokens": sum(len(p) + len(a) for p, a in examples),
               "steps": len(losses), "train_s": round(time.perf_counter() - start, 1),
               "epoch_losses": [round(x, 4) for x in epoch_losses],
               "first_losses": [round(x, 3) for x in losses[:5]], "last_losses": [round(x, 3) for x in losses[-5:]]}
    write_training_record(output_dir, summary)
    return summary


def save_adapter(peft_model, output_dir: str, base_model: str | None = None) -> None:
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


def write_training_record(output_dir: str, record: dict) -> None:
    with open(os.path.join(output_dir, TRAINING_FILE), "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")


def read_training_record(adapter_dir: str) -> dict:
    """The training record beside an adapter ({} if there is none)."""
    path = os.path.join(adapter_dir, TRAINING_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)
