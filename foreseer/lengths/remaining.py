"""The remaining-length head (after TRAIL, Shahout et al., ICLR 2025): a small MLP on the residual stream after one
decoder layer, read at the end of the prefill and then every few decode steps, that predicts how many tokens the
request has LEFT, as a distribution over length buckets (not one number).

Inputs: that layer's hidden state at the request's latest token, log(1 + tokens generated) and log(prompt
length), standardized with the training set's statistics. Output: logits over buckets of remaining length with
edges that widen geometrically (a heavy-tailed quantity needs fine buckets for short answers, coarse ones for
long). Training reads every position of every answer (foreseer/training/lengths/traces.py); an answer stopped by
its max_tokens is censored, so its examples only say "more than r tokens were left", and the loss is the
probability of that (-log P(R > r)) rather than of a bucket it never reached.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from foreseer.core.length_estimate import RemainingLength
from foreseer.lengths.head_files import load_head_files, save_head

CONFIG_FILE = "remaining_config.json"
WEIGHTS_FILE = "remaining_head.safetensors"
WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")
# Packaged model name -> directory of its trained head under WEIGHTS_DIR.
SHIPPED_HEADS = {"smollm2-135m-instruct": "smollm2-135m-instruct-remaining"}
DEFAULT_EDGES = (0, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024,
                 1536, 2048, 4096)


@dataclass
class RemainingHeadConfig:
    hidden_size: int  # of the base model
    layer: int  # the decoder layer (1-based) whose output the head reads
    edges: list[int] = field(default_factory=lambda: list(DEFAULT_EDGES))  # bucket b: (edges[b], edges[b + 1]]
    hidden_dim: int = 256  # of the MLP
    base_model: str = ""
    training: dict[str, Any] = field(default_factory=dict)  # how the head was trained and how well it does

    def __post_init__(self) -> None:
        if self.hidden_size < 1 or self.layer < 1 or self.hidden_dim < 1:
            raise ValueError(f"hidden_size, layer and hidden_dim must be >= 1, got {self.hidden_size!r}, "
                             f"{self.layer!r}, {self.hidden_dim!r}")
        if len(self.edges) < 3 or self.edges[0] != 0 or any(b <= a for a, b in zip(self.edges, self.edges[1:])):
            raise ValueError(f"edges must start at 0 and increase, with at least 2 buckets; got {self.edges!r}")

    @property
    def num_buckets(self) -> int:
        return len(self.edges) - 1


class RemainingHead(nn.Module):
    def __init__(self, config: RemainingHeadConfig) -> None:
        super().__init__()
        self.config = config
        num_inputs = config.hidden_size + 2
        self.register_buffer("mean", torch.zeros(num_inputs))
        self.register_buffer("std", torch.ones(num_inputs))
        self.register_buffer("edges", torch.tensor(config.edges, dtype=torch.float32))
        self.net = nn.Sequential(nn.Linear(num_inputs, config.hidden_dim), nn.GELU(), nn.Dropout(0.1),
                                 nn.Linear(config.hidden_dim, config.num_buckets))

    def inputs(self, hidden: torch.Tensor, generated: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
        """[N, hidden_size + 2] raw features (before standardization)."""
        if hidden.ndim != 2 or hidden.shape[1] != self.config.hidden_size:
            raise ValueError(f"hidden states must be [N, {self.config.hidden_size}], got {list(hidden.shape)}")
        for name, values in (("generated", generated), ("prompt_lengths", prompt_lengths)):
            if values.shape != (hidden.shape[0],):
                raise ValueError(f"{name} must be [{hidden.shape[0]}], got {list(values.shape)}")
        hidden = hidden.to(self.mean.device, torch.float32)
        return torch.cat([hidden, generated.to(hidden).clamp(min=0).log1p()[:, None],
                          prompt_lengths.to(hidden).clamp(min=1).log()[:, None]], dim=1)

    def forward(self, hidden: torch.Tensor, generated: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
        """[N, num_buckets] logits of the remaining length's bucket."""
        return self.net((self.inputs(hidden, generated, prompt_lengths) - self.mean) / self.std)

    def survival(self, logits: torch.Tensor, remaining: torch.Tensor) -> torch.Tensor:
        """P(R > remaining) per row, each bucket's mass spread uniformly over its range."""
        probs = logits.softmax(-1)
        low, high = self.edges[:-1], self.edges[1:]
        above = ((high - remaining.float()[:, None]) / (high - low)).clamp(0, 1)
        return (probs * above).sum(-1)

    def loss(self, logits: torch.Tensor, remaining: torch.Tensor, censored: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood: of the bucket of an observed remaining length, or, for a censored one
        (the answer was cut at max_tokens after `remaining` more tokens, not at its end), of R > remaining."""
        bucket = torch.bucketize(remaining.float().clamp(max=self.config.edges[-1]), self.edges[1:-1], right=False)
        observed = F.cross_entropy(logits, bucket, reduction="none")
        cut = -self.survival(logits, remaining).clamp(min=1e-9).log()
        return torch.where(censored, cut, observed).mean()

    @torch.inference_mode()
    def predict(self, hidden: torch.Tensor, generated: torch.Tensor, prompt_lengths: torch.Tensor
                ) -> list[RemainingLength]:
        """One distribution per row, made at `generated` tokens."""
        was_training = self.training
        self.eval()
        probs = self(hidden, generated, prompt_lengths).softmax(-1).double().cpu().tolist()
        self.train(was_training)
        edges = self.config.edges
        return [RemainingLength.create(edges, p, int(t)) for p, t in zip(probs, generated.tolist())]

    def save(self, directory: str) -> None:
        """remaining_config.json and remaining_head.safetensors (fp32: the head is small)."""
        save_head(self, self.config, directory, CONFIG_FILE, WEIGHTS_FILE)

    @classmethod
    def load(cls, directory: str, hidden_size: int | None = None) -> RemainingHead:
        """A head saved by `save`; with hidden_size, checks that it fits the base model."""
        config, weights = load_head_files(directory, RemainingHeadConfig, CONFIG_FILE, WEIGHTS_FILE,
                                          "remaining-length head", hidden_size)
        head = cls(config)
        head.load_state_dict(weights)
        return head.eval()


@dataclass
class HeadTrainConfig:
    epochs: int = 8
    batch_size: int = 4096
    lr: float = 1e-3
    weight_decay: float = 1e-2
    seed: int = 0


def train_remaining_head(config: RemainingHeadConfig, hidden: torch.Tensor, generated: torch.Tensor,
                         prompt_lengths: torch.Tensor, remaining: torch.Tensor, censored: torch.Tensor,
                         train: HeadTrainConfig | None = None) -> RemainingHead:
    """A head trained with AdamW on shuffled minibatches of these examples (one per answer position)."""
    train = train or HeadTrainConfig()
    count = hidden.shape[0]
    if count < 2 or any(t.shape != (count,) for t in (generated, prompt_lengths, remaining, censored)):
        raise ValueError(f"need at least 2 examples with one of each label, got {count}")
    generator = torch.Generator().manual_seed(train.seed)
    torch.manual_seed(train.seed)
    head = RemainingHead(config)
    sample = torch.randperm(count, generator=generator)[:100_000]
    x = head.inputs(hidden[sample], generated[sample], prompt_lengths[sample])
    head.mean.copy_(x.mean(0))
    head.std.copy_(x.std(0).clamp(min=1e-6))
    optimizer = torch.optim.AdamW(head.net.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    steps = train.epochs * -(-count // train.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, train.lr, total_steps=steps)
    head.train()
    for _ in range(train.epochs):
        for batch in torch.randperm(count, generator=generator).split(train.batch_size):
            optimizer.zero_grad()
            logits = head(hidden[batch], generated[batch], prompt_lengths[batch])
            head.loss(logits, remaining[batch], censored[batch]).backward()
            optimizer.step()
            schedule.step()
    return head.eval()


def default_head_dir(model: str) -> str:
    """The shipped remaining-length head of a packaged model; ValueError if none is shipped."""
    if model not in SHIPPED_HEADS:
        raise ValueError(f"no remaining-length head is shipped for model {model!r}; shipped: "
                         f"{', '.join(SHIPPED_HEADS)} (train one with `foreseer lengths train --predictor remaining`)")
    return os.path.join(WEIGHTS_DIR, SHIPPED_HEADS[model])
