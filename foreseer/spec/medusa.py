"""Medusa-1 draft heads: residual blocks on the base model's final hidden state, read out by its own lm_head.

Head i maps the final (post-norm) hidden state h of token t to h + SiLU(W_i h + b_i); the base model's lm_head
turns that into logits for token t + i + 2 (the lm_head on h itself predicts t + 1). The heads are trained with
the backbone and lm_head frozen (foreseer/training/train_medusa.py), so they ship as a few MB next to a model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_FILE = "medusa_config.json"
WEIGHTS_FILE = "medusa_heads.safetensors"
WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")
# Packaged model name -> directory of its trained heads under WEIGHTS_DIR.
SHIPPED_HEADS = {"smollm2-135m-instruct": "smollm2-135m-instruct-medusa"}


@dataclass
class MedusaConfig:
    num_heads: int
    hidden_size: int
    base_model: str = ""
    training: dict[str, Any] = field(default_factory=dict)  # how the heads were trained and how well they do


class MedusaHeads(nn.Module):
    def __init__(self, config: MedusaConfig) -> None:
        super().__init__()
        if config.num_heads < 1 or config.hidden_size < 1:
            raise ValueError(f"medusa heads need num_heads >= 1 and hidden_size >= 1, got {config}")
        self.config = config
        k, size = config.num_heads, config.hidden_size
        # All heads in one [num_heads, H, H] tensor: one batched matmul per step instead of one per head.
        # Zero weights and biases: an untrained head returns h, i.e. predicts exactly like the base lm_head.
        self.weight = nn.Parameter(torch.zeros(k, size, size))
        self.bias = nn.Parameter(torch.zeros(k, 1, size))

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def forward(self, hidden: torch.Tensor, num_heads: int | None = None) -> torch.Tensor:
        """hidden [N, H] (final, post-norm) -> [k, N, H] from the first k = `num_heads` heads (default all), ready for
        the base model's lm_head."""
        k = self.num_heads if num_heads is None else num_heads
        x = hidden.unsqueeze(0).expand(k, -1, -1)
        return x + F.silu(torch.baddbmm(self.bias[:k], x, self.weight[:k].transpose(1, 2)))

    def save(self, directory: str) -> None:
        """medusa_config.json and medusa_heads.safetensors (fp16: half the size, well within training noise)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_FILE), "w") as f:
            json.dump(dataclasses.asdict(self.config), f, indent=2)
            f.write("\n")
        tensors = {"weight": self.weight.detach().half().cpu().contiguous(),
                   "bias": self.bias.detach().squeeze(1).half().cpu().contiguous()}
        path = os.path.join(directory, WEIGHTS_FILE)
        save_file(tensors, path)
        os.chmod(path, 0o644)  # safetensors creates it owner-only; shipped heads must be readable by every user

    @classmethod
    def load(cls, directory: str, hidden_size: int, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> MedusaHeads:
        """Heads saved by `save`, for a base model with this hidden size, in the model's dtype and device."""
        from safetensors.torch import load_file

        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not os.path.isfile(os.path.join(directory, name)):
                raise ValueError(f"medusa heads directory {directory!r} has no {name}")
        with open(os.path.join(directory, CONFIG_FILE)) as f:
            raw = json.load(f)
        missing = {"num_heads", "hidden_size"} - set(raw)
        if missing:
            raise ValueError(f"{CONFIG_FILE} in {directory!r} lacks {sorted(missing)}")
        config = MedusaConfig(**{k: v for k, v in raw.items() if k in MedusaConfig.__dataclass_fields__})
        if config.hidden_size != hidden_size:
            raise ValueError(f"medusa heads in {directory!r} were trained for hidden size {config.hidden_size}, "
                             f"but the model has hidden size {hidden_size}")
        tensors = load_file(os.path.join(directory, WEIGHTS_FILE))
        k, size = config.num_heads, config.hidden_size
        expected = {"weight": (k, size, size), "bias": (k, size)}
        shapes = {name: tuple(t.shape) for name, t in tensors.items()}
        if shapes != expected:
            raise ValueError(f"{WEIGHTS_FILE} in {directory!r} holds {shapes}, expected {expected} from its config")
        heads = cls(config)
        with torch.no_grad():
            heads.weight.copy_(tensors["weight"])
            heads.bias.copy_(tensors["bias"].unsqueeze(1))
        return heads.to(device=device, dtype=dtype).eval()


def shipped_heads_dir(model_name: str) -> str | None:
    """The heads packaged with Foreseer for this packaged model name, or None when there are none."""
    name = SHIPPED_HEADS.get(model_name.lower())
    return os.path.join(WEIGHTS_DIR, name) if name else None
