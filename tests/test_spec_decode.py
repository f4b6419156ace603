"""Speculative decoding: proposers, verification, the cost model, and exactness inside continuous batching."""

import pytest
import torch

from foreseer import LLM, SamplingParams
from foreseer.config import SpeculativeConfig
from foreseer.core.draft_tree import DraftTree
from foreseer.spec.cost_model import StepCostModel, choose_draft_nodes
from foreseer.spec.draft_model import OwnKV
from foreseer.spec.medusa import MedusaConfig, MedusaHeads
from foreseer.spec.ngram import NgramProposer
from foreseer.spec.proposer import DraftProposer
from foreseer.worker.rejection import verify_greedy, verify_sampling

NGRAM = {"method": "ngram", "num_speculative_tokens": 4}
# Step time flat up to 8 tokens, then proportional to them: memory-bound small batches, compute-bound large ones.
SMALL_BATCHES_CHEAP = StepCostModel([1, 8, 1024], [0.04, 0.04, 0.04 * 1024 / 8])


def _lookup(tokens, max_length, min_n=1, max_n=3, width=1):
    config = SpeculativeConfig("ngram", prompt_lookup_min=min_n, prompt_lookup_max=max_n, tree_width=width)
    return NgramProposer(config).lookup(tokens, max_length)


def test_ngram_takes_the_longest_suffix_match_and_its_latest_occurrence():
    assert _lookup([1, 2, 3, 9, 1, 2, 3, 8, 5, 2, 3], 2) == [[8, 5]]  # "2 3" last seen before "8 5"
    assert _lookup([7, 1, 2, 3, 4, 6, 2, 3, 5, 1, 2, 3], 3) == [[4, 6, 2]]  # "1 2 3" beats the later "2 3"
    assert _lookup([1, 2, 3, 4], 3) == []  # no earlier occurrence
    assert _lookup([9, 5, 6, 7, 5, 6, 7], 7) == [[5, 6, 7, 5, 6, 7, 5]]  # a repeating text goes on repeating
    assert _lookup([1, 2, 1, 2], 3, min_n=3) == []


def test_ngram_tree_holds_different_continuations():
    tokens = [1, 2, 3, 9, 1, 2, 3, 8, 5, 2, 3]
    assert _lookup(tokens, 2, width=3) == [[8, 5], [9, 1]]  # "2 3" twice, then "3" adds nothing new
    tree = DraftTree.merge([[9, 1], [9, 4], [8]])
    assert (tree.token_ids, tree.parents) == ([9, 1, 4, 8], [-1, 0, 0, -1])


def test_draft_tree_mask_depths_and_subtrees():
    tree = DraftTree([4, 5, 6, 7], [-1, 0, -1, 2])  # 4 -> 5 and 6 -> 7
    assert tree.depths() == [1, 2, 1, 2] and not tree.is_chain
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 1, 0], [1, 0, 0, 1, 1]])
    assert torch.equal(tree.attention_mask(), expected.bool())
    sub = tree.subtree([2, 3])
    assert (sub.token_ids, sub.parents) == ([6, 7], [-1, 0])
    assert DraftTree.chain([3, 4]).is_chain
    with pytest.raises(ValueError):
        DraftTree([1, 2], [-1, 1])
    # Sampled drafts carry their distributions through every cut.
    probs = torch.arange(4.0)[:, None].expand(4, 3)
    sampled = DraftTree([4, 5, 6, 7], [-1, 0, -1, 2], probs)
    assert sampled.subtree([2, 3]).probs[:, 0].tolist() == [2.0, 3.0]
    assert sampled.prefix(2).probs[:, 0].tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="distribution"):
        DraftTree([1], [-1], probs)


