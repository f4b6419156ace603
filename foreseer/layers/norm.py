import torch
from torch import nn

from foreseer.layers.cpu_kernels import layer_ops


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, as the reference implementations do. Given `residual`, x is first added into it
    (the decoder's skip connection) and (normed, residual) is returned."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        kernels = layer_ops(x) if x.dim() == 2 and self.weight.dtype == torch.float32 else None
        if kernels is not None:
            x = x if x.stride(-1) == 1 else x.contiguous()
            if residual is None:
                return kernels.rms_norm(x, None, self.weight, self.eps)
            return kernels.rms_norm(x, residual, self.weight, self.eps), residual
        if residual is not None:
            residual = residual + x
            return self._norm(residual), residual
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
