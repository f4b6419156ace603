import torch
from torch import nn

from foreseer.attention import get_forward_context


class PagedAttention(nn.Module):
    """Attention over the paged KV cache; the runner assigns `kv_cache` after allocating it."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        backend, metadata = get_forward_context()
        return backend.forward(q, k, v, self.kv_cache, metadata, self.scale)