def test_greedy_verification_follows_the_matching_branch():
    chain = DraftTree.chain([4, 5, 6])
    assert verify_greedy(chain, [4, 5, 6, 7]) == ([4, 5, 6, 7], [0, 1, 2])
    assert verify_greedy(chain, [4, 9, 6, 7]) == ([4, 9], [0])
    assert verify_greedy(DraftTree.chain([4]), [3, 1]) == ([3], [])
    assert verify_greedy(DraftTree(), [2]) == ([2], [])
    tree = DraftTree([4, 5, 6, 7], [-1, 0, -1, 2])
    # Target argmax at the root, then at each node in node order.
    assert verify_greedy(tree, [6, 0, 0, 7, 3]) == ([6, 7, 3], [2, 3])


def _total_variation(samples: list[int], probs: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(samples), minlength=len(probs)).double()
    return 0.5 * float((counts / counts.sum() - probs.double()).abs().sum())


@pytest.mark.parametrize("draft_kind", ["deterministic chain", "chain sampled from q", "deterministic tree"])
def test_speculative_sampling_reproduces_the_target_distribution(draft_kind):
    """Over a 6-token vocabulary: the first emitted token follows p0 (the target at the root), and the second,
    where the first was the draft's node 0, follows that node's target distribution; the distance shrinks
    with samples."""
    gen = torch.Generator().manual_seed(0)
    target = torch.softmax(torch.randn(4, 6, generator=gen) * 1.5, dim=-1)
    draft_probs = torch.softmax(torch.randn(2, 6, generator=gen) * 1.5, dim=-1)
    firsts, seconds = [], []
    distances = {}
    for trial in range(1, 40001):
        q = None
        if draft_kind == "deterministic chain":
            tree = DraftTree.chain([2, 4])
        elif draft_kind == "deterministic tree":
            tree = DraftTree([2, 4, 5], [-1, 0, -1])  # 2 -> 4, or 5: siblings 2 and 5 are tried in turn
        else:
            tree, q = DraftTree.chain([int(torch.multinomial(p, 1, generator=gen)) for p in draft_probs]), draft_probs
        emitted, path = verify_sampling(tree, target[:len(tree) + 1], q, gen)
        assert len(emitted) == len(path) + 1 and [tree.token_ids[n] for n in path] == emitted[:len(path)]
        firsts.append(emitted[0])
        if path and path[0] == 0:
            seconds.append(emitted[1])
        if trial in (1000, 40000):
            distances[trial] = _total_variation(firsts, target[0])
    assert distances[40000] < 0.015
    assert distances[40000] < distances[1000]
    assert _total_variation(seconds, target[1]) < 0.03
    if draft_kind != "chain sampled from q":  # a one-hot draft is accepted with the target's probability of it
        assert abs(len(seconds) / len(firsts) - float(target[0, 2])) < 0.01


def _chains(*lengths):
    return [DraftTree.chain(list(range(10, 10 + n))) for n in lengths]


def test_cost_model_drafts_at_small_batches_and_stops_at_large_ones():
    assert [len(t) for t in choose_draft_nodes([0.9], _chains(5), 1, SMALL_BATCHES_CHEAP)] == [5]
    # Poor acceptance earns fewer draft tokens than good acceptance in the same step.
    short, long = choose_draft_nodes([0.2, 0.95], _chains(5, 5), 2, SMALL_BATCHES_CHEAP)
    assert len(short) < len(long) and long.is_chain
    assert [len(t) for t in choose_draft_nodes([0.9] * 64, _chains(*[5] * 64), 64, SMALL_BATCHES_CHEAP)] == [0] * 64
    assert [len(t) for t in choose_draft_nodes([0.9], _chains(0), 1, SMALL_BATCHES_CHEAP)] == [0]
    # In a tree the first alternatives are worth more than deep nodes behind a second sibling.
    tree = DraftTree([1, 2, 3, 4, 5], [-1, 0, 1, -1, 3])
    (chosen,) = choose_draft_nodes([0.7], [tree], 5, SMALL_BATCHES_CHEAP)  # room for 3 nearly free tokens
    assert (chosen.token_ids, chosen.parents) == ([1, 2, 3], [-1, 0, 1])


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
    with pytest.raises(ValueError, match="adaptive"):
        SpeculativeConfig("ngram", adaptive="no")


