"""vLLM's logits-processing knobs (penalties, logit_bias, min_tokens, bad_words) against references written with
transformers' logits processors and plain torch, offline and through the server; vLLM's prompt dicts."""

from collections.abc import Callable

import httpx
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
)

import foreseer
from foreseer import LLM, SamplingParams
from tests.helpers import random_prompts, running_server

# A reference processor: (prompt, generated, logits [1, V]) -> logits.
Processor = Callable[[list[int], list[int], torch.Tensor], torch.Tensor]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama, kv_cache_gib=0.01)


@pytest.fixture(scope="module")
def hf_model(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)


@pytest.fixture(scope="module")
def prompts(llm):
    return random_prompts(len(llm.tokenizer), [12, 20])


def reference_greedy(model, prompt: list[int], max_new_tokens: int, processors: list[Processor],
                     eos_token_id: int | None = None) -> list[int]:
    """Greedy decoding with the whole context each step, the processors applied to the last logits in order."""
    generated: list[int] = []
    while len(generated) < max_new_tokens:
        with torch.no_grad():
            logits = model(torch.tensor([prompt + generated])).logits[:, -1].float()
        for processor in processors:
            logits = processor(prompt, generated, logits)
        generated.append(int(logits.argmax()))
        if generated[-1] == eos_token_id:
            break
    return generated


def logit_bias(bias: dict[int, float]) -> Processor:
    def apply(prompt, generated, logits):
        logits = logits.clone()
        for token, value in bias.items():
            logits[0, token] += value
        return logits
    return apply


def repetition_penalty(penalty: float) -> Processor:
    hf = RepetitionPenaltyLogitsProcessor(penalty)
    return lambda prompt, generated, logits: hf(torch.tensor([prompt + generated]), logits)


def presence_frequency(presence: float, frequency: float) -> Processor:
    """OpenAI's: each token's count in the generated tokens times frequency, and presence once if it occurs."""
    def apply(prompt, generated, logits):
        counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=logits.shape[-1]).float()
        return logits - frequency * counts - presence * (counts > 0)
    return apply


def min_tokens(count: int, eos_token_id: int) -> Processor:
    def apply(prompt, generated, logits):
        hf = MinNewTokensLengthLogitsProcessor(len(prompt), count, eos_token_id)
        return hf(torch.tensor([prompt + generated]), logits)
    return apply


def bad_words(tokenizer, words: list[str], eos_token_id: int) -> Processor:
    """vLLM's tokenization (each word, and with a leading space where that gives as many other tokens), matched
    against the generated tokens only."""
    ids = []
    for word in words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        ids += [plain] + ([spaced] if spaced[0] != plain[0] and len(spaced) == len(plain) else [])
    hf = NoBadWordsLogitsProcessor(ids, eos_token_id)
    return lambda prompt, generated, logits: hf(torch.tensor([generated], dtype=torch.long), logits)


MAX_TOKENS = 16


def knob_cases(llm, hf_model, prompt: list[int]) -> dict[str, tuple[dict, list[Processor], bool]]:
    """name -> (SamplingParams fields, reference processors, whether EOS ends the answer), each chosen to change
    the greedy answer to `prompt`."""
    eos = llm.tokenizer.eos_token_id
    plain = reference_greedy(hf_model, prompt, MAX_TOKENS, [])
    word = llm.tokenizer.decode(plain[4:6])
    return {
        "repetition_penalty": ({"repetition_penalty": 1.8}, [repetition_penalty(1.8)], False),
        "repetition_penalty_below_1": ({"repetition_penalty": 0.5}, [repetition_penalty(0.5)], False),
        "presence_frequency": ({"presence_penalty": 1.5, "frequency_penalty": 0.7},
                               [presence_frequency(1.5, 0.7)], False),
        "frequency_penalty_negative": ({"frequency_penalty": -1.2}, [presence_frequency(0.0, -1.2)], False),
        "logit_bias": ({"logit_bias": {plain[0]: -100.0, 7: 3.5}}, [logit_bias({plain[0]: -100.0, 7: 3.5})],
                       False),
        # EOS made likely, held off for 5 tokens.
        "min_tokens": ({"logit_bias": {eos: 30.0}, "min_tokens": 5},
                       [min_tokens(5, eos), logit_bias({eos: 30.0})], True),
        "bad_words": ({"bad_words": [word, llm.tokenizer.decode(plain[1:2])]},
                      [bad_words(llm.tokenizer, [word, llm.tokenizer.decode(plain[1:2])], eos)], False),
        "all_together": ({"repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.5,
                          "logit_bias": {9: 2.0}, "bad_words": [word]},
                         [bad_words(llm.tokenizer, [word], eos), logit_bias({9: 2.0}), repetition_penalty(1.3),
                          presence_frequency(0.5, 0.5)], False),
    }


CASES = ["repetition_penalty", "repetition_penalty_below_1", "presence_frequency", "frequency_penalty_negative",
         "logit_bias", "min_tokens", "bad_words", "all_together"]


