import torch
import torch.nn.functional as F

from foreseer.layers.cpu_kernels import layer_ops


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [..., 2 I] holding gate then up: [..., I]."""
    kernels = layer_ops(gate_up) if gate_up.dim() == 2 else None
    if kernels is not None:
        return kernels.silu_and_mul(gate_up if gate_up.stride(-1) == 1 else gate_up.contiguous())
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gelu(gate, tanh approximation) * up for gate_up [..., 2 I] holding gate then up: [..., I] (Gemma's GeGLU)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


# HF's names of the activations a gated MLP applies to its gate.
GATED_ACTIVATIONS = {"silu": silu_and_mul, "gelu_pytorch_tanh": gelu_tanh_and_mul}