def test_drafting_every_step_when_not_adaptive(tiny_llama):
    """adaptive=False drafts wherever the proposer finds a draft, even where the cost model says it never pays;
    adaptive=True then drafts nothing. Both stay exact."""
    prompt = list(range(5, 20)) * 3
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    plain = LLM(tiny_llama, kv_cache_gib=0.01).generate([prompt], params, use_tqdm=False)[0]
    for adaptive in (True, False):
        llm = LLM(tiny_llama, kv_cache_gib=0.01, speculative_config={**NGRAM, "adaptive": adaptive})
        llm.engine.speculator.cost = StepCostModel([1, 2], [1.0, 100.0])  # a second row costs 99 steps
        llm.engine.speculator.config.calibrate = False
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == plain.outputs[0].token_ids
        assert (llm.engine.spec_stats.num_verifications > 0) == (not adaptive)


def _speculating_llm(model: str, **kwargs) -> LLM:
    # Drafting at every step: the measured cost model of a tiny model on a busy machine is noise.
    return LLM(model, speculative_config={**NGRAM, "adaptive": False}, **kwargs)


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


class _KnownAnswerTrees(DraftProposer):
    """Drafts trees whose first branch is wrong and whose second is the known greedy continuation, so that
    every accepted path runs through later nodes and its KV must be moved into place."""

    name = "known-answer-trees"

    def __init__(self, answers: dict[tuple[int, ...], list[int]], vocab_size: int) -> None:
        self.answers, self.vocab_size = answers, vocab_size

    def propose(self, requests, max_lengths, hidden_states):
        trees = []
        for request, depth in zip(requests, max_lengths):
            upcoming = self.answers[tuple(request.prompt_token_ids)][request.num_output_tokens:][:depth]
            wrong = [(upcoming[0] + 1) % self.vocab_size] + upcoming[:-1] if upcoming else []
            trees.append(DraftTree.merge([wrong, upcoming]))
        return trees


