"""A small head on the model's own hidden state at the end of prefill that predicts the longest answer.

Input: the final (post-norm) hidden state of the last prompt token (foreseer/lengths/features.py) and the log of
the prompt length, standardized with the training set's statistics. Two kinds of output:
- "regression": the length as a fraction of max_length, trained with an L1 loss (the median, which minimizes
  the mean absolute error);
- "buckets": a distribution over equal-width length buckets (cross-entropy); the prediction is the length
  whose +-tolerance window holds the most probability, i.e. the one most likely to be within the tolerance.
The head is a few hundred KB, saved as safetensors plus a JSON config that records how it was trained.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from foreseer.lengths.head_files import load_head_files, save_head

CONFIG_FILE = "probe_config.json"
WEIGHTS_FILE = "probe_head.safetensors"
WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")
# Packaged model name -> directory of its trained probe under WEIGHTS_DIR.
SHIPPED_PROBES = {"smollm2-135m-instruct": "smollm2-135m-instruct-probe"}
KINDS = ("regression", "buckets")


@dataclass
class ProbeConfig:
    hidden_size: int  # of the base model
    kind: str = "buckets"
    hidden_dim: int = 128  # of the MLP; 0: a linear head
    num_buckets: int = 16
    max_length: int = 512  # lengths are predicted in [1, max_length]
    tolerance: int = 100  # buckets: the prediction maximizes P(|length - prediction| <= tolerance)
    base_model: str = ""
    training: dict[str, Any] = field(default_factory=dict)  # how the head was trained and how well it does

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"probe kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for name in ("hidden_size", "num_buckets", "max_length", "tolerance"):
            if getattr(self, name) < 1:
                raise ValueError(f"probe {name} must be >= 1, got {getattr(self, name)!r}")
        if self.hidden_dim < 0:
            raise ValueError(f"probe hidden_dim must be >= 0, got {self.hidden_dim!r}")

    @property
    def num_outputs(self) -> int:
        return 1 if self.kind == "regression" else self.num_buckets


class ProbeHead(nn.Module):
    def __init__(self, config: ProbeConfig) -> None:
        super().__init__()
        self.config = config
        num_inputs = config.hidden_size + 1  # hidden state and log prompt length
        self.register_buffer("mean", torch.zeros(num_inputs))
        self.register_buffer("std", torch.ones(num_inputs))
        if config.hidden_dim:
            self.net = nn.Sequential(nn.Linear(num_inputs, config.hidden_dim), nn.GELU(), nn.Dropout(0.1),
                                     nn.Linear(config.hidden_dim, config.num_outputs))
        else:
            self.net = nn.Sequential(nn.Linear(num_inputs, config.num_outputs))

    def inputs(self, hidden: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
        """[N, hidden_size + 1] raw features (before standardization)."""
        if hidden.ndim != 2 or hidden.shape[1] != self.config.hidden_size:
            raise ValueError(f"hidden states must be [N, {self.config.hidden_size}], got {list(hidden.shape)}")
        if prompt_lengths.shape != (hidden.shape[0],):
            raise ValueError(f"prompt_lengths must be [{hidden.shape[0]}], got {list(prompt_lengths.shape)}")
        return torch.cat([hidden.float(), prompt_lengths.float().clamp(min=1).log()[:, None]], dim=1)

    def forward(self, hidden: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
        """Raw outputs: [N, 1] fraction of max_length, or [N, num_buckets] logits."""
        return self.net((self.inputs(hidden, prompt_lengths) - self.mean) / self.std)

    @torch.inference_mode()
    def predict(self, hidden: torch.Tensor, prompt_lengths: torch.Tensor, quantile: float | None = None) -> list[int]:
        """Predicted maximum answer lengths in [1, max_length].

        With `quantile` (buckets only), the length the answer stays within with that probability: an upper
        estimate, for schedulers that pay more for an answer longer than predicted than for a shorter one.
        """
        cfg = self.config
        if quantile is not None and (cfg.kind != "buckets" or not 0 < quantile < 1):
            raise ValueError(f"quantile must be in (0, 1) and needs a buckets probe; got {quantile!r} for a "
                             f"{cfg.kind} probe")
        was_training = self.training
        self.eval()
        out = self(hidden, prompt_lengths)
        self.train(was_training)
        if cfg.kind == "regression":
            lengths = out[:, 0] * cfg.max_length
        elif quantile is not None:
            lengths = _quantile(out.softmax(-1), cfg.max_length, quantile)
        else:
            lengths = _most_likely_window(out.softmax(-1), cfg.max_length, cfg.tolerance)
        return [int(x) for x in lengths.round().clamp(1, cfg.max_length)]

    def loss(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.kind == "regression":
            return F.l1_loss(out[:, 0], labels.float() / cfg.max_length)
        return F.cross_entropy(out, bucket_of(labels, cfg.num_buckets, cfg.max_length))

    def save(self, directory: str) -> None:
        """probe_config.json and probe_head.safetensors (fp32: the head is small)."""
        save_head(self, self.config, directory, CONFIG_FILE, WEIGHTS_FILE)

    @classmethod
    def load(cls, directory: str, hidden_size: int | None = None) -> ProbeHead:
        """A head saved by `save`; with hidden_size, checks that it fits the base model."""
        config, weights = load_head_files(directory, ProbeConfig, CONFIG_FILE, WEIGHTS_FILE, "probe", hidden_size)
        head = cls(config)
        head.load_state_dict(weights)
        return head.eval()


def bucket_of(lengths: torch.Tensor, num_buckets: int, max_length: int) -> torch.Tensor:
    """Bucket index of each length in [1, max_length]: equal widths of max_length / num_buckets."""
    return ((lengths.float() - 1) * num_buckets / max_length).long().clamp(0, num_buckets - 1)


def _quantile(probs: torch.Tensor, max_length: int, quantile: float) -> torch.Tensor:
    """For each row of bucket probabilities, the length below which `quantile` of the mass lies, each bucket's
    mass spread uniformly over its lengths."""
    num_buckets = probs.shape[1]
    cumulative = probs.cumsum(1)
    bucket = (cumulative < quantile).sum(1, keepdim=True).clamp(max=num_buckets - 1)
    mass = probs.gather(1, bucket).clamp(min=1e-12)
    below = cumulative.gather(1, bucket) - mass
    fraction = ((quantile - below) / mass).clamp(0, 1)
    return ((bucket + fraction) * max_length / num_buckets)[:, 0]


def _most_likely_window(probs: torch.Tensor, max_length: int, tolerance: int) -> torch.Tensor:
    """For each row of bucket probabilities, the length x maximizing P(|length - x| <= tolerance), the mass of
    each bucket spread uniformly over its lengths; of equally likely x, the one nearest the median."""
    num_buckets = probs.shape[1]
    lengths = torch.arange(1, max_length + 1, dtype=probs.dtype)
    buckets = bucket_of(lengths, num_buckets, max_length)
    counts = torch.bincount(buckets, minlength=num_buckets).to(probs.dtype)
    per_length = probs[:, buckets] / counts[buckets]  # [N, max_length]
    cumulative = F.pad(per_length.cumsum(1), (1, 0))  # cumulative[:, i] = P(length <= i)
    upper = (lengths + tolerance).clamp(max=max_length).long()
    lower = (lengths - tolerance - 1).clamp(min=0).long()
    window = cumulative[:, upper] - cumulative[:, lower]
    median = (cumulative[:, 1:] < 0.5).sum(1, keepdim=True) + 1
    best = window >= window.max(1, keepdim=True).values - 1e-6
    distance = (lengths[None, :] - median).abs()
    return torch.where(best, -distance, -float("inf")).argmax(1).to(probs.dtype) + 1


@dataclass
class TrainConfig:
    epochs: int = 300
    lr: float = 1e-3
    weight_decay: float = 1e-2
    seed: int = 0


def train_probe(config: ProbeConfig, hidden: torch.Tensor, prompt_lengths: torch.Tensor, labels: torch.Tensor,
                train: TrainConfig | None = None) -> ProbeHead:
    """A head trained full-batch with AdamW on these examples (the data set is a few hundred prompts)."""
    train = train or TrainConfig()
    if hidden.shape[0] != labels.shape[0] or hidden.shape[0] < 2:
        raise ValueError(f"need at least 2 examples with one label each, got {hidden.shape[0]} and "
                         f"{labels.shape[0]}")
    torch.manual_seed(train.seed)
    head = ProbeHead(config)
    x = head.inputs(hidden, prompt_lengths)
    head.mean.copy_(x.mean(0))
    head.std.copy_(x.std(0).clamp(min=1e-6))
    optimizer = torch.optim.AdamW(head.net.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    head.train()
    for _ in range(train.epochs):
        optimizer.zero_grad()
        loss = head.loss(head(hidden, prompt_lengths), labels)
        loss.backward()
        optimizer.step()
    return head.eval()


def default_probe_dir(model: str) -> str:
    """The shipped probe of a packaged model; ValueError if none is shipped."""
    if model not in SHIPPED_PROBES:
        raise ValueError(f"no probe is shipped for model {model!r}; shipped: {', '.join(SHIPPED_PROBES)} "
                         "(train one with `foreseer lengths train --predictor probe`)")
    return os.path.join(WEIGHTS_DIR, SHIPPED_PROBES[model])


