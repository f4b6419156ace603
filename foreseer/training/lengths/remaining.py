"""Training and scoring the remaining-length head on recorded traces (foreseer/training/lengths/traces.py).

Splits are by prompt (a hash of its id), never by position: the validation prompts' answers are never seen in
training. The head's layer is chosen on a development split carved out of the training prompts, so the
validation figures stay held out. Scores follow what a scheduler needs:
- at the end of the prefill: the predicted answer length (the mean of the distribution, capped at max_tokens)
  against the length the answer got;
- after `at_tokens` generated tokens (the refined prediction, read then): the predicted remaining length against
  the tokens that were left;
both by Kendall's tau (rank agreement, what shortest-first needs) and the mean absolute error. Beside them, the
censoring-aware concordance on the natural length (Harrell's C as a tau: a pair counts only where the shorter
answer ended on its own), which max_tokens cannot give away.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from foreseer.lengths.remaining import (
    DEFAULT_EDGES,
    HeadTrainConfig,
    RemainingHead,
    RemainingHeadConfig,
    train_remaining_head,
)
from foreseer.training.lengths.dataset import record_split
from foreseer.training.lengths.evaluate import kendall_tau
from foreseer.training.lengths.traces import TraceRecord, load_trace_states

DEV_FRACTION = 0.1  # of the training prompts, for choosing the layer


@dataclass
class Examples:
    """Every position of the given records' answers, in record order."""

    hidden: torch.Tensor  # [N, hidden] fp16
    generated: torch.Tensor  # [N] tokens generated at that position
    prompt_lengths: torch.Tensor  # [N]
    remaining: torch.Tensor  # [N] tokens generated after it (the label, censored or not)
    censored: torch.Tensor  # [N] bool: the answer was cut at max_tokens
    offsets: list[int]  # first row of each record


def split_traces(records: Sequence[TraceRecord], val_fraction: float
                 ) -> tuple[list[TraceRecord], list[TraceRecord], list[TraceRecord]]:
    """(train, dev, val): val by the dataset's prompt hash; dev, for model choices, from the train prompts."""
    train, dev, val = [], [], []
    for record in records:
        if record_split(record.id, val_fraction) == "val":
            val.append(record)
        elif _hash_share(record.id + ":dev") < DEV_FRACTION:
            dev.append(record)
        else:
            train.append(record)
    return train, dev, val


