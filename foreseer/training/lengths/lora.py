"""The paper's length predictor (Zheng et al., 2023): the model itself, with a LoRA adapter instruction-tuned to
answer a length question, here with the letter of a length class (foreseer/lengths/predictors.py).

Stating one number, the adapter learnt to answer 512 (the cap, the label of four prompts in five) to everything.
As a classifier it is read as a distribution over classes, and each answer's label follows what is known of it:
an answer that ended on its own is in its class; one stopped at its max_tokens (censored) is in its class or a
longer one, and the loss is the likelihood of that set (as the remaining-length head's training treats censoring).

Training runs on Hugging Face transformers with `peft` (rank 8 on q_proj and v_proj by default, the paper's
setting) and saves the adapter in PEFT format, so that the engine serves it like any user adapter, in the same
batches as user requests. The predictor that asks the question through the engine is `LoraPredictor`
(registered as "lora").
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from foreseer.lengths.predictors import (
    LENGTH_CLASS_EDGES,
    class_token_ids,
    default_adapter_dir,
    instruction_prompt,
    length_class,
    length_class_question,
)
from foreseer.training.finetune import Example, FinetuneConfig, finetune

__all__ = ["TRAINING_FILE", "LengthLabel", "LoraTrainConfig", "class_loss", "default_adapter_dir", "labels_of",
           "read_training_record", "train_length_lora", "training_examples", "write_training_record"]

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


@dataclass
class LengthLabel:
    prompt_token_ids: list[int]
    length: int  # tokens of the answer
    censored: bool  # stopped at its max_tokens: its natural length is at least `length`


def labels_of(records: Sequence) -> list[LengthLabel]:
    """The labels of trace records (`lengths traces`) or of length records (`lengths build`: the longest of the
    samples, censored if it reached max_tokens)."""
    labels = []
    for record in records:
        if hasattr(record, "censored"):
            labels.append(LengthLabel(record.prompt_token_ids, record.output_length, record.censored))
        else:
            labels.append(LengthLabel(record.prompt_token_ids, record.max_length,
                                      record.max_length >= record.max_tokens))
    return labels


def training_examples(tokenizer, labels: Sequence[LengthLabel]) -> list[Example]:
    """(prompt, classes) token ids: the chat prompt with the length question, and the letters the answer's class
    may be: its own, and for a censored answer every longer one too."""
    letters = class_token_ids(tokenizer)
    question = length_class_question()
    examples = []
    for label in labels:
        first = length_class(label.length)
        allowed = letters[first:] if label.censored else [letters[first]]
        examples.append((instruction_prompt(tokenizer, label.prompt_token_ids, question), allowed))
    return examples


def class_loss(model, examples: Sequence[Example], pad_id: int) -> torch.Tensor:
    """Mean negative log-likelihood that the first answer token is one of each example's allowed letters (a
    censored label's likelihood is its classes' summed probability). The LM head runs on the last prompt tokens
    alone."""
    width = max(len(prompt) for prompt, _ in examples)
    ids = [prompt + [pad_id] * (width - len(prompt)) for prompt, _ in examples]
    mask = [[1] * len(prompt) + [0] * (width - len(prompt)) for prompt, _ in examples]
    hidden = model.model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    last = hidden[torch.arange(len(examples)), torch.tensor([len(prompt) - 1 for prompt, _ in examples])]
    logprobs = model.lm_head(last).float().log_softmax(dim=-1)
    return -torch.stack([logprobs[row, allowed].logsumexp(0) for row, (_, allowed) in enumerate(examples)]).mean()


def train_length_lora(hf_model, tokenizer, labels: Sequence[LengthLabel], output_dir: str,
                      config: LoraTrainConfig | None = None, log=print) -> dict:
    """Fine-tune a LoRA adapter on `hf_model` (transformers, fp32; left untouched) to state each prompt's length
    class; saves it in PEFT format (adapter_config.json, adapter_model.safetensors) with a JSON record of the
    training (TRAINING_FILE). Returns that record."""
    config = config or LoraTrainConfig()
    if not labels:
        raise ValueError("no training records")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    summary = finetune(hf_model, training_examples(tokenizer, labels), output_dir, config, pad_id,
                       config.base_model, log, class_loss)
    summary.pop("target_tokens")  # the allowed letters here, not tokens trained on
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "extra"}
    settings["target_modules"] = list(config.target_modules)  # as the JSON record reads back
    classes = [0] * (len(LENGTH_CLASS_EDGES) + 1)
    for label in labels:
        classes[length_class(label.length)] += 1
    summary = {"train": settings, **config.extra, "class_edges": list(LENGTH_CLASS_EDGES),
               "examples_by_lowest_class": classes, "censored": sum(label.censored for label in labels), **summary}
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
