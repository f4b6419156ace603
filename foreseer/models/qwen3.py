"""Qwen 3 (dense): Llama's layout with an RMSNorm over each query and key head before the rotary embedding."""

from functools import partial

from foreseer.models.config import ModelConfig
from foreseer.models.decoder import CausalLM, DecoderLayer, DecoderModel


class Qwen3ForCausalLM(CausalLM):
    architectures = ("Qwen3ForCausalLM",)
    gguf_architectures = {"qwen3": "Qwen3ForCausalLM"}

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, DecoderModel(cfg, partial(DecoderLayer, qk_norm=True)))
