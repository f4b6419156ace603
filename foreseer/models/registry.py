"""Architecture name -> model class."""

from torch import nn

from foreseer.models.config import ModelConfig
from foreseer.models.llama import LlamaForCausalLM

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.architecture not in MODEL_CLASSES:
        raise ValueError(f"unsupported architecture {cfg.architecture!r}; supported: {sorted(MODEL_CLASSES)}")
    return MODEL_CLASSES[cfg.architecture](cfg)
