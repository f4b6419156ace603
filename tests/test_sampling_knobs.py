"""vLLM's logits-processing knobs (penalties, logit_bias, min_tokens, bad_words) against references written with
transformers' logits processors and plain torch, offline and through the server; vLLM's prompt dicts."""

from collections.abc import Callable

import httpx
import pytest
import torch
from transformers import (AutoModelForCausalLM, MinNewTokensLengthLogitsProcessor, NoBadWordsLogitsProcessor,
                          RepetitionPenaltyLogitsProcessor)

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