def test_tree_verification_packs_the_accepted_branch_and_stays_exact(tiny_llama):
    plain = LLM(tiny_llama, kv_cache_gib=0.01, block_size=4)
    prompts = [list(range(5 + i, 20 + 3 * i)) for i in range(5)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    spec = _speculating_llm(tiny_llama, kv_cache_gib=0.01, block_size=4)
    answers = {tuple(p): e for p, e in zip(prompts, expected)}
    spec.engine.speculator.proposer = _KnownAnswerTrees(answers, spec.engine.model_config.vocab_size)
    outputs = spec.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    stats = spec.engine.spec_stats
    assert stats.num_accepted_tokens >= 0.8 * sum(len(e) for e in expected) - stats.num_verifications
    assert stats.num_draft_tokens > 1.5 * stats.num_accepted_tokens  # the wrong branches were verified too
    assert spec.engine.block_manager.num_free_blocks == spec.engine.block_manager.num_blocks


def test_medusa_trees_from_heads_stay_exact(tiny_llama, tmp_path):
    heads = MedusaHeads(MedusaConfig(num_heads=3, hidden_size=64))
    torch.manual_seed(0)
    with torch.no_grad():  # random heads: they guess badly, and every guess must be verified away exactly
        heads.weight.normal_(0, 0.2)
    heads.save(str(tmp_path))
    plain = LLM(tiny_llama, kv_cache_gib=0.01, block_size=4)
    prompts, params = _mixed_workload(plain)
    expected = plain.generate(prompts, params, use_tqdm=False)
    spec = LLM(tiny_llama, kv_cache_gib=0.01, block_size=4, speculative_config={
        "method": "medusa", "medusa_heads": str(tmp_path), "num_speculative_tokens": 3, "tree_width": 3,
        "calibrate": False})
    spec.engine.speculator.cost = StepCostModel([1, 1024], [1.0, 1.0])
    outputs = spec.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    stats = spec.engine.spec_stats
    assert stats.num_verifications > 100 and stats.num_draft_tokens > 3 * stats.num_verifications
    assert spec.engine.block_manager.num_free_blocks == spec.engine.block_manager.num_blocks


def test_medusa_needs_heads(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="no Medusa heads"):
        LLM(tiny_llama, kv_cache_gib=0.01, speculative_config={"method": "medusa"})
    MedusaHeads(MedusaConfig(num_heads=2, hidden_size=32)).save(str(tmp_path))
    with pytest.raises(ValueError, match="hidden size"):
        LLM(tiny_llama, kv_cache_gib=0.01, speculative_config={"method": "medusa", "medusa_heads": str(tmp_path)})


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
    # Two engines in the same state: what a seeded request draws depends on which drafts it verifies, and an
    # engine drafts by the acceptance it has measured so far.
    params = SamplingParams(temperature=0.8, top_k=20, max_tokens=40, ignore_eos=True, seed=5)
    first, second = (_speculating_llm(tiny_llama, kv_cache_gib=0.01, block_size=4).generate(
        [list(range(5, 20)) * 3], params, use_tqdm=False)[0] for _ in range(2))
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
    # Drafting at every step (not adaptive): what is drafted then does not depend on this machine's step timings.
    spec = LLM("smollm2-135m-instruct", kv_cache_gib=0.25, speculative_config={**NGRAM, "adaptive": False})
    expected = real_llm.chat(conversations, params, use_tqdm=False)
    outputs = spec.chat(conversations, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    # This small model paraphrases more than it copies: it accepts about 0.3 to 0.5 of the drafted tokens.
    stats = spec.engine.spec_stats
    assert stats.num_verifications > 20 and stats.acceptance_rate > 0.2
    assert stats.mean_accepted_length > 1.3


NETWORK_TEXT = (
    "To set up a small home network, start with the modem your internet provider gives you and connect a router to "
    "it with an Ethernet cable. Place the router in a central spot, away from thick walls and metal objects, so "
    "that its wireless signal reaches every room. Log in to the router's administration page from a browser, "
    "change the default password, and choose a strong passphrase for the wireless network using WPA3 or at least "
    "WPA2 encryption. Update the router's firmware, because manufacturers fix security holes regularly. If some "
    "rooms still have a weak signal, add a mesh node or a wired access point rather than a cheap repeater. "
    "Finally, give fixed addresses to devices such as printers and network storage, and turn off features you do "
    "not use, such as remote administration and WPS.")


@pytest.mark.slow
def test_real_model_int8_self_draft_agrees_after_a_long_prompt(real_llm):
    """The int8 self-draft reads the target's KV cache, so a long prompt's KV is the float model's: an int8 prefill
    of its own once spoiled it (the CPU's int8 GEMM takes one activation scale per call, and a prompt's first
    tokens' huge activations left no draft accepted on prompts like these)."""
    spec = _pin_costs(LLM("smollm2-135m-instruct", kv_cache_gib=0.25, speculative_config={"method": "draft"}))
    params = SamplingParams(temperature=0, max_tokens=32)
    prompts = [real_llm.apply_chat_template([{"role": "user", "content": f"{task} the following text:\n\n"
                                                                         f"{NETWORK_TEXT}"}])
               for task in ("Rewrite", "Summarize")]
    expected = real_llm.generate(prompts, params, use_tqdm=False)
    for prompt, reference in zip(prompts, expected):
        (out,) = spec.generate([prompt], params, use_tqdm=False)
        assert out.outputs[0].token_ids == reference.outputs[0].token_ids
        m = out.metrics
        assert m.num_draft_tokens >= 10
        assert m.num_accepted_tokens / (m.num_accepted_tokens + m.num_rejections) > 0.7  # per-token agreement
    assert spec.engine.block_manager.num_free_blocks == spec.engine.block_manager.num_blocks


@pytest.fixture(scope="module")
def tiny_llama_sibling(tmp_path_factory) -> str:
    """Another random Llama with the same tokenizer (as a smaller draft model would have), one layer."""
    from conftest import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_sibling")), seed=7, num_hidden_layers=1,
                           tie_word_embeddings=True)


def _pin_costs(llm: LLM, draft_seconds: float = 0.01) -> LLM:
    """Cost models under which drafting always pays (measured ones on a tiny model on a busy machine are noise)."""
    llm.engine.speculator.config.calibrate = False  # pinned: not corrected by measured step times
    llm.engine.speculator.cost = StepCostModel([1, 1024], [1.0, 1.0])
    llm.engine.speculator.proposer.draft_step_cost = StepCostModel([1, 1024], [draft_seconds, draft_seconds])
    return llm


@pytest.mark.parametrize("spec", [
    {"method": "draft", "draft_quantization": "none"},
    {"method": "draft"},
    {"method": "draft", "draft_model": "SIBLING", "draft_quantization": "none"},
    {"method": "layer_skip", "skip_layers": [1]},
], ids=["self", "self-int8", "sibling", "layer-skip"])
def test_draft_model_speculation_equals_plain_decoding(tiny_llama, tiny_llama_sibling, spec):
    spec = {**spec, "draft_model": tiny_llama_sibling} if spec.get("draft_model") == "SIBLING" else spec
    plain = LLM(tiny_llama, kv_cache_gib=0.01, block_size=4, max_num_batched_tokens=64)
    prompts, params = _mixed_workload(plain)
    expected, _ = _run_staggered(plain, prompts, params)
    llm = _pin_costs(LLM(tiny_llama, kv_cache_gib=0.01, block_size=4, max_num_batched_tokens=64,
                         speculative_config={**spec, "num_speculative_tokens": 4}))
    outputs, _ = _run_staggered(llm, prompts, params)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    stats = llm.engine.spec_stats
    # Even the random sibling (no draft accepted) is verified a few dozen times before its acceptance, measured
    # against the cost model's 5% margin, turns drafting off.
    assert stats.num_verifications > 30
    if spec.get("draft_quantization") == "none" and "draft_model" not in spec:
        # The target drafting for itself: every draft is accepted, and the confidence bar only ever falls.
        assert stats.acceptance_rate > 0.95 and stats.mean_accepted_length > 3
        assert llm.engine.speculator.proposer.threshold == 0.0
    if spec == {"method": "draft"}:
        assert stats.acceptance_rate > 0.5  # int8 weights change a few argmaxes, not most
    # Drafts written into the target's cache leave no block behind.
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
    kv = llm.engine.speculator.proposer.kv
    assert isinstance(kv, OwnKV) == ("draft_model" in spec)  # the target drafting for itself needs no cache
    if isinstance(kv, OwnKV):
        # The draft cache lets go of finished requests when it next drafts: only the last one is left.
        llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
        (request, seq), = kv.sequences.values()
        assert request.prompt_token_ids == prompts[0] and request.num_output_tokens == 4
        assert kv.block_manager.num_free_blocks == kv.block_manager.num_blocks - len(seq.block_table)


def test_draft_model_under_preemption_and_sampling(tiny_llama):
    prompts = [list(range(5 + i, 45 + i)) for i in range(10)]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    roomy = LLM(tiny_llama, kv_cache_gib=0.01, block_size=4)
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    block_gib = roomy.engine.runner.kv_bytes_per_block() / 2**30
    tight = _pin_costs(LLM(tiny_llama, kv_cache_gib=40 * block_gib, block_size=4,
                           speculative_config={"method": "draft", "num_speculative_tokens": 4}))
    outputs, _ = _run_staggered(tight, prompts, [params] * len(prompts))
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert sum(o.metrics.num_preemptions for o in outputs) > 0
    assert tight.engine.spec_stats.num_accepted_tokens > 0
    # Seeded sampling repeats on engines in the same state (the confidence threshold adapts as they run).
    sampled = SamplingParams(temperature=0.8, max_tokens=30, ignore_eos=True, seed=3)
    first, second = (_pin_costs(LLM(tiny_llama, kv_cache_gib=40 * block_gib, block_size=4, speculative_config={
        "method": "draft", "num_speculative_tokens": 4})).generate(prompts[:2], sampled, use_tqdm=False)
        for _ in range(2))
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in second]


