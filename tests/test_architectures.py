"""Every supported architecture, as a tiny random model saved both as an HF directory and as a GGUF file (written
with the `gguf` package as llama.cpp lays one out): greedy output equal to transformers' on the HF directory, in
mixed batches, with chunked prefill, prefix caching and small blocks, past the 8-token attention windows of the
sliding-window models. Also: blocks behind a window are given back, the prefix cache stays right, unsupported
models are refused by name."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from gguf import GGMLQuantizationType, GGUFWriter
from gguf_export import tiny_gguf
from helpers import hf_greedy
from transformers import AutoModelForCausalLM

from foreseer import LLM, SamplingParams
from foreseer.core.block_manager import FREED
from foreseer.layers.quantized_linear import QuantizedLinear
from foreseer.models.loader import load_model_config, resolve_model

ARCHITECTURES = ["llama", "qwen2", "mistral", "qwen3", "gemma2", "gemma3", "phi3", "llama3_rope"]
LLAMA3_ROPE = {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
               "rope_theta": 500000.0}
WINDOW = 8  # the sliding window of the tiny mistral, gemma and phi3 models


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """arch -> HF directory of its tiny model, made on first use."""
    made: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in made:
            directory = str(tmp_path_factory.mktemp(f"tiny_{arch}"))
            overrides = LLAMA3_ROPE if arch == "llama3_rope" else {}
            made[arch] = make_tiny_model(directory, "llama" if arch == "llama3_rope" else arch,
                                         seed=ARCHITECTURES.index(arch), **overrides)
        return made[arch]

    return get


def _reference(directory: str):
    """transformers' model in float32 with its eager attention, the reference implementation (its SDPA path
    leaves Gemma 2's soft-capping out)."""
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, vocab, (n,), generator=g).tolist() for n in (3, 17, 40, 9, 1, 33)]
    return prompts + [prompts[2] + [7, 8, 9]]  # shares 40 tokens with another: a prefix cache hit


