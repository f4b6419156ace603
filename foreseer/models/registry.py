"""Architecture name -> model class: the HF names in config.json and the GGUF names in general.architecture."""

from torch import nn

from foreseer.models.config import ModelConfig
from foreseer.models.decoder import CausalLM
from foreseer.models.gemma import GemmaForCausalLM
from foreseer.models.llama import LlamaForCausalLM
from foreseer.models.phi3 import Phi3ForCausalLM
from foreseer.models.qwen3 import Qwen3ForCausalLM

_CLASSES: tuple[type[CausalLM], ...] = (LlamaForCausalLM, Qwen3ForCausalLM, GemmaForCausalLM, Phi3ForCausalLM)
MODEL_CLASSES: dict[str, type[CausalLM]] = {arch: cls for cls in _CLASSES for arch in cls.architectures}
GGUF_CLASSES: dict[str, type[CausalLM]] = {arch: cls for cls in _CLASSES for arch in cls.gguf_architectures}


def model_class(architecture: str) -> type[CausalLM]:
    if architecture not in MODEL_CLASSES:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: {sorted(MODEL_CLASSES)}")
    return MODEL_CLASSES[architecture]


def build_model(cfg: ModelConfig) -> nn.Module:
    return model_class(cfg.architecture)(cfg)
