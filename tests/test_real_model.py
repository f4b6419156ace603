"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against Hugging Face transformers."""

import os

import pytest
import torch
from conftest import real_model_path
from helpers import hf_greedy

from foreseer import SamplingParams
from foreseer.models.loader import iter_weights, load_model_config, resolve_model
from foreseer.models.registry import build_model

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three prime numbers.",
    "How do I reverse a list in Python?",
    "Give me a name for a pet turtle.",
    "What is 12 times 7?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "Name a famous painting by Leonardo da Vinci.",
    "What does a CPU do?",
    "Suggest a title for a short story about a lighthouse.",
    "How many legs does a spider have?",
    "Write one sentence about autumn.",
    "What is the boiling point of water in Celsius?",
    "Give two tips for better sleep.",
]


def test_weights_match_transformers_gguf_loading(hf_real_model):
    hf, _ = hf_real_model
    source = resolve_model("smollm2-135m-instruct")
    assert source.path == real_model_path()
    ours = dict(iter_weights(source, build_model(load_model_config(source))))
    theirs = hf.state_dict()
    assert set(ours) == set(theirs) - {"lm_head.weight"}  # tied to the embeddings
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=0, msg=name)


def test_weights_stay_in_their_stored_format(real_llm):
    """Every projection, the embedding and the lm_head compute from the GGUF's blocks: the weights held take no
    more than 1.2x the file's bytes (an fp32 expansion takes 5.5x)."""
    from foreseer.layers.quantized_linear import QuantizedEmbedding, QuantizedLinear

    model = real_llm.engine.runner.model
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding) and isinstance(model.lm_head, QuantizedLinear)
    held = {t.data_ptr(): t.numel() * t.element_size()
            for t in [*model.parameters(), *model.buffers()] if not t.is_meta}
    assert sum(held.values()) <= 1.2 * os.path.getsize(real_model_path())


def test_greedy_chat_matches_transformers(real_llm, hf_real_model):
    """16 chat prompts, greedy, with the weights computed in their stored Q4_1/Q8_0 blocks: the same tokens as
    transformers, which expands the same GGUF to float32."""
    hf, tokenizer = hf_real_model
    prompts = [real_llm.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    assert prompts[0] == tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True, return_dict=True)["input_ids"]
    expected = hf_greedy(hf, prompts, max_new_tokens=48, eos_token_id=tokenizer.eos_token_id)
    outputs = real_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=48), use_tqdm=False)
    for out, want in zip(outputs, expected):
        got = out.outputs[0].token_ids
        assert got == want, (tokenizer.decode(got), tokenizer.decode(want))
        assert out.outputs[0].text == tokenizer.decode(want, skip_special_tokens=True)
    assert "Paris" in outputs[0].outputs[0].text


def test_chat_api_and_metrics(real_llm):
    outputs = real_llm.chat(
        [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "user", "content": "Say hello."}]],
        SamplingParams(temperature=0, max_tokens=32), use_tqdm=False,
    )
    assert "Paris" in outputs[0].outputs[0].text
    for out in outputs:
        assert out.finished and out.outputs[0].finish_reason in ("stop", "length")
        assert 0 < out.metrics.time_to_first_token <= out.metrics.e2e_latency


def test_default_model_name_resolves_inside_installed_package():
    source = resolve_model("smollm2-135m-instruct")
    assert source.is_gguf and os.path.basename(source.path).endswith(".gguf")
    with pytest.raises(ValueError, match="never downloads"):
        resolve_model("meta-llama/Llama-3-8B")
