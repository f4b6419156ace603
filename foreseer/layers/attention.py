import torch
from torch import nn

from foreseer.attention import get_forward_context


class PagedAttention(nn.Module):
    """Attention over the paged KV cache; the runner assigns `kv_cache` after allocating it.

    scale: of the scores (default head_dim ** -0.5); window: tokens each query attends to, itself included (None:
    all before it); softcap: scores become softcap * tanh(score / softcap) before the softmax (None: as they are)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None,
                 window: int | None = None, softcap: float | None = None) -> None:
        super().__init__()
        if window is not None and window < 1:
            raise ValueError(f"an attention window must hold at least one token, got {window}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        self.window, self.softcap = window, softcap
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        backend, metadata = get_forward_context()
        return backend.forward(q, k, v, self.kv_cache, metadata, self.scale, self.window, self.softcap)
