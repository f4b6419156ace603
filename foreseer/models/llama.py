"""Llama 2/3 (and SmolLM), Mistral (its sliding window honoured) and Qwen2 (q/k/v biases)."""

from foreseer.models.config import ModelConfig
from foreseer.models.decoder import CausalLM, DecoderLayer, DecoderModel


class LlamaForCausalLM(CausalLM):
    architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
    gguf_architectures = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    gguf_interleaved_rope = frozenset({"llama"})

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, DecoderModel(cfg, DecoderLayer))

    @classmethod
    def finish_config(cls, cfg: ModelConfig) -> ModelConfig:
        cfg.qkv_bias = cfg.qkv_bias or cfg.architecture == "Qwen2ForCausalLM"
        return super().finish_config(cfg)
