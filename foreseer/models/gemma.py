"""Gemma 2 and Gemma 3 (text): sandwich norms whose weights count from one, embeddings scaled by sqrt(hidden),
GeGLU, queries scaled by query_pre_attn_scalar, interleaved sliding and full layers (Gemma 3's sliding layers with
their own rope base, its q/k heads normed), soft-capped attention scores and logits where the config has them."""

from functools import partial

import torch

from foreseer.models.config import FULL, SLIDING, ModelConfig
from foreseer.models.decoder import CausalLM, DecoderModel, SandwichDecoderLayer

# What a config (a GGUF's above all) may leave out: transformers' defaults for these architectures.
_SLIDING_PATTERN = {"Gemma2ForCausalLM": 2, "Gemma3ForCausalLM": 6}  # every n-th layer is a full one
_QUERY_PRE_ATTN_SCALAR = 256
_GEMMA3_LOCAL_ROPE_THETA = 10000.0


class GemmaForCausalLM(CausalLM):
    architectures = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
    gguf_architectures = {"gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
    default_activation = "gelu_pytorch_tanh"  # GeGLU

    def __init__(self, cfg: ModelConfig) -> None:
        layer = partial(SandwichDecoderLayer, qk_norm=cfg.architecture == "Gemma3ForCausalLM")
        super().__init__(cfg, DecoderModel(cfg, layer, embedding_scale=cfg.hidden_size**0.5))

    @classmethod
    def finish_config(cls, cfg: ModelConfig) -> ModelConfig:
        if cfg.sliding_window is not None and cfg.layer_types is None:
            every = _SLIDING_PATTERN[cfg.architecture]
            cfg.layer_types = [FULL if (i + 1) % every == 0 else SLIDING for i in range(cfg.num_hidden_layers)]
        if cfg.attention_scale is None:
            cfg.attention_scale = _QUERY_PRE_ATTN_SCALAR**-0.5
        if cfg.architecture == "Gemma3ForCausalLM" and cfg.rope_local_theta is None:
            cfg.rope_local_theta = _GEMMA3_LOCAL_ROPE_THETA
        return super().finish_config(cfg)

    def transform_weight(self, name: str, tensor: torch.Tensor, from_gguf: bool) -> torch.Tensor:
        """A norm scales by 1 + weight (computed in float32, as transformers does); llama.cpp's converter stored
        1 + weight, which transformers takes back to weight first."""
        if not name.endswith("norm.weight"):
            return tensor
        weight = tensor.float() - 1 if from_gguf else tensor.float()
        return 1.0 + weight