def _hash_share(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def load_examples(path: str, records: Sequence[TraceRecord], layer: int) -> Examples:
    hidden = load_trace_states(path, records, layer)
    generated, prompt_lengths, remaining, censored, offsets = [], [], [], [], []
    for record in records:
        n = record.output_length
        offsets.append(len(generated))
        generated.extend(range(n))
        prompt_lengths.extend([record.num_prompt_tokens] * n)
        remaining.extend(range(n, 0, -1))
        censored.extend([record.censored] * n)
    return Examples(hidden, torch.tensor(generated), torch.tensor(prompt_lengths), torch.tensor(remaining),
                    torch.tensor(censored), offsets)


@dataclass
class HeadScores:
    num_prompts: int
    tau_prefill: float  # predicted against realized answer length, at the end of the prefill
    mae_prefill: float
    concordance_prefill: float  # censoring-aware tau on the natural length
    num_at: int  # prompts whose answers are longer than at_tokens
    at_tokens: int
    tau_at: float  # predicted against realized remaining length, after at_tokens
    mae_at: float
    nll: float  # of every position's label, censored ones by P(R > r)


def censored_tau(predicted: Sequence[float], lengths: Sequence[int], censored: Sequence[bool]) -> float:
    """Kendall's tau over the pairs whose order is known though some lengths are censored: i is shorter than j
    when i ended on its own before j's (ended or cut) length. (Harrell's C, as 2C - 1.)"""
    concordant = discordant = 0
    for i in range(len(lengths)):
        if censored[i]:
            continue
        for j in range(len(lengths)):
            if lengths[i] < lengths[j] or (lengths[i] == lengths[j] and censored[j] and i != j):
                if predicted[i] < predicted[j]:
                    concordant += 1
                elif predicted[i] > predicted[j]:
                    discordant += 1
                else:
                    concordant += 0.5
                    discordant += 0.5
    total = concordant + discordant
    return (concordant - discordant) / total if total else 0.0


def score_predictions(records: Sequence[TraceRecord], prefill: Sequence[float], at_tokens: int,
                      at: Sequence[float | None]) -> dict:
    """Scores of any predictor: `prefill` the predicted answer lengths, `at` the predicted remaining lengths
    after at_tokens (None for answers not longer than that)."""
    lengths = [r.output_length for r in records]
    capped = [min(p, r.max_tokens) for p, r in zip(prefill, records)]
    later = [(a, r.output_length - at_tokens) for a, r in zip(at, records) if r.output_length > at_tokens]
    return {
        "num_prompts": len(records),
        "tau_prefill": kendall_tau(capped, lengths),
        "mae_prefill": sum(abs(p - n) for p, n in zip(capped, lengths)) / len(records),
        "concordance_prefill": censored_tau(prefill, lengths, [r.censored for r in records]),
        "num_at": len(later), "at_tokens": at_tokens,
        "tau_at": kendall_tau([a for a, _ in later], [n for _, n in later]) if later else 0.0,
        "mae_at": sum(abs(a - n) for a, n in later) / len(later) if later else 0.0,
    }


@torch.inference_mode()
def score_head(head: RemainingHead, records: Sequence[TraceRecord], examples: Examples,
               at_tokens: int = 64) -> HeadScores:
    logits = torch.cat([head(examples.hidden[i:i + 65536], examples.generated[i:i + 65536],
                             examples.prompt_lengths[i:i + 65536])
                        for i in range(0, len(examples.generated), 65536)])
    nll = head.loss(logits, examples.remaining, examples.censored).item()
    rows = examples.offsets
    first = head.predict(examples.hidden[rows], examples.generated[rows], examples.prompt_lengths[rows])
    prefill = [e.mean(0, r.max_tokens) for e, r in zip(first, records)]
    long = [i for i, r in enumerate(records) if r.output_length > at_tokens]
    at: list[float | None] = [None] * len(records)
    if long:
        at_rows = [rows[i] + at_tokens for i in long]
        for i, estimate in zip(long, head.predict(examples.hidden[at_rows], examples.generated[at_rows],
                                                  examples.prompt_lengths[at_rows])):
            at[i] = estimate.mean(at_tokens, records[i].max_tokens - at_tokens)
    return HeadScores(**score_predictions(records, prefill, at_tokens, at), nll=nll)


def fit_head(path: str, train: Sequence[TraceRecord], layer: int, hidden_size: int,
             config: HeadTrainConfig, hidden_dim: int, base_model: str,
             edges: Sequence[int] = DEFAULT_EDGES) -> RemainingHead:
    examples = load_examples(path, train, layer)
    head_config = RemainingHeadConfig(hidden_size=hidden_size, layer=layer, edges=list(edges), hidden_dim=hidden_dim,
                                      base_model=base_model)
    return train_remaining_head(head_config, examples.hidden, examples.generated, examples.prompt_lengths,
                                examples.remaining, examples.censored, config)


def choose_layer(path: str, train: Sequence[TraceRecord], dev: Sequence[TraceRecord], layers: Sequence[int],
                 hidden_size: int, config: HeadTrainConfig, hidden_dim: int, log=print) -> tuple[int, dict]:
    """The recorded layer whose head scores best on the dev prompts (the mean of its two taus)."""
    scores = {}
    for layer in layers:
        head = fit_head(path, train, layer, hidden_size, config, hidden_dim, "")
        scores[layer] = dataclasses.asdict(score_head(head, dev, load_examples(path, dev, layer)))
        log(f"layer {layer}: {scores[layer]}")
    best = max(layers, key=lambda layer: scores[layer]["tau_prefill"] + scores[layer]["tau_at"])
    return best, scores
