"""Architecture description of a decoder, read from an HF config.json or GGUF metadata (the loader turns GGUF
metadata into the same keys first). What an architecture does with it is its model file's business."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SLIDING, FULL = "sliding_attention", "full_attention"  # HF's layer types


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # Tokens a sliding layer attends to, itself included, and which layers slide: None with a window means every
    # layer does (Mistral, Phi-3); Gemma interleaves sliding and full layers.
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    rope_local_theta: float | None = None  # the sliding layers' rope base, where it differs (Gemma 3)
    rope_freq_factors: list[float] | None = None  # GGUF rope_freqs (Llama 3.1+): each inverse frequency divided
    attention_scale: float | None = None  # None: head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    attn_logit_softcap: float | None = None  # scores become cap * tanh(score / cap) (Gemma 2)
    final_logit_softcap: float | None = None
    hidden_act: str | None = "silu"  # the MLP gate's activation (HF's name); None: the architecture's default

    def is_sliding(self, layer: int) -> bool:
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == SLIDING

    def window(self, layer: int) -> int | None:
        """Tokens layer `layer` attends to (itself included), or None for all."""
        return self.sliding_window if self.is_sliding(layer) else None

    @property
    def every_layer_slides(self) -> bool:
        """Whether no layer reads keys further back than the window: blocks behind it can be freed."""
        return all(self.is_sliding(i) for i in range(self.num_hidden_layers))

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], architecture: str) -> ModelConfig:
        """The fields every architecture shares, from HF config.json keys (transformers 4 and 5 layouts)."""
        heads = cfg["num_attention_heads"]
        rope_scaling, rope_theta, local_theta = cfg.get("rope_scaling"), cfg.get("rope_theta"), None
        # transformers >= 5 folds theta into "rope_parameters", per layer type where they differ (Gemma 3).
        params = cfg.get("rope_parameters") or {}
        if SLIDING in params or FULL in params:
            local_theta = params.get(SLIDING, {}).get("rope_theta")
            params = params.get(FULL, params.get(SLIDING, {}))
        if params:
            rope_theta = params.get("rope_theta", rope_theta)
            if params.get("rope_type", "default") != "default":
                rope_scaling = params
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        scalar = cfg.get("query_pre_attn_scalar")
        return cls(
            architecture=architecture,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta if rope_theta is not None else 10000.0,
            rope_scaling=rope_scaling,
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=cfg.get("attention_bias", False),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=_as_list(cfg.get("eos_token_id")),
            sliding_window=window,
            layer_types=cfg.get("layer_types") if window is not None else None,
            rope_local_theta=local_theta if local_theta is not None else cfg.get("rope_local_base_freq"),
            rope_freq_factors=cfg.get("rope_freq_factors"),
            attention_scale=cfg.get("attention_scale") or (None if scalar is None else scalar**-0.5),
            attn_logit_softcap=cfg.get("attn_logit_softcapping"),
            final_logit_softcap=cfg.get("final_logit_softcapping"),
            hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act"),
        )


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
