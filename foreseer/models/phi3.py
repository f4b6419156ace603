"""Phi-3: Llama's layout, its checkpoints storing qkv and gate-up fused, every layer in a sliding window."""

from foreseer.models.config import ModelConfig
from foreseer.models.decoder import CausalLM, DecoderLayer, DecoderModel


class Phi3ForCausalLM(CausalLM):
    architectures = ("Phi3ForCausalLM",)
    gguf_architectures = {"phi3": "Phi3ForCausalLM"}
    stacked_params = {}  # the checkpoint's qkv_proj and gate_up_proj are this model's

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, DecoderModel(cfg, DecoderLayer))

    @classmethod
    def finish_config(cls, cfg: ModelConfig) -> ModelConfig:
        scaling = cfg.rope_scaling or {}
        if scaling.get("rope_type", scaling.get("type", "default")) in ("longrope", "su"):
            raise ValueError("Phi-3's longrope scaling (its 128k-context variants) is not supported")
        return super().finish_config(cfg)
