"""Greedy output is token-identical to Hugging Face transformers' generate with the same weights."""

import pytest
import torch
from helpers import hf_greedy
from transformers import AutoModelForCausalLM

from foreseer import LLM, SamplingParams


def _prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("weight_format", ["auto", "float32"])
@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_qwen2", "tiny_llama3_rope"])
def test_greedy_matches_hf_in_mixed_batch(model_fixture, weight_format, request):
    """Weights computed as stored (bfloat16 kernels) and expanded to float32 (the reference path): both exact."""
    from foreseer.layers.quantized_linear import QuantizedLinear

    path = request.getfixturevalue(model_fixture)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = _prompts(hf.config.vocab_size, [3, 17, 40, 9, 64, 1, 33, 120])
    expected = hf_greedy(hf, prompts, max_new_tokens=64)
    # A small block size and token budget force chunked prefill and many blocks per request.
    llm = LLM(path, kv_cache_gib=0.01, block_size=4, max_num_batched_tokens=48, weight_format=weight_format)
    stored = [isinstance(m, QuantizedLinear) for m in llm.engine.runner.model.modules()]
    assert any(stored) == (weight_format == "auto")
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert all(o.outputs[0].finish_reason == "length" for o in outputs)
