"""Model loading: GGUF tensor types and layouts against transformers' own GGUF loader; HF config parsing."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import quantize

from foreseer.models.loader import config_from_hf_dict, iter_weights, load_model_config, resolve_model
from foreseer.models.registry import build_model

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 256, 512, 4, 2, 64


def _k_quant_bytes(rng, qtype: Q, rows: int, cols: int) -> np.ndarray:
    """Random K-quant blocks (the gguf package cannot quantize to these) with sane float16 scales."""
    block_bytes = {Q.Q4_K: 144, Q.Q6_K: 210}[qtype]
    blocks = rng.integers(0, 256, size=(rows, cols // 256, block_bytes), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    if qtype == Q.Q4_K:
        blocks[..., 0:2] = scale  # d
        blocks[..., 2:4] = scale  # dmin
    else:
        blocks[..., 208:210] = scale  # d
    return blocks.reshape(rows, -1)


def _write_gguf(path: str) -> None:
    rng = np.random.default_rng(0)
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)

    def weight(name: str, rows: int, cols: int, qtype: Q) -> None:
        data = rng.standard_normal((rows, cols)).astype(np.float32) * 0.1
        if qtype == Q.F32:
            writer.add_tensor(name, data)
        elif qtype == Q.F16:
            writer.add_tensor(name, data.astype(np.float16))
        elif qtype in (Q.Q4_K, Q.Q6_K):
            writer.add_tensor(name, _k_quant_bytes(rng, qtype, rows, cols), raw_dtype=qtype)
        else:
            writer.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)

    weight("token_embd.weight", VOCAB, HIDDEN, Q.Q8_0)
    weight("output.weight", VOCAB, HIDDEN, Q.F16)  # untied
    writer.add_tensor("output_norm.weight", rng.standard_normal(HIDDEN).astype(np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(HIDDEN).astype(np.float32))
    writer.add_tensor("blk.0.ffn_norm.weight", rng.standard_normal(HIDDEN).astype(np.float32))
    weight("blk.0.attn_q.weight", HIDDEN, HIDDEN, Q.Q4_K)
    weight("blk.0.attn_k.weight", HIDDEN // 2, HIDDEN, Q.Q6_K)
    weight("blk.0.attn_v.weight", HIDDEN // 2, HIDDEN, Q.BF16)
    weight("blk.0.attn_output.weight", HIDDEN, HIDDEN, Q.Q4_0)
    weight("blk.0.ffn_gate.weight", FFN, HIDDEN, Q.Q4_1)
    weight("blk.0.ffn_up.weight", FFN, HIDDEN, Q.Q8_0)
    weight("blk.0.ffn_down.weight", HIDDEN, FFN, Q.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_types_and_rotary_layout_match_transformers(tmp_path):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = str(tmp_path / "tiny.gguf")
    _write_gguf(path)
    source = resolve_model(path)
    cfg = load_model_config(source)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads) == \
        (HIDDEN, FFN, HEADS, KV_HEADS)
    assert cfg.rope_theta == 50000.0 and not cfg.tie_word_embeddings and cfg.vocab_size == VOCAB
    ours = dict(iter_weights(source, build_model(cfg)))
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = load_gguf_checkpoint(path)["config"]
    hf_model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in hf_config.items() if k != "model_type"}))
    theirs = load_gguf_checkpoint(path, return_tensors=True, model_to_load=hf_model)["tensors"]
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        reference = torch.as_tensor(np.asarray(theirs[name]), dtype=torch.float32)
        torch.testing.assert_close(tensor, reference, rtol=0, atol=0, msg=name)
        assert torch.isfinite(tensor).all(), name


def test_loaded_gguf_model_runs(tmp_path):
    path = str(tmp_path / "tiny.gguf")
    _write_gguf(path)
    source = resolve_model(path)
    model = build_model(load_model_config(source))
    model.load_weights(iter_weights(source, model))
    torch.testing.assert_close(model.lm_head.weight, dict(iter_weights(source, model))["lm_head.weight"])


def test_hf_config_parsing():
    base = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 100}
    qwen = config_from_hf_dict({**base, "architectures": ["Qwen2ForCausalLM"], "num_key_value_heads": 2,
                                "eos_token_id": [5, 6]})
    assert qwen.qkv_bias and qwen.num_key_value_heads == 2 and qwen.head_dim == 16 and qwen.eos_token_ids == [5, 6]
    llama = config_from_hf_dict({**base, "model_type": "llama", "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}})
    assert llama.rope_theta == 500000.0 and llama.rope_scaling["rope_type"] == "llama3"
    assert not llama.qkv_bias and llama.num_key_value_heads == 4
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        config_from_hf_dict({**base, "architectures": ["GPT2LMHeadModel"]})


def test_missing_model_paths_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not a .gguf file"):
        (tmp_path / "weights.bin").write_bytes(b"x")
        resolve_model(str(tmp_path / "weights.bin"))
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(str(tmp_path))
