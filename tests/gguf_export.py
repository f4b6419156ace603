"""Write a tiny HF model directory as a GGUF file the way llama.cpp's converter lays it out (the `gguf` package's
writer and tensor names): Llama's Q and K rows interleaved, Gemma's norm weights stored plus one, Phi-3's fused
projections under its own names, Llama 3 rope scaling as a rope_freqs tensor. Matrices are written as BF16, the
HF directory's own values, so that the GGUF holds the same model; norms and vectors as F32."""

from __future__ import annotations

import json
import math
import os

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, get_tensor_name_map
from gguf.constants import MODEL_ARCH_NAMES
from gguf.quants import quantize
from safetensors.torch import load_file

GGUF_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
             "Qwen3ForCausalLM": "qwen3", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3",
             "Phi3ForCausalLM": "phi3"}


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's interleaving of each head's rotary halves (its converter's LlamaModel.permute)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def _llama3_rope_factors(cfg: dict) -> np.ndarray:
    """The per-dimension divisors llama.cpp writes as rope_freqs for Llama 3 rope scaling."""
    scaling = cfg["rope_scaling"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    freqs = 1.0 / (cfg["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low = scaling["original_max_position_embeddings"] / scaling["low_freq_factor"]
    high = scaling["original_max_position_embeddings"] / scaling["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high:
            factors.append(1.0)
        elif wavelen > low:
            factors.append(scaling["factor"])
        else:
            smooth = (scaling["original_max_position_embeddings"] / wavelen - scaling["low_freq_factor"]) / (
                scaling["high_freq_factor"] - scaling["low_freq_factor"])
            factors.append(1.0 / ((1 - smooth) / scaling["factor"] + smooth))
    return np.asarray(factors, dtype=np.float32)


def write_gguf(hf_dir: str, path: str) -> str:
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    architecture = cfg["architectures"][0]
    arch = GGUF_ARCH[architecture]
    arch_id = next(a for a, name in MODEL_ARCH_NAMES.items() if name == arch)
    layers = cfg["num_hidden_layers"]
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    writer = GGUFWriter(path, arch)
    writer.add_block_count(layers)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    rope = cfg.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)
    writer.add_rope_freq_base(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    writer.add_vocab_size(cfg["vocab_size"])
    if cfg.get("sliding_window") and cfg.get("use_sliding_window", True):
        writer.add_sliding_window(cfg["sliding_window"])
    if cfg.get("query_pre_attn_scalar") and cfg["query_pre_attn_scalar"] != head_dim:  # llama.cpp: by model size
        writer.add_attention_scale(cfg["query_pre_attn_scalar"] ** -0.5)
    if cfg.get("attn_logit_softcapping"):
        writer.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
    if cfg.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"])
    names = get_tensor_name_map(arch_id, layers)
    scaling = cfg.get("rope_scaling") or rope
    if scaling.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_factors({**cfg, "rope_scaling": scaling,
                                                                     "rope_theta": rope.get("rope_theta")}))
    tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
    for hf_name, tensor in tensors.items():
        if hf_name == "lm_head.weight" and cfg.get("tie_word_embeddings", True):
            continue
        base, _, suffix = hf_name.rpartition(".")
        name = f"{names.get_name(base)}.{suffix}"
        data = tensor.float().numpy()
        if arch == "llama" and base.endswith(("q_proj", "k_proj")):
            data = _permute(data, heads if base.endswith("q_proj") else kv_heads)
        if arch.startswith("gemma") and hf_name.endswith("norm.weight"):
            data = data + 1
        if data.ndim == 2:
            writer.add_tensor(name, quantize(data, GGMLQuantizationType.BF16), raw_dtype=GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_gguf(hf_dir: str) -> str:
    """The model of `hf_dir` as model.gguf in a directory of its own (an HF directory takes its config.json)."""
    directory = os.path.join(hf_dir + "-gguf")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "model.gguf")
    return path if os.path.exists(path) else write_gguf(hf_dir, path)



