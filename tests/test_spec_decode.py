"""Speculative decoding: proposers, verification, the cost model, and exactness inside continuous batching."""

import pytest
import torch

from foreseer import LLM, SamplingParams
from foreseer.config import SpeculativeConfig
from foreseer.spec import NgramProposer
from foreseer.spec.cost_model import StepCostModel, choose_draft_lengths
from foreseer.spec.rejection import accept_greedy, rejection_sample

NGRAM = {"method": "ngram", "num_speculative_tokens": 4}
# Step time flat up to 8 tokens, then proportional to them: memory-bound small batches, compute-bound large ones.
SMALL_BATCHES_CHEAP = StepCostModel([1, 8, 1024], [0.04, 0.04, 0.04 * 1024 / 8])


def _lookup(tokens, max_length, min_n=1, max_n=3):
    config = SpeculativeConfig("ngram", prompt_lookup_min=min_n, prompt_lookup_max=max_n)
    return NgramProposer(config).lookup(tokens, max_length)


def test_ngram_takes_the_longest_suffix_match_and_its_first_occurrence():
    assert _lookup([1, 2, 3, 9, 1, 2, 3, 8, 5, 2, 3], 2) == [9, 1]  # "2 3" first seen before "9 1"
    assert _lookup([7, 1, 2, 3, 4, 6, 2, 3, 5, 1, 2, 3], 3) == [4, 6, 2]  # "1 2 3" beats the later "2 3"
    assert _lookup([1, 2, 3, 4], 3) == []  # no earlier occurrence
    assert _lookup([5, 6, 5, 6, 5, 6], 10) == [5, 6]  # the continuation ends where the text ends
    assert _lookup([1, 2, 1, 2], 3, min_n=3) == []


def test_greedy_acceptance_keeps_matching_drafts_then_the_targets_token():
    assert accept_greedy([4, 5, 6], [4, 5, 6, 7]) == [4, 5, 6, 7]
    assert accept_greedy([4, 5, 6], [4, 9, 6, 7]) == [4, 9]
    assert accept_greedy([4], [3, 1]) == [3]
    assert accept_greedy([], [2]) == [2]


def _total_variation(samples: list[int], probs: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(samples), minlength=len(probs)).double()
    return 0.5 * float((counts / counts.sum() - probs.double()).abs().sum())


@pytest.mark.parametrize("draft_kind", ["deterministic", "sampled from q"])
def test_rejection_sampling_reproduces_the_target_distribution(draft_kind):
    """Over a 6-token vocabulary, with drafts of 2: the first emitted token follows p0, and the second, where
    the first draft was accepted, follows p1 (the target at that position); the distance shrinks with samples."""
    gen = torch.Generator().manual_seed(0)
    target = torch.softmax(torch.randn(3, 6, generator=gen) * 1.5, dim=-1)
    draft_probs = torch.softmax(torch.randn(2, 6, generator=gen) * 1.5, dim=-1)
    firsts, seconds = [], []
    distances = {}
    for trial in range(1, 40001):
        if draft_kind == "deterministic":
            draft, q = [2, 4], None
        else:
            draft, q = [int(torch.multinomial(p, 1, generator=gen)) for p in draft_probs], draft_probs
        emitted = rejection_sample(target, draft, q, gen)
        assert 1 <= len(emitted) <= 3
        firsts.append(emitted[0])
        if len(emitted) > 1:
            seconds.append(emitted[1])
        if trial in (1000, 40000):
            distances[trial] = _total_variation(firsts, target[0])
    assert distances[40000] < 0.015
    assert distances[40000] < distances[1000]
    assert _total_variation(seconds, target[1]) < 0.03
    if draft_kind == "deterministic":  # a one-hot draft is accepted with the target's probability of it
        assert abs(len(seconds) / len(firsts) - float(target[0, 2])) < 0.01


def test_cost_model_drafts_at_small_batches_and_stops_at_large_ones():
    assert choose_draft_lengths([0.9], [5], 1, SMALL_BATCHES_CHEAP) == [5]
    # Poor acceptance earns fewer draft tokens than good acceptance in the same step.
    short, long = choose_draft_lengths([0.2, 0.95], [5, 5], 2, SMALL_BATCHES_CHEAP)
    assert short < long
    assert choose_draft_lengths([0.9] * 64, [5] * 64, 64, SMALL_BATCHES_CHEAP) == [0] * 64
    assert choose_draft_lengths([0.9], [0], 1, SMALL_BATCHES_CHEAP) == [0]


def test_cost_model_interpolates_and_extends_linearly():
    cost = StepCostModel([1, 8, 16], [1.0, 1.0, 2.0])
    assert cost.cost(4) == pytest.approx(1.0)
    assert cost.cost(12) == pytest.approx(1.5)
    assert cost.cost(32) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        StepCostModel([4], [1.0])


def test_speculative_config_is_validated():
    with pytest.raises(ValueError, match="method"):
        SpeculativeConfig("nope")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeConfig("ngram", num_speculative_tokens=0)
    with pytest.raises(ValueError, match="unknown keys"):
        SpeculativeConfig.parse({"method": "ngram", "tokens": 3})


def _speculating_llm(model: str, **kwargs) -> LLM:
    llm = LLM(model, speculative_config=NGRAM, **kwargs)
    # The measured cost model of a tiny model on a busy machine is noise; pin one that always drafts.
    llm.engine.speculator.cost = StepCostModel([1, 1024], [1.0, 1.0])
    return llm