def test_draft_model_errors(tiny_llama, tmp_path):
    from conftest import make_tiny_model

    other_vocab = make_tiny_model(str(tmp_path / "other"), vocab_size=512)
    with pytest.raises(ValueError, match="share a tokenizer"):
        LLM(tiny_llama, kv_cache_gib=0.01, speculative_config={"method": "draft", "draft_model": other_vocab})
    with pytest.raises(ValueError, match="no layer-skip set"):
        LLM(tiny_llama, kv_cache_gib=0.01, speculative_config={"method": "layer_skip"})
    with pytest.raises(ValueError, match="some, not all"):
        LLM(tiny_llama, kv_cache_gib=0.01, speculative_config={"method": "layer_skip", "skip_layers": [0, 1]})
    with pytest.raises(ValueError, match="draft_quantization"):
        SpeculativeConfig("draft", draft_quantization="int4")


def test_draft_depth_weighs_the_draft_models_own_steps():
    from foreseer.spec.cost_model import choose_draft_depth

    flat = StepCostModel([1, 1024], [0.04, 0.04])
    assert choose_draft_depth([0.9], [5], 1, flat) == 5  # free drafts: as deep as allowed
    cheap, dear = StepCostModel([1, 64], [0.004, 0.004]), StepCostModel([1, 64], [0.05, 0.05])
    assert choose_draft_depth([0.9], [5], 1, flat, cheap) >= 3
    assert choose_draft_depth([0.9], [5], 1, flat, dear) == 0  # a draft step dearer than a target step
    assert choose_draft_depth([0.2], [5], 1, flat, cheap) <= 1  # rarely accepted: shallow or none
    assert choose_draft_depth([0.9] * 64, [5] * 64, 64, SMALL_BATCHES_CHEAP, cheap) == 0  # compute-bound batch
    # A draft model's catch-up (a prefill) counts too, as does attention over long contexts.
    assert choose_draft_depth([0.9], [5], 1, flat, cheap, setup_seconds=0.2) == 0
    reads = StepCostModel([1, 1024], [0.04, 0.04], seconds_per_context_token=1e-5)
    assert choose_draft_depth([0.6] * 8, [5] * 8, 8, reads, contexts=[100] * 8, base_context=800) >= 2
    assert choose_draft_depth([0.6] * 8, [5] * 8, 8, reads, contexts=[4000] * 8, base_context=32000) == 0