@pytest.mark.parametrize("source", ["hf", "gguf"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_matches_transformers(arch, source, tiny_models):
    directory = tiny_models(arch)
    hf = _reference(directory)
    prompts = _prompts(hf.config.vocab_size)
    expected = hf_greedy(hf, prompts, max_new_tokens=24)
    model = directory if source == "hf" else tiny_gguf(directory)
    # Small blocks and token budget: chunked prefill, many blocks per request, windows crossing blocks.
    llm = LLM(model, tokenizer=directory, kv_cache_gib=0.01, block_size=4, max_num_batched_tokens=40)
    assert any(isinstance(m, QuantizedLinear) for m in llm.engine.runner.model.modules())  # BF16 as stored
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert outputs[-1].metrics.num_cached_tokens > 0


def test_configs_read_what_each_architecture_needs(tiny_models):
    gemma3 = load_model_config(resolve_model(tiny_gguf(tiny_models("gemma3"))))
    assert gemma3.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    assert gemma3.rope_local_theta == 10000.0 and gemma3.rope_theta == 1000000.0
    assert gemma3.hidden_act == "gelu_pytorch_tanh" and gemma3.sliding_window == WINDOW
    gemma2 = load_model_config(resolve_model(tiny_models("gemma2")))
    assert (gemma2.attn_logit_softcap, gemma2.final_logit_softcap) == (50.0, 30.0)
    assert gemma2.attention_scale == pytest.approx(24**-0.5) and not gemma2.every_layer_slides
    for arch in ("mistral", "phi3"):
        for model in (tiny_models(arch), tiny_gguf(tiny_models(arch))):
            cfg = load_model_config(resolve_model(model))
            assert cfg.sliding_window == WINDOW and cfg.every_layer_slides
    llama3 = load_model_config(resolve_model(tiny_gguf(tiny_models("llama3_rope"))))
    assert llama3.rope_freq_factors is not None and max(llama3.rope_freq_factors) == 8.0
    qwen3 = load_model_config(resolve_model(tiny_gguf(tiny_models("qwen3"))))
    assert qwen3.head_dim == 32 and qwen3.num_attention_heads * qwen3.head_dim != qwen3.hidden_size


def test_blocks_behind_a_window_are_given_back(tiny_models):
    """Mistral (every layer slides): a request holds the blocks of its last 8 tokens and the one it writes into,
    however long it runs; its output stays transformers'."""
    directory = tiny_models("mistral")
    llm = LLM(directory, kv_cache_gib=0.01, block_size=4, enable_prefix_caching=False)
    engine = llm.engine
    prompt = list(range(5, 45))
    engine.add_request("long", prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    request = engine.scheduler.waiting[0]
    held, tokens = [], []
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens = output.outputs[0].token_ids
        if request.block_table:
            held.append(sum(block != FREED for block in request.block_table))
    assert max(held[1:]) <= WINDOW // 4 + 2  # after the prompt's chunk: window blocks, a partial one, the next
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    hf = _reference(directory)
    assert tokens == hf_greedy(hf, [prompt], max_new_tokens=40)[0]


def test_a_prefix_whose_blocks_fell_behind_the_window_is_reused_rightly(tiny_models):
    directory = tiny_models("phi3")
    llm = LLM(directory, kv_cache_gib=0.01, block_size=4)
    prompt = list(range(5, 45))
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    first = llm.generate([prompt], params, use_tqdm=False)[0]
    again = llm.generate([prompt], params, use_tqdm=False)[0]
    assert again.metrics.num_cached_tokens > 0
    fresh = LLM(directory, kv_cache_gib=0.01, block_size=4).generate([prompt], params, use_tqdm=False)[0]
    assert again.outputs[0].token_ids == first.outputs[0].token_ids == fresh.outputs[0].token_ids


def test_unsupported_models_are_refused_by_name(tmp_path, tiny_models):
    directory = tmp_path / "gpt2"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        LLM(str(directory))
    writer = GGUFWriter(str(tmp_path / "rwkv.gguf"), "rwkv6")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'rwkv6'"):
        load_model_config(resolve_model(str(tmp_path / "rwkv.gguf")))
    # A tensor type without a kernel: the model's GGUF with one matrix as IQ4_NL.
    from gguf import GGUFReader

    source = tiny_gguf(tiny_models("llama"))
    reader = GGUFReader(source)
    writer = GGUFWriter(str(tmp_path / "iq4.gguf"), "llama")
    for field in reader.fields.values():
        if field.name.startswith("llama.") or field.name.startswith("tokenizer."):
            writer.add_key_value(field.name, field.contents(), field.types[0],
                                 field.types[-1] if len(field.types) > 1 else None)
    for tensor in reader.tensors:
        data = np.asarray(tensor.data)
        if tensor.name == "blk.0.ffn_down.weight":
            rows, cols = int(tensor.shape[1]), int(tensor.shape[0])
            writer.add_tensor(tensor.name, np.zeros((rows, cols // 32 * 18), dtype=np.uint8),
                              raw_dtype=GGMLQuantizationType.IQ4_NL)
        else:
            writer.add_tensor(tensor.name, data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="unsupported type IQ4_NL"):
        LLM(str(tmp_path / "iq4.gguf"), tokenizer=tiny_models("llama"), kv_cache_gib=0.01)
    assert os.path.exists(source)


GEMMA_PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
                 "The three primary colors are", "Water boils at", "A haiku about autumn:\n",
                 "In 1969, the first human", "import numpy as np\nx = np.", "The best way to learn a language is",
                 "Q: What is 12 times 7?\nA:"]


@pytest.mark.slow
def test_gemma3_270m_gguf_matches_transformers():
    """The real Gemma 3 270M (base, Q4_K_M GGUF: Q5_0, Q4_K, Q6_K and Q8_0 blocks; 5 sliding layers to 1 full,
    512-token windows) from the PyPI package, against transformers loading the same file."""
    source = resolve_model("gemma-3-270m")
    llm = LLM("gemma-3-270m", kv_cache_gib=0.25)
    assert type(llm.engine.runner.model).__name__ == "GemmaForCausalLM"
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(source.path), gguf_file=os.path.basename(source.path),
                                              dtype=torch.float32, attn_implementation="eager").eval()
    prompts = [llm.tokenizer(p)["input_ids"] for p in GEMMA_PROMPTS]
    expected = hf_greedy(hf, prompts, max_new_tokens=24)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