def knob_params(fields: dict, stops_at_eos: bool) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=not stops_at_eos, **fields)


@pytest.mark.parametrize("case", CASES)
def test_greedy_knob_matches_the_reference(llm, hf_model, prompts, case):
    for prompt in prompts:
        fields, processors, stops_at_eos = knob_cases(llm, hf_model, prompt)[case]
        eos = llm.tokenizer.eos_token_id if stops_at_eos else None
        expected = reference_greedy(hf_model, prompt, MAX_TOKENS, processors, eos)
        assert expected != reference_greedy(hf_model, prompt, MAX_TOKENS, [], eos)  # the knob matters here
        out = llm.generate([prompt], knob_params(fields, stops_at_eos), use_tqdm=False)[0]
        assert out.outputs[0].token_ids == expected, case


def test_neutral_values_change_nothing(llm, hf_model, prompts):
    neutral = {"presence_penalty": 0.0, "frequency_penalty": 0, "repetition_penalty": 1, "logit_bias": {},
               "min_tokens": 0, "bad_words": []}
    params = knob_params(neutral, stops_at_eos=False)
    assert not params.adjusts_logits and params.speculates
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [reference_greedy(hf_model, p, MAX_TOKENS, []) for p in prompts]


def test_mixed_batch_gives_each_request_what_it_gets_alone(llm, hf_model, prompts):
    cases = [(prompt, knob_params(fields, stops_at_eos)) for prompt in prompts
             for fields, _, stops_at_eos in knob_cases(llm, hf_model, prompt).values()]
    cases += [(prompt, knob_params({}, False)) for prompt in prompts]
    alone = [llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids for prompt, params in cases]
    together = llm.generate([p for p, _ in cases], [params for _, params in cases], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in together] == alone


def test_sampled_requests_take_the_processed_distribution(llm, prompts):
    """A bias of 100 leaves its token all of the probability; a large repetition penalty on a prompt of that one
    token takes it away again (and logprobs stay the model's own)."""
    token = 42
    biased = SamplingParams(temperature=1.0, seed=3, max_tokens=8, ignore_eos=True, logit_bias={token: 100.0},
                            logprobs=0)
    out = llm.generate([prompts[0]], biased, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [token] * 8
    assert out.logprobs[0][token].logprob < -0.01
    penalized = SamplingParams(temperature=1.0, seed=3, max_tokens=8, ignore_eos=True, logit_bias={token: 100.0},
                               presence_penalty=2.0, repetition_penalty=50.0)
    assert token not in llm.generate([[token] * 5], penalized, use_tqdm=False)[0].outputs[0].token_ids[1:]


def test_requests_with_knobs_do_not_speculate(tiny_llama, llm):
    prompt = list(range(5, 20)) * 3  # n-gram drafts find matches in it
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, repetition_penalty=1.2)
    assert not params.speculates
    spec = LLM(tiny_llama, kv_cache_gib=0.01, speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                                                   "adaptive": False})
    out = spec.generate([prompt], params, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    assert spec.engine.spec_stats.num_verifications == 0
    spec.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)
    assert spec.engine.spec_stats.num_verifications > 0  # the same request without the knob speculates


@pytest.mark.parametrize("kwargs, name", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"presence_penalty": "high"}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"), ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"), ({"repetition_penalty": 1e-30}, "repetition_penalty"),
    ({"repetition_penalty": 1e30}, "repetition_penalty"), ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"logit_bias": {5: 100.5}}, "logit_bias"), ({"logit_bias": {5: -1e300}}, "logit_bias"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"), ({"logit_bias": {-1: 1.0}}, "logit_bias"),
    ({"logit_bias": {5: float("inf")}}, "logit_bias"), ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 1.5}, "min_tokens"), ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
    ({"bad_words": "fox"}, "bad_words"), ({"bad_words": ["fox", " "]}, "bad_words"), ({"bad_words": [3]}, "bad_words"),
])
def test_invalid_values_name_the_field(kwargs, name):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{name} "):
        SamplingParams(**kwargs)


def test_token_ids_past_the_vocabulary_are_refused_by_name(llm):
    vocab = llm.engine.model_config.vocab_size
    with pytest.raises(ValueError, match=r"SamplingParams\.logit_bias .*outside the vocabulary"):
        llm.engine.add_request("past", [5, 6], SamplingParams(logit_bias={vocab: 1.0}))
    out = llm.generate([[5, 6]], SamplingParams(logit_bias={vocab + 3: 1.0}), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "error"
    assert not llm.engine.has_unfinished_requests()


SERVER_KNOBS = {"presence_penalty": 1.5, "frequency_penalty": 0.5, "repetition_penalty": 1.3,
                "min_tokens": 3, "bad_words": ["the"]}


@pytest.fixture(scope="module")
def server(tiny_llama):
    with running_server(tiny_llama, kv_cache_gib=0.01) as (url, _):
        yield url


def test_server_passes_the_knobs_on(server, tiny_llama, llm):
    prompt = "the quick brown fox"
    bias = {str(llm.tokenizer.eos_token_id): 20, "7": -50.5}
    params = SamplingParams(temperature=0, max_tokens=12, logit_bias={int(t): b for t, b in bias.items()},
                            **SERVER_KNOBS)
    expected = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert expected.text != llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12),
                                         use_tqdm=False)[0].outputs[0].text
    body = {"model": tiny_llama, "temperature": 0, "max_tokens": 12, "logit_bias": bias, **SERVER_KNOBS}
    completion = httpx.post(server + "/v1/completions", json={**body, "prompt": prompt}, timeout=60).json()
    assert completion["choices"][0]["text"] == expected.text
    messages = [{"role": "user", "content": prompt}]
    expected_chat = llm.chat(messages, params, use_tqdm=False)[0].outputs[0]
    chat = httpx.post(server + "/v1/chat/completions", json={**body, "messages": messages}, timeout=60).json()
    assert chat["choices"][0]["message"]["content"] == expected_chat.text