def test_drafting_needs_a_predicted_gain_beyond_the_cost_models_error():
    from foreseer.spec.cost_model import MIN_PREDICTED_GAIN, choose_draft_depth

    # One draft token per step at acceptance a, verification free, a draft step costing c of a target step:
    # predicted rate (1 + a) / (1 + c) against 1 without drafting.
    flat = StepCostModel([1, 1024], [0.04, 0.04])
    draft_step = StepCostModel([1, 64], [0.04 * 0.2, 0.04 * 0.2])
    below, above = (1 + MIN_PREDICTED_GAIN) * 1.2 - 1 - 0.01, (1 + MIN_PREDICTED_GAIN) * 1.2 - 1 + 0.01
    assert choose_draft_depth([below], [1], 1, flat, draft_step) == 0  # a gain of under 5%: not worth the risk
    assert choose_draft_depth([above], [1], 1, flat, draft_step) == 1


def test_measured_step_times_correct_the_price_of_drafting():
    from foreseer.spec.cost_model import Calibration, StepScales, choose_draft_depth

    calibration = Calibration()
    assert calibration.ratio == 1.0  # nothing measured: the start-up timings stand
    for _ in range(50):
        calibration.add(0.03, 0.02)
    assert calibration.ratio == pytest.approx(1.5)
    flat, draft = StepCostModel([1, 64], [0.03, 0.03]), StepCostModel([1, 64], [0.005, 0.005])
    assert choose_draft_depth([0.9], [5], 1, flat, draft) == 5
    # Draft steps measured at 6x their start-up price cost as much as a target step: no longer worth it.
    assert choose_draft_depth([0.9], [5], 1, flat, draft, scales=StepScales(draft=6.0)) == 0
    # Free drafts (prompt lookup) at acceptance 0.5, unless drafting itself was measured to take a step's time.
    assert choose_draft_depth([0.5], [5], 1, flat) > 0
    assert choose_draft_depth([0.5], [5], 1, flat, scales=StepScales(draft_overhead=0.03)) == 0
    # Overhead priced per draft level: at 0.9 acceptance a cheap level pays, and fewer levels pay as it grows.
    cheap = choose_draft_depth([0.9], [5], 1, flat, scales=StepScales(draft_overhead=0.002))
    dear = choose_draft_depth([0.9], [5], 1, flat, scales=StepScales(draft_overhead=0.015))
    assert cheap == 5 and 0 < dear < cheap
    # The target's steps measured 3x slower than at start-up: a draft model's steps, measured as they were, are
    # cheap beside them now.
    assert choose_draft_depth([0.9], [5], 1, flat, draft, scales=StepScales(target=3.0, draft=6.0)) == 5


