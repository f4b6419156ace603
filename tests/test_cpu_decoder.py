"""The fused C++ decode step against the model's modules: the same hidden states and captured layer outputs, bit for
bit, over KV caches the modules filled, for one-token decodes and chains, short and multi-chunk contexts."""

from __future__ import annotations

import pytest
import torch

from foreseer import LLM, SamplingParams
from foreseer.attention import forward_context
from foreseer.core.draft_tree import DraftTree
from foreseer.worker.inputs import Segment, prepare_batch
from tests.helpers import random_prompts


def _filled(llm: LLM, lengths: list[int], seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Prompts of these lengths prefilled through the modules into fresh blocks: (prompts, block tables)."""
    runner = llm.engine.runner
    block = runner.block_size
    prompts = random_prompts(llm.engine.model_config.vocab_size, lengths, seed)
    tables, next_block = [], 1  # block 0 stays unused: a table's padding points at it
    for prompt in prompts:
        blocks = -(-(len(prompt) + 8) // block)  # room for a chain of new tokens
        tables.append(list(range(next_block, next_block + blocks)))
        next_block += blocks
    assert next_block <= runner.num_blocks
    for prompt, table in zip(prompts, tables):
        batch = prepare_batch([Segment(prompt, 0, table)], block, runner.device)
        with torch.inference_mode(), forward_context(runner.backend, batch.metadata):
            runner.model(batch.input_ids, batch.positions)
    return prompts, tables


def _decode_batch(llm: LLM, prompts, tables, chain: int = 0):
    """A step of decode rows: each prompt's last token, the first prompt followed by a chain of `chain` drafts."""
    segments = []
    for i, (prompt, table) in enumerate(zip(prompts, tables)):
        draft = DraftTree.chain(prompt[:chain]) if i == 0 and chain else DraftTree()
        segments.append(Segment(prompt[-1:], len(prompt) - 1, table, draft))
    return prepare_batch(segments, llm.engine.runner.block_size, llm.engine.runner.device)


def _compare(llm: LLM, batch, capture=(1,)) -> None:
    runner = llm.engine.runner
    fused = runner.fused_decoder
    assert fused is not None and fused.supports(batch.metadata, len(batch.input_ids))
    runner.capture_layers = capture
    try:
        with torch.inference_mode(), forward_context(runner.backend, batch.metadata):
            expected = runner.model(batch.input_ids, batch.positions)
        hooked = {layer: runner._captured[layer].clone() for layer in capture}
        with torch.inference_mode():
            hidden, captured = fused(batch.input_ids, batch.positions, batch.metadata, runner.capture_layers)
    finally:
        runner.capture_layers = ()
    assert torch.equal(hidden, expected)
    assert captured.keys() == hooked.keys()
    for layer in capture:
        assert torch.equal(captured[layer], hooked[layer])


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_qwen2", "tiny_llama3_rope"])
def test_fused_decode_equals_the_modules_on_tiny_models(model_fixture, request):
    llm = LLM(request.getfixturevalue(model_fixture), kv_cache_gib=0.01)
    prompts, tables = _filled(llm, [1, 5, 17, 300, 40])
    _compare(llm, _decode_batch(llm, prompts, tables), capture=(1, 2))
    _compare(llm, _decode_batch(llm, prompts[3:4], tables[3:4], chain=4), capture=(2,))


@pytest.mark.slow
def test_fused_decode_equals_the_modules_on_the_real_model(real_llm):
    """Contexts of several split-KV chunks, GQA with 3 query heads per KV head, Q4_1 and Q8_0 weights."""
    prompts, tables = _filled(real_llm, [3, 700, 1300, 64], seed=1)
    _compare(real_llm, _decode_batch(real_llm, prompts, tables), capture=(24,))
    _compare(real_llm, _decode_batch(real_llm, prompts[1:2], tables[1:2], chain=5), capture=())


def test_engine_decodes_through_the_fused_step(tiny_llama):
    """Greedy generation with the fused step equals generation with the modules alone, and uses the fused step."""
    llm = LLM(tiny_llama, kv_cache_gib=0.01)
    runner = llm.engine.runner
    calls = []
    fused = runner.fused_decoder

    def counting(*args, **kwargs):
        calls.append(len(args[0]))
        return fused(*args, **kwargs)

    prompts = random_prompts(llm.engine.model_config.vocab_size, [3, 9, 30, 2], seed=3)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    runner.fused_decoder = counting
    counting.supports = fused.supports
    with_fused = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    runner.fused_decoder = None
    modules_only = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert with_fused == modules_only
    assert calls and max(calls) == len(prompts)


def test_fused_decode_refuses_bad_rows(tiny_llama):
    llm = LLM(tiny_llama, kv_cache_gib=0.01)
    prompts, tables = _filled(llm, [4])
    batch = _decode_batch(llm, prompts, tables)
    fused = llm.engine.runner.fused_decoder
    with pytest.raises(RuntimeError, match="token id"):
        fused(torch.tensor([10**6]), batch.positions, batch.metadata)
    with pytest.raises(RuntimeError, match="position"):
        fused(batch.input_ids, torch.tensor([10**6]), batch.metadata)
    with pytest.raises(RuntimeError, match="no layer"):
        fused(batch.input_ids, batch.positions, batch.metadata, (99,))


def test_steps_with_prefills_or_adapters_run_the_modules(tiny_llama):
    llm = LLM(tiny_llama, kv_cache_gib=0.01)
    fused = llm.engine.runner.fused_decoder
    prompts, tables = _filled(llm, [4, 6])
    decode = _decode_batch(llm, prompts, tables)
    assert fused.supports(decode.metadata, len(decode.input_ids))
    mixed = prepare_batch([Segment(prompts[0][-1:], 3, tables[0]), Segment(prompts[1], 0, tables[1])],
                          llm.engine.runner.block_size, llm.engine.runner.device)
    assert not fused.supports(mixed.metadata, len(mixed.input_ids))
    assert LLM(tiny_llama, kv_cache_gib=0.01, weight_format="float32").engine.runner.fused_decoder is None