@pytest.mark.parametrize("fields, param, words", [
    ({"logit_bias": {"fox": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "[-100, 100]"),
    ({"logit_bias": {"٣": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {"99999": 1}}, "logit_bias", "outside the vocabulary"),
    ({"repetition_penalty": 0}, "repetition_penalty", "> 0"),
    ({"presence_penalty": -2.5}, "presence_penalty", "[-2, 2]"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens", "at most max_tokens"),
    ({"bad_words": [""]}, "bad_words", "non-blank"),
])
def test_server_refuses_bad_values_by_name(server, tiny_llama, fields, param, words):
    for path, prompt in (("/v1/completions", {"prompt": "hi"}),
                         ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        response = httpx.post(server + path, json={"model": tiny_llama, **prompt, **fields}, timeout=60)
        error = response.json()["error"]
        assert (response.status_code, error["param"]) == (400, param), error
        assert words in error["message"], error


def test_vllm_prompt_dicts(llm, prompts):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    text = "the quick brown fox"
    expected = llm.generate([text, prompts[0]], params, use_tqdm=False)
    outputs = llm.generate([{"prompt": text}, {"prompt_token_ids": prompts[0]}], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    assert outputs[0].prompt == text and outputs[1].prompt_token_ids == prompts[0]
    single = llm.generate({"prompt_token_ids": prompts[0]}, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in single] == [expected[1].outputs[0].token_ids]


@pytest.mark.parametrize("prompt, words", [
    ({}, "exactly one of the keys"), ({"text": "hi"}, "exactly one of the keys"),
    ({"prompt": "hi", "prompt_token_ids": [5]}, "exactly one of the keys"),
    ({"prompt": [5, 6]}, "'prompt' must be a str"), ({"prompt_token_ids": "hi"}, "'prompt_token_ids' must be a list"),
])
def test_bad_prompt_dicts_are_refused(llm, prompt, words):
    with pytest.raises(ValueError, match=words):
        llm.generate([prompt], SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_tokenize_detokenize_and_version(server, tiny_llama, llm):
    text = "the quick brown fox"
    tokens = llm.tokenizer.encode(text)
    response = httpx.post(server + "/tokenize", json={"model": tiny_llama, "prompt": text}).json()
    assert response == {"count": len(tokens), "max_model_len": llm.engine.max_model_len, "tokens": tokens}
    messages = [{"role": "user", "content": text}]
    chat = httpx.post(server + "/tokenize", json={"model": tiny_llama, "messages": messages}).json()
    assert chat["tokens"] == llm.apply_chat_template(messages)
    bare = httpx.post(server + "/tokenize", json={"model": tiny_llama, "messages": messages,
                                                  "add_generation_prompt": False}).json()
    assert bare["tokens"] == llm.apply_chat_template(messages, add_generation_prompt=False) != chat["tokens"]
    detokenized = httpx.post(server + "/detokenize", json={"model": tiny_llama, "tokens": tokens}).json()
    assert detokenized == {"prompt": llm.tokenizer.decode(tokens)}
    assert httpx.get(server + "/version").json() == {"version": foreseer.__version__}


@pytest.mark.parametrize("path, body, status, param, words", [
    ("/tokenize", {"prompt": "hi"}, 400, "model", "Field required"),
    ("/tokenize", {"model": "gpt-4", "prompt": "hi"}, 404, "model", "gpt-4"),
    ("/tokenize", {"model": "M"}, 400, None, "exactly one of prompt or messages"),
    ("/tokenize", {"model": "M", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, 400, None,
     "exactly one of prompt or messages"),
    ("/detokenize", {"model": "M", "tokens": [5, 10**6]}, 400, "tokens", "token ids in [0,"),
    ("/detokenize", {"model": "M", "tokens": "hi"}, 400, "tokens", "valid list"),
])
def test_tokenize_refusals_name_the_field(server, tiny_llama, path, body, status, param, words):
    if body.get("model") == "M":
        body = {**body, "model": tiny_llama}
    response = httpx.post(server + path, json=body)
    error = response.json()["error"]
    assert (response.status_code, error["param"]) == (status, param), error
    assert words in error["message"], error
