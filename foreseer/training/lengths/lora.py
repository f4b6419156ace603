"""The paper's length predictor (Zheng et al., 2023): the model itself, with a LoRA adapter instruction-tuned to
answer "how many tokens will your answer have" with a number.

Training runs on Hugging Face transformers with `peft` (rank 8 on q_proj and v_proj by default, the paper's
setting) and saves the adapter in PEFT format, so that the engine serves it like any user adapter, in the same
batches as user requests. The predictor that asks the question through the engine is `LoraPredictor`
(foreseer/lengths/predictors.py, registered as "lora"), which also holds the question and the shipped adapter.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from foreseer.lengths.predictors import LENGTH_QUESTION, default_adapter_dir, instruction_prompt
from foreseer.training.finetune import FinetuneConfig, end_token, finetune
from foreseer.training.lengths.dataset import LengthRecord

__all__ = ["LENGTH_QUESTION", "TRAINING_FILE", "LoraTrainConfig", "default_adapter_dir", "read_training_record",
           "train_length_lora", "training_examples", "write_training_record"]

TRAINING_FILE = "length_training.json"  # beside the adapter: how it was trained and how well it does


@dataclass
class LoraTrainConfig(FinetuneConfig):
    """The paper's setting: rank 8 on q_proj and v_proj; no warm-up or clipping."""

    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    lr: float = 1e-3
    warmup_fraction: float = 0.0
    clip_norm: float | None = None
    weight_decay: float = 0.01
    base_model: str | None = None  # written as base_model_name_or_path (default: what transformers loaded from)
    extra: dict = field(default_factory=dict)  # recorded as is (dataset summary, command line)


def training_examples(tokenizer, records: Sequence[LengthRecord]) -> list[tuple[list[int], list[int]]]:
    """(prompt, answer) token ids: the chat prompt with the length question, and the label as a number, ended."""
    end = end_token(tokenizer)
    examples = []
    for record in records:
        prompt = instruction_prompt(tokenizer, record.prompt_token_ids, LENGTH_QUESTION)
        answer = tokenizer.encode(str(record.max_length), add_special_tokens=False) + [end]
        examples.append((prompt, answer))
    return examples


def train_length_lora(hf_model, tokenizer, records: Sequence[LengthRecord], output_dir: str,
                      config: LoraTrainConfig | None = None, log=print) -> dict:
    """Fine-tune a LoRA adapter on `hf_model` (transformers, fp32; left untouched) to state each prompt's label;
    saves it in PEFT format (adapter_config.json, adapter_model.safetensors) with a JSON record of the training
    (TRAINING_FILE). Returns that record."""
    config = config or LoraTrainConfig()
    if not records:
        raise ValueError("no training records")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    summary = finetune(hf_model, training_examples(tokenizer, records), output_dir, config, pad_id,
                       config.base_model, log)
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "extra"}
    settings["target_modules"] = list(config.target_modules)  # as the JSON record reads back
    summary = {"train": settings, **config.extra, **summary}
    write_training_record(output_dir, summary)
    return summary


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