def test_acceptance_estimate_keeps_exploring_after_an_early_rejection():
    """Only drafting gives evidence of acceptance: one rejected first draft must not turn drafting off for good."""
    from foreseer.core.request import Request
    from foreseer.spec.speculator import PRIOR_WEIGHT, Speculator

    config = SpeculativeConfig("ngram")
    speculator = Speculator(config, NgramProposer(config), SMALL_BATCHES_CHEAP)
    request = Request("r", [1, 2, 3], SamplingParams(temperature=0), 16, set(), arrival_time=0.0)
    prior = NgramProposer.prior_acceptance
    assert speculator.engine_acceptance() > prior  # optimistic while nothing is known
    speculator.record(request, 3, 3, 0)  # the first draft, rejected at once
    plain_mean = PRIOR_WEIGHT * prior / (1 + PRIOR_WEIGHT)
    assert speculator.engine_acceptance() > prior > plain_mean
    assert speculator.acceptance(request) < speculator.engine_acceptance()
    # The request's own evidence fades with each step, so its estimate returns to the engine's.
    for _ in range(40):
        speculator.propose([request], 0)  # nothing to look up in [1, 2, 3]: no draft, no new evidence
    assert speculator.acceptance(request) == pytest.approx(speculator.engine_acceptance(), abs=0.01)
    # Much evidence makes the estimate plain: a proposer that is always wrong stops looking promising.
    other = Request("o", [1, 2, 3], SamplingParams(temperature=0), 16, set(), arrival_time=0.0)
    for _ in range(200):
        speculator.record(other, 3, 3, 0)
    assert speculator.engine_acceptance() < 0.05