def _run_staggered(llm: LLM, prompts, params_list) -> tuple[list, int]:
    """Requests arrive while others decode (mixed batches); checks after every step that no running request
    keeps blocks beyond its tokens (rejected drafts' slots are given back). Returns outputs and steps."""
    engine = llm.engine
    results = {}
    pending = list(enumerate(zip(prompts, params_list)))
    steps = 0
    while pending or engine.has_unfinished_requests():
        for i, (prompt, params) in pending[:3]:
            engine.add_request(str(i), prompt, params)
        pending = pending[3:]
        for output in engine.step():
            if output.finished:
                results[output.request_id] = output
        steps += 1
        for request in engine.scheduler.running:
            assert len(request.block_table) <= engine.block_manager.blocks_needed(request.num_tokens)
    return [results[str(i)] for i in range(len(prompts))], steps


def _mixed_workload(llm: LLM):
    repetitive = llm.tokenizer.encode("the quick brown fox jumps over the lazy dog. " * 4)
    prompts = [repetitive[: 20 + 7 * i] for i in range(6)] + [list(range(5 + i, 30 + 2 * i)) for i in range(6)]
    params = [SamplingParams(temperature=0, max_tokens=64, ignore_eos=True) for _ in prompts]
    params[3] = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True, use_speculation=False)
    params[4] = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True, logprobs=2)
    return prompts, params


def test_greedy_speculation_equals_plain_decoding_in_mixed_batches(tiny_llama):
    plain = LLM(tiny_llama, kv_cache_gib=0.01, block_size=4, max_num_batched_tokens=64)
    spec = _speculating_llm(tiny_llama, kv_cache_gib=0.01, block_size=4, max_num_batched_tokens=64)
    prompts, params = _mixed_workload(plain)
    expected, plain_steps = _run_staggered(plain, prompts, params)
    # A stop string in the middle of a later output: accepted drafts beyond it must be dropped.
    stop_text = expected[7].outputs[0].text[15:21]
    params[7] = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True, stop=[stop_text])
    expected[7] = plain.generate([prompts[7]], params[7], use_tqdm=False)[0]
    outputs, spec_steps = _run_staggered(spec, prompts, params)

    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    assert [o.outputs[0].text for o in outputs] == [o.outputs[0].text for o in expected]
    assert outputs[7].outputs[0].finish_reason == "stop"
    for got, want in zip(outputs[4].outputs[0].logprobs, expected[4].outputs[0].logprobs):
        assert got.keys() == want.keys()
        for token in got:
            assert got[token].logprob == pytest.approx(want[token].logprob, abs=1e-4)
    stats = spec.engine.spec_stats
    # A random tiny model repeats itself only now and then, but drafts of two and more do get accepted.
    assert stats.num_accepted_tokens > 10 and stats.accepted_per_position[1] > 0
    assert outputs[3].metrics.num_draft_tokens == 0  # opted out
    assert sum(o.metrics.num_accepted_tokens for o in outputs) == stats.num_accepted_tokens
    assert spec_steps < plain_steps
    assert spec.engine.block_manager.num_free_blocks == spec.engine.block_manager.num_blocks


def test_speculation_under_preemption_keeps_outputs_and_leaks_no_blocks(tiny_llama):
    prompts = [list(range(5 + i, 45 + i)) * 1 for i in range(10)]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    roomy = LLM(tiny_llama, kv_cache_gib=0.01, block_size=4)
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    block_gib = roomy.engine.runner.kv_bytes_per_block() / 2**30
    tight = _speculating_llm(tiny_llama, kv_cache_gib=40 * block_gib, block_size=4)
    outputs, _ = _run_staggered(tight, prompts, [params] * len(prompts))
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert sum(o.metrics.num_preemptions for o in outputs) > 0
    assert tight.engine.spec_stats.num_accepted_tokens > 0
    assert tight.engine.block_manager.num_free_blocks == tight.engine.block_manager.num_blocks


def test_sampled_requests_speculate_and_follow_their_seed(tiny_llama):
    spec = _speculating_llm(tiny_llama, kv_cache_gib=0.01, block_size=4)
    prompt = spec.tokenizer.encode("the quick brown fox jumps over the lazy dog. " * 3)
    params = SamplingParams(temperature=0.8, top_k=20, max_tokens=40, ignore_eos=True, seed=5)
    first, second = (spec.generate([prompt], params, use_tqdm=False)[0] for _ in range(2))
    assert first.outputs[0].token_ids == second.outputs[0].token_ids
    assert len(first.outputs[0].token_ids) == 40
    assert first.metrics.num_verifications > 0


@pytest.mark.slow
def test_real_model_prompt_lookup_is_exact_and_accepts_on_a_rewrite_task(real_llm):
    text = ("Paged attention stores the KV cache in fixed-size blocks, so memory is not wasted on padding and "
            "blocks can be shared between requests with the same prefix. Continuous batching adds new requests "
            "to the running batch at every iteration.")
    conversations = [[{"role": "user", "content": f"{task} the following text:\n\n{text}"}]
                     for task in ("Rewrite", "Repeat", "Summarize")]
    params = SamplingParams(temperature=0, max_tokens=64)
    spec = LLM("smollm2-135m-instruct", kv_cache_gib=0.25, speculative_config=NGRAM)
    cost = spec.engine.speculator.cost
    assert cost.cost(4) < 4 * cost.cost(1)  # a decode step is memory-bound: a few more tokens cost little
    expected = real_llm.chat(conversations, params, use_tqdm=False)
    outputs = spec.chat(conversations, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    assert spec.engine.spec_stats.acceptance_rate > 0.5
    assert spec.engine.spec_stats.mean_accepted_length > 2
