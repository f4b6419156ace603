"""Structured outputs: grammar-constrained decoding (JSON schema, regex, choice) offline and on the server."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest
import torch
from helpers import running_server
from transformers import AutoModelForCausalLM

from foreseer import LLM, SamplingParams, StructuredOutputsParams
from foreseer.structured import GrammarCompiler
from foreseer.structured.xgrammar_backend import XGrammarBackend

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "city": {"enum": ["Paris", "Rome", "Oslo", "Lima"]}},
          "required": ["name", "age", "city"], "additionalProperties": False}
TINY_REGEX = r"(ab|ba)+c?"


@pytest.fixture(scope="module")
def tiny_llm(tiny_llama) -> LLM:
    return LLM(tiny_llama, kv_cache_gib=0.01)


def greedy(max_tokens: int, structured_outputs: StructuredOutputsParams | None = None) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, structured_outputs=structured_outputs)


def test_params_set_exactly_one_constraint():
    with pytest.raises(ValueError, match="structured_outputs must set exactly one"):
        StructuredOutputsParams(regex="a+", choice=["a"])
    with pytest.raises(ValueError, match="structured_outputs must set exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="structured_outputs cannot be combined with ignore_eos"):
        SamplingParams(ignore_eos=True, structured_outputs=StructuredOutputsParams(regex="a+"))
    assert not SamplingParams(structured_outputs=StructuredOutputsParams(regex="a+")).speculates


def test_mixed_batch_matches_free_runs_and_masked_reference(tiny_llm, tiny_llama):
    prompts = ["the cat sat", "a dog ran far", "hello there"]
    free_alone = [o.outputs[0].token_ids for o in tiny_llm.generate(prompts, greedy(16))]
    constrained = StructuredOutputsParams(regex=TINY_REGEX)
    outputs = tiny_llm.generate(prompts * 2, [greedy(16)] * 3 + [greedy(16, constrained)] * 3)
    assert [o.outputs[0].token_ids for o in outputs[:3]] == free_alone
    engine = tiny_llm.engine
    # The reference: transformers' float32 logits, the library's mask applied, argmax, one token at a time.
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    backend = XGrammarBackend(engine.tokenizer, engine.model_config.vocab_size, engine.eos_token_ids)
    for prompt, output in zip(prompts, outputs[3:]):
        grammar = GrammarCompiler(backend).matcher(constrained)
        ids = engine.tokenize_prompt(prompt)
        expected: list[int] = []
        bitmask = backend.allocate_bitmask(1)
        while len(expected) < 16:
            with torch.no_grad():
                logits = hf(torch.tensor([ids + expected])).logits[:, -1].float()
            grammar.fill_bitmask(expected, bitmask, 0)
            backend.apply_bitmask(logits, bitmask)
            expected.append(int(logits.argmax()))
            if expected[-1] in engine.eos_token_ids:
                break
        assert output.outputs[0].token_ids == expected
        text = output.outputs[0].text
        assert re.fullmatch(TINY_REGEX, text) or (output.outputs[0].finish_reason == "length"
                                                  and re.fullmatch(r"(ab|ba)*(a|b)?", text)), text


@pytest.mark.parametrize("spec, kind", [(StructuredOutputsParams(json={"type": "nonsense"}), "json"),
                                        (StructuredOutputsParams(json="{not json"), "json"),
                                        (StructuredOutputsParams(regex="(a"), "regex"),
                                        (StructuredOutputsParams(grammar="root ::= undefined_rule"), "grammar")])
def test_invalid_spec_is_refused_offline(tiny_llm, spec, kind):
    with pytest.raises(ValueError, match=f"SamplingParams.structured_outputs {kind} does not compile: .+"):
        tiny_llm.generate(["hi"], greedy(4, spec))
    assert tiny_llm.generate(["hi"], greedy(4))[0].outputs[0].token_ids  # the engine serves on


def test_server_structured_outputs_and_bad_specs(tiny_llama):
    with running_server(tiny_llama, kv_cache_gib=0.01) as (url, _):
        bad = [("/v1/completions", {"prompt": "hi", "guided_regex": "(a"}, "guided_regex"),
               ("/v1/completions", {"prompt": "hi", "guided_json": {"type": "nonsense"}}, "guided_json"),
               ("/v1/completions", {"prompt": "hi", "structured_outputs": {"regex": "(a"}}, "structured_outputs"),
               ("/v1/completions", {"prompt": "hi", "structured_outputs": {"regex": "a", "choice": ["b"]}},
                "structured_outputs"),
               ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": {
                   "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
                "response_format")]
        for path, body, field in bad:
            response = httpx.post(url + path, json={"model": tiny_llama, "max_tokens": 8, **body}, timeout=60)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == field, response.text
        for body in ({"guided_choice": ["abc", "bab"]}, {"structured_outputs": {"choice": ["abc", "bab"]}}):
            response = httpx.post(url + "/v1/completions", json={"model": tiny_llama, "prompt": "hi", "max_tokens": 8,
                                                                 "temperature": 0, **body}, timeout=60)
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] in ("abc", "bab")


@pytest.mark.slow
def test_json_schema_outputs_validate(real_llm):
    names = ["a chef", "a pilot", "a poet", "a nurse", "a farmer", "a judge", "a baker", "a sailor", "a teacher",
             "a miner", "a painter", "a dancer", "a monk", "a diver", "a tailor", "a guard", "a scout", "a barber",
             "a singer", "a clerk"]
    tokenizer = real_llm.engine.tokenizer
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"Describe {who} as JSON."}],
                                             add_generation_prompt=True, tokenize=False) for who in names]
    outputs = real_llm.generate(prompts, greedy(96, StructuredOutputsParams(json=PERSON)))
    for output in outputs:
        assert output.outputs[0].finish_reason == "stop", output.outputs[0].text
        jsonschema.validate(json.loads(output.outputs[0].text), PERSON)


@pytest.mark.slow
def test_regex_and_choice_outputs_match(real_llm):
    phone, choice = r"\(\d{3}\) \d{3}-\d{4}", ["positive", "negative", "neutral"]
    sampled = SamplingParams(temperature=0.8, seed=1, max_tokens=64,
                             structured_outputs=StructuredOutputsParams(regex=phone))
    outputs = real_llm.generate(
        ["My phone number is", "The review 'great film' is", "Call me at"],
        [greedy(64, StructuredOutputsParams(regex=phone)), greedy(64, StructuredOutputsParams(choice=choice)),
         sampled])
    assert re.fullmatch(phone, outputs[0].outputs[0].text)
    assert outputs[1].outputs[0].text in choice
    assert re.fullmatch(phone, outputs[2].outputs[0].text)