def test_self_draft_writes_only_the_requests_uncomputed_slots(tiny_llama):
    """The target drafting for itself writes its draft tokens' KV into the target's cache: only into slots after
    the request's computed tokens, which verification overwrites."""
    llm = _pin_costs(LLM(tiny_llama, kv_cache_gib=0.01, block_size=4,
                         speculative_config={"method": "draft", "num_speculative_tokens": 4}))
    engine = llm.engine
    proposer = engine.speculator.proposer
    proposer.threshold = 0.0  # draft the full depth, whatever the confidence
    engine.add_request("a", list(range(5, 30)), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    engine.add_request("b", list(range(40, 51)), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    for _ in range(3):
        engine.step()
    request = engine.scheduler.running[0]
    assert request.num_computed_tokens == request.num_tokens - 1  # decoding
    values = [layer.kv_cache[1].clone() for layer in engine.runner.model.attention_layers()]
    (draft,) = proposer.propose([request], [4])
    assert len(draft) == 4
    # Positions num_computed .. num_computed + 3: the last token and the first three drafts.
    allowed = {request.block_table[p // 4] * 4 + p % 4
               for p in range(request.num_computed_tokens, request.num_computed_tokens + 4)}
    for before, layer in zip(values, engine.runner.model.attention_layers()):
        after = layer.kv_cache[1]  # unused pages are uninitialized memory: a NaN there is no change
        differs = (before != after) & ~(before.isnan() & after.isnan())
        changed = differs.flatten(2).any(-1).flatten().nonzero().flatten().tolist()
        assert changed and set(changed) <= allowed


def test_context_reads_are_priced_per_draft_node():
    reads = StepCostModel([1, 1024], [0.04, 0.04], seconds_per_context_token=1e-5)
    assert reads.cost(4, 1000) == pytest.approx(0.05)
    trees = _chains(4, 4)
    short = choose_draft_nodes([0.7, 0.7], trees, 2, reads, contexts=[50, 50], base_context=100)
    long = choose_draft_nodes([0.7, 0.7], trees, 2, reads, contexts=[50, 3000], base_context=3050)
    assert [len(t) for t in short] == [4, 4]
    assert len(long[0]) == 4 and len(long[1]) < 4  # the long request's drafts cost more to verify


def test_measured_cost_model_prices_context(tmp_path):
    from conftest import make_tiny_model

    # Four layers of four KV heads: reading the long context then costs about a step's time, far above the noise
    # of best-of-5 timings (with tiny_llama it was a third of a millisecond, and a slow round could hide it).
    model = make_tiny_model(str(tmp_path), num_hidden_layers=4, num_key_value_heads=4)
    llm = LLM(model, kv_cache_gib=0.01, speculative_config=NGRAM)
    assert llm.engine.speculator.cost.seconds_per_context_token > 0


def test_int8_linears_stay_close_to_float():
    from torch import nn

    from foreseer.layers.quantization import Int8WeightOnlyLinear, quantize_linears_int8

    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    x = torch.randn(5, 64)
    reference = linear(x)
    with torch.no_grad():
        weight_only = Int8WeightOnlyLinear(linear)(x)  # the GPU path, which runs on a CPU too
        model = nn.Sequential(linear)
        quantized = quantize_linears_int8(model)(x)  # the CPU path
    scale = reference.abs().max()
    assert (weight_only - reference).abs().max() < 0.02 * scale
    assert (quantized - reference).abs().max() < 0.03 * scale
    assert not isinstance(model[0], nn.Linear)  # replaced in place


def test_sampled_requests_draft_from_distributions_that_reach_verification(tiny_llama):
    """Sampled requests draw their drafts from the draft's distribution q and speculative sampling accepts a
    token with min(1, p / q). Drafting with the target itself makes q equal p: every draft is accepted, where a
    deterministic draft would be accepted only with probability p(token). (That speculative sampling keeps the
    target distribution is tested statistically above.)"""
    llm = _pin_costs(LLM(tiny_llama, kv_cache_gib=0.01, speculative_config={
        "method": "draft", "draft_quantization": "none", "num_speculative_tokens": 3, "draft_confidence": 0.0}))
    params = [SamplingParams(temperature=1.0, top_k=50, max_tokens=40, ignore_eos=True, seed=i) for i in range(6)]
    outputs = llm.generate([list(range(5 + i, 30)) for i in range(6)], params, use_tqdm=False)
    stats = llm.engine.spec_stats
    assert stats.num_verifications > 30 and stats.num_accepted_tokens > 0.97 * stats.num_draft_tokens
    again = LLM(tiny_llama, kv_cache_gib=0.01).generate([list(range(5, 30))], params[0], use_tqdm=False)[0]
    # Same seed: drafting consumed the request's generator, so the sample differs, but it is a sample of
    # the same distribution; the first token comes before any draft and is the same.
    assert outputs[0].outputs[0].token_ids[0] == again.outputs[0].token_ids[0]
