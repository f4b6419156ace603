"""Rotary position embeddings (non-interleaved, HF layout) with default, linear and llama3 scaling, and GGUF's
per-dimension frequency factors (rope_freqs)."""

import functools
import math
from typing import Any

import torch
from torch import nn

from foreseer.layers.cpu_kernels import layer_ops


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None,
                  freq_factors: tuple[float, ...] | None = None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if freq_factors is not None:  # llama.cpp divides each dimension's frequency by its factor
        if len(freq_factors) != head_dim // 2:
            raise ValueError(f"rope_freqs holds {len(freq_factors)} factors, expected {head_dim // 2}")
        inv_freq = inv_freq / torch.tensor(freq_factors, dtype=torch.float32)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: default, linear, llama3")


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None,
                 freq_factors: list[float] | None = None) -> None:
        super().__init__()
        cos, sin = _cos_sin(head_dim, max_positions, theta, tuple(sorted((scaling or {}).items())),
                            None if freq_factors is None else tuple(freq_factors), torch.get_default_device())
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, H, D], k: [T, Hkv, D]; positions: [T]. On the CPU, q and k are rotated in place."""
        kernels = layer_ops(q)
        if kernels is not None and k.dtype == q.dtype and q.stride(-1) == k.stride(-1) == 1:
            kernels.apply_rotary_(q, k, self.cos, self.sin, positions)
            return q, k
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


@functools.cache
def _cos_sin(head_dim: int, max_positions: int, theta: float, scaling_items: tuple,
             freq_factors: tuple[float, ...] | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The cos and sin tables [max_positions, head_dim], one pair shared by every layer of a model (a 2k-position
    model's tables are as large as a small model's weights)."""
    scaling = dict(scaling_items) or None
    inv_freq = rope_inv_freq(head_dim, theta, scaling, freq_factors).to(device)
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32, device=device), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
