"""Sampling parameters: validation, seeds, top-k/top-p/min-p distributions, logprobs, stops, n."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from foreseer import LLM, SamplingParams
from foreseer.core.draft_tree import DraftTree
from foreseer.core.request import Request
from foreseer.worker.sampler import Sampler


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama, kv_cache_gib=0.01)


@pytest.mark.parametrize("kwargs, name", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"min_p": 2}, "min_p"), ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n"), ({"logprobs": -1}, "logprobs"), ({"seed": 1.5}, "seed"), ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"temperature": "hot"}, "temperature"),
    ({"temperature": float("inf")}, "temperature"), ({"temperature": float("nan")}, "temperature"),
])
def test_invalid_values_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{name} "):
        SamplingParams(**kwargs)


def _tokens(outputs):
    return [c.token_ids for o in outputs for c in o.outputs]


def test_seed_reproducible_whatever_the_batch(llm):
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=24, ignore_eos=True)
    alone = _tokens(llm.generate([[5, 6, 7]], params, use_tqdm=False))
    others = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)
    batched = llm.generate([[9, 9, 9, 9], [5, 6, 7], [11, 12]], [others, params, others], use_tqdm=False)
    assert _tokens(batched[1:2]) == alone
    different = SamplingParams(temperature=1.0, seed=4321, max_tokens=24, ignore_eos=True)
    assert _tokens(llm.generate([[5, 6, 7]], different, use_tqdm=False)) != alone


def test_top_k_one_is_greedy(llm):
    prompts = [[5, 6, 7], list(range(10, 40))]
    greedy = _tokens(llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                                  use_tqdm=False))
    top1 = _tokens(llm.generate(prompts, SamplingParams(temperature=0.8, top_k=1, max_tokens=16, ignore_eos=True),
                                use_tqdm=False))
    assert greedy == top1


def test_values_that_once_killed_the_engine_sample_as_they_mean(llm):
    """A temperature that float32 rounds to 0 is greedy (as below vLLM's 1e-5), and the engine goes on serving."""
    prompts = [[5, 6, 7], list(range(10, 40))]
    greedy = _tokens(llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                                  use_tqdm=False))
    for kwargs in ({"temperature": 1e-320}, {"temperature": 1e-6}, {"temperature": 0.7, "top_p": 1e-50},
                   {"temperature": 0.7, "top_k": 1, "top_p": 1e-50}):
        params = SamplingParams(max_tokens=16, ignore_eos=True, **kwargs)
        assert _tokens(llm.generate(prompts, params, use_tqdm=False)) == greedy, kwargs
    assert SamplingParams(top_k=2**64).top_k == 0 and not SamplingParams(temperature=1e-5).greedy


@pytest.mark.parametrize("kwargs, allowed", [
    ({"top_k": 2}, [0, 1]),
    ({"top_p": 0.7}, [0, 1]),  # 0.5 alone is short of 0.7; 0.5 + 0.3 covers it
    ({"min_p": 0.4}, [0, 1]),  # keeps probabilities >= 0.4 * 0.5
    ({"top_k": 3, "top_p": 0.99}, [0, 1, 2]),
    ({"top_p": 1e-50}, [0]),  # 0 in float32: the most likely token still stays
    ({"top_k": 2**64}, [0, 1, 2, 3]),  # beyond int64: keeps every token, as 0 does
    ({}, [0, 1, 2, 3]),
])
def test_sampling_distribution_matches_filtered_probabilities(kwargs, allowed):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(4000, 1)
    params = SamplingParams(temperature=1.0, **kwargs)
    requests = [Request(str(i), [1], params, 1, set()) for i in range(4000)]
    tokens, _, _ = Sampler(seed=0)(logits, requests, [DraftTree() for _ in requests])
    counts = torch.bincount(torch.tensor([t for (t,) in tokens]), minlength=4).float()
    expected = torch.zeros(4)
    expected[allowed] = probs[allowed] / probs[allowed].sum()
    assert set(torch.nonzero(counts).flatten().tolist()) == set(allowed)
    torch.testing.assert_close(counts / 4000, expected, atol=0.03, rtol=0)


def test_logprobs_match_reference_model(llm, tiny_llama):
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    prompt = [5, 6, 7, 8]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1:-1]
    reference = logits.log_softmax(-1)
    for pos, (token, top) in enumerate(zip(out.token_ids, out.logprobs)):
        assert top[token].rank == 1
        assert set(top) == set(reference[pos].topk(3).indices.tolist())
        for tid, lp in top.items():
            assert lp.logprob == pytest.approx(reference[pos, tid].item(), abs=1e-4)
    assert out.cumulative_logprob == pytest.approx(sum(top[t].logprob for t, top in zip(out.token_ids,
                                                                                         out.logprobs)), abs=1e-4)


def test_stop_strings_and_stop_tokens(llm):
    prompt = list(range(20, 40))
    base = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    text = base.text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=stop),
                       use_tqdm=False)[0].outputs[0]
    assert cut.text == text[:text.index(stop)]
    assert (cut.finish_reason, cut.stop_reason) == ("stop", stop)
    kept = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=stop,
                                                 include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == text[:text.index(stop) + len(stop)]

    stop_token = base.token_ids[5]
    first = base.token_ids.index(stop_token)
    by_token = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop_token]),
                            use_tqdm=False)[0].outputs[0]
    assert by_token.token_ids == base.token_ids[:first + 1]
    assert (by_token.finish_reason, by_token.stop_reason) == ("stop", stop_token)


def test_n_samples(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    out = llm.generate([[5, 6, 7]], params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert _tokens(llm.generate([[5, 6, 7]], params, use_tqdm=False)) == [c.token_ids for c in out.outputs]
    # Sample i of a request seeded s is the same as a single sample seeded s + i.
    single = SamplingParams(temperature=1.0, seed=8, max_tokens=12, ignore_eos=True)
    assert _tokens(llm.generate([[5, 6, 7]], single, use_tqdm=False))[0] == out.outputs[1].token_ids


@pytest.mark.slow
def test_eos_stops_unless_ignored(real_llm):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    stopped = real_llm.chat(question, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason is None and len(stopped.token_ids) < 40
    assert stopped.token_ids[-1] == real_llm.tokenizer.eos_token_id
    ignored = real_llm.chat(question, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0]
    assert ignored.finish_reason == "length" and len(ignored.token_ids) == 40
    assert ignored.token_ids[:len(stopped.token_ids)] == stopped.token_ids
