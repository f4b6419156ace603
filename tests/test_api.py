"""The LLM API: bad prompts get clear errors while the rest of the call completes; prompt forms."""

import pytest

from foreseer import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama, kv_cache_gib=0.01, max_model_len=256)


def test_bad_prompts_get_errors_and_others_complete(llm):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    good = [[5, 6, 7], [8, 9]]
    expected = [o.outputs[0].token_ids for o in llm.generate(good, params, use_tqdm=False)]
    outputs = llm.generate([good[0], [], list(range(5, 305)), [10**9], good[1]], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in (outputs[0], outputs[4])] == expected
    assert outputs[1].error == "prompt is empty"
    assert "300 tokens" in outputs[2].error and "context is 256" in outputs[2].error
    assert "token ids" in outputs[3].error
    for bad in outputs[1:4]:
        assert bad.finished and bad.outputs[0].finish_reason == "error"
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_max_tokens_beyond_context_is_an_error(llm):
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=300), use_tqdm=False)[0]
    assert "max_tokens 300" in out.error


def test_string_and_token_prompts_agree(llm):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    text = "the quick brown fox"
    ids = llm.tokenizer.encode(text)
    by_text, by_ids = llm.generate([text, ids], params, use_tqdm=False)
    assert by_text.prompt == text and by_text.prompt_token_ids == ids
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids
    assert by_text.outputs[0].text == llm.tokenizer.decode(by_text.outputs[0].token_ids, skip_special_tokens=True)


def test_outputs_follow_prompt_order_and_carry_metrics(llm):
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (12, 2, 7)]
    outputs = llm.generate([[5], [6], [7]], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [12, 2, 7]
    for o in outputs:
        assert o.metrics.time_to_first_token is not None and o.metrics.e2e_latency >= o.metrics.time_to_first_token


def test_chat_applies_template(llm):
    out = llm.chat([{"role": "user", "content": "hello"}], SamplingParams(temperature=0, max_tokens=4),
                   use_tqdm=False)[0]
    assert out.prompt_token_ids == llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, return_dict=True)["input_ids"]


def test_unknown_engine_argument_and_bad_config():
    with pytest.raises(TypeError, match="unknown engine argument 'max_batch'"):
        LLM("unused", max_batch=3)
    with pytest.raises(ValueError, match="block_size"):
        LLM("unused", block_size=0)
