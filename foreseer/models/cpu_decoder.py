"""A decode step of a Llama-family model as one C++ call on the CPU (csrc/llama_decoder_cpu.cpp).

At batch 1 a decode step of the default model runs about 300 kernels of a few microseconds each; calling them one
by one from Python costs more than the kernels themselves. The fused decoder runs the same kernels over the same
weights and KV cache in one call and one OpenMP region, so its hidden states are bit for bit those of the modules
(tests/test_cpu_decoder.py checks it). It serves steps whose every token is a decode row (one-token decodes and
draft chains to verify) without LoRA adapters, on weights kept as stored and the CPU attention backend's split-KV
kernel; every other step runs the modules.
"""

from __future__ import annotations

import logging
import math
import os
import sys

import torch

from foreseer.attention import AttentionBackend, AttentionMetadata
from foreseer.attention.cpu_backend import CpuPagedAttention
from foreseer.extensions import load_cpu_extension
from foreseer.layers.quantized_linear import QuantizedEmbedding, QuantizedLinear
from foreseer.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "llama_decoder_cpu.cpp")


def load_decoder_kernels():
    """The compiled fused decoder, or None where it cannot be built."""
    # No fused multiply-add beyond the kernels' explicit ones: each op rounds as the modules' kernels do.
    return load_cpu_extension("foreseer_llama_decoder_cpu", _SOURCE, ("-ffp-contract=off",))


def _parts(linear: QuantizedLinear) -> tuple[list[torch.Tensor], list[int]]:
    parts = linear.parts
    return [p.data for p in parts], [p.format.ggml_type for p in parts]


class FusedCpuDecoder:
    """The decoder layers of `model` as one C++ call per decode step (see the module's docstring)."""

    def __init__(self, model: LlamaForCausalLM, backend: CpuPagedAttention, kernels) -> None:
        cfg, inner = model.config, model.model
        attention = inner.layers[0].self_attn
        self.backend = backend
        self.num_layers = len(inner.layers)
        self.decoder = kernels.LlamaDecoder(
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size, cfg.intermediate_size,
            inner.norm.eps, attention.attn.scale, attention.rotary_emb.cos, attention.rotary_emb.sin,
            inner.embed_tokens.qweight, inner.embed_tokens.format.ggml_type, inner.norm.weight.data,
            attention.attn.kv_cache[0].shape[-1])
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            bias = attn.qkv_proj.bias
            self.decoder.add_layer(
                layer.input_layernorm.weight.data, layer.post_attention_layernorm.weight.data,
                *_parts(attn.qkv_proj), None if bias is None else bias.data, *_parts(attn.o_proj),
                *_parts(mlp.gate_up_proj), *_parts(mlp.down_proj), *attn.attn.kv_cache)
        linears = [m for m in inner.modules() if isinstance(m, QuantizedLinear)]
        # Rows up to which every projection takes the flat GEMM: past it, dequantized tiles into BLAS are faster.
        self.max_rows = min(m.flat_max_rows for m in linears)

    @classmethod
    def build(cls, model: torch.nn.Module, backend: AttentionBackend) -> FusedCpuDecoder | None:
        """The fused decoder of `model`, or None where it does not apply (the reason is logged)."""
        reason = cls._unsupported(model, backend)
        kernels = None if reason else load_decoder_kernels()
        if reason is None and kernels is None:
            reason = "its kernels could not be built"
        if reason:
            logger.info("decode steps run the model's modules: %s", reason)
            return None
        decoder = cls(model, backend, kernels)
        rows = "any number of" if decoder.max_rows == sys.maxsize else f"up to {decoder.max_rows}"
        logger.info("decode steps of %s rows run as one fused C++ call", rows)
        return decoder

    @staticmethod
    def _unsupported(model: torch.nn.Module, backend: AttentionBackend) -> str | None:
        if type(model) is not LlamaForCausalLM:
            return f"no fused decoder for {type(model).__name__}"
        if model.config.sliding_window is not None:
            return "its layers attend through a sliding window"
        if model.config.hidden_act != "silu":
            return f"its MLP's activation is {model.config.hidden_act}"
        if not isinstance(backend, CpuPagedAttention) or backend.decode_kernel != "split_kv":
            return "the attention backend is not the CPU split-KV kernel"
        if backend.unified_max == "layer":
            return "unified_max='layer' keeps per-layer state between steps"
        inner = model.model
        projections = [m for layer in inner.layers for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                               layer.mlp.gate_up_proj, layer.mlp.down_proj)]
        if not isinstance(inner.embed_tokens, QuantizedEmbedding) or not all(
                isinstance(m, QuantizedLinear) for m in projections):
            return "weights are not all kept as stored (weight_format float32)"
        if any(p.dtype != torch.float32 for p in inner.parameters()):
            return "parameters are not all float32"
        if inner.layers[0].self_attn.attn.kv_cache is None:
            return "no KV cache"
        return None

    def supports(self, metadata: AttentionMetadata, num_tokens: int) -> bool:
        """Whether a step of this layout runs fused: decode rows only, few enough for the flat GEMM."""
        return not metadata.prefills and metadata.num_decode_tokens == num_tokens <= self.max_rows

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
                 capture_layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """(final hidden states [T, hidden], the residual stream after each decoder layer (1-based) in
        `capture_layers`), as the modules and their forward hooks give them."""
        unified = self.backend.unified_max
        phi = math.nan if unified == "sink" else float(unified)
        hidden, captured, recomputed = self.decoder.forward(
            input_ids, positions, metadata.slot_mapping, metadata.decode_block_tables, metadata.decode_seq_lens,
            [layer - 1 for layer in capture_layers], phi, self.backend.chunk_tokens)
        self.backend.recomputed_chunks += recomputed
        return hidden, dict(zip(capture_layers, captured))
