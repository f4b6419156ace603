"""foreseer run-batch: OpenAI Batch API files run on the offline engine, each answer the offline LLM's, each bad line
an error line that stops nothing."""

import json

import pytest

from foreseer import LLM, SamplingParams
from foreseer.cli import main

ENGINE = ["--kv-cache-gib", "0.01"]


def _line(custom_id: str, url: str, body: dict) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


@pytest.fixture(scope="module")
def batch(tiny_llama, tmp_path_factory) -> list[dict]:
    """The results of a batch mixing completions, chats and lines that fail in every way."""
    directory = tmp_path_factory.mktemp("run_batch")
    lines = [
        _line("fox", "/v1/completions", {"model": tiny_llama, "prompt": "the quick brown fox", "max_tokens": 8,
                                         "temperature": 0}),
        _line("hello-chat", "/v1/chat/completions", {"model": tiny_llama, "temperature": 0, "max_tokens": 6,
                                                     "messages": [{"role": "user", "content": "hello"}]}),
        "{not json",
        _line("two-prompts", "/v1/completions", {"model": tiny_llama, "prompt": ["one two", "three four five"],
                                                 "max_tokens": 5, "temperature": 0}),
        _line("no-messages", "/v1/chat/completions", {"model": tiny_llama, "messages": []}),
        _line("too-long", "/v1/completions", {"model": tiny_llama, "prompt": "x", "max_tokens": 10**6}),
        _line("wrong-url", "/v1/embeddings", {"model": tiny_llama, "input": "x"}),
        _line("sky-chat", "/v1/chat/completions", {"model": tiny_llama, "temperature": 0, "max_completion_tokens": 7,
                                                   "messages": [{"role": "system", "content": "be brief"},
                                                                {"role": "user", "content": "why is the sky blue"}]}),
    ]
    requests, results = directory / "requests.jsonl", directory / "results.jsonl"
    requests.write_text("\n".join(lines) + "\n")
    assert main(["run-batch", "-i", str(requests), "-o", str(results), "--model", tiny_llama, *ENGINE]) == 0
    return [json.loads(line) for line in results.read_text().splitlines()]


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return LLM(tiny_llama, kv_cache_gib=0.01)


def test_results_keep_the_input_order(batch):
    assert [r["custom_id"] for r in batch] == ["fox", "hello-chat", None, "two-prompts", "no-messages", "too-long",
                                               "wrong-url", "sky-chat"]
    assert len({r["id"] for r in batch}) == len(batch)


def test_answers_equal_the_offline_llm(batch, llm):
    by_id = {r["custom_id"]: r for r in batch}
    greedy = SamplingParams(temperature=0, max_tokens=8)
    fox = by_id["fox"]["response"]
    assert fox["status_code"] == 200 and by_id["fox"]["error"] is None
    assert fox["body"]["object"] == "text_completion" and fox["body"]["id"] == fox["request_id"]
    expected = llm.generate(["the quick brown fox"], greedy, use_tqdm=False)[0]
    assert fox["body"]["choices"][0]["text"] == expected.outputs[0].text
    assert fox["body"]["usage"]["completion_tokens"] == len(expected.outputs[0].token_ids)

    two = by_id["two-prompts"]["response"]["body"]
    expected = llm.generate(["one two", "three four five"], SamplingParams(temperature=0, max_tokens=5),
                            use_tqdm=False)
    assert [c["index"] for c in two["choices"]] == [0, 1]
    assert [c["text"] for c in two["choices"]] == [o.outputs[0].text for o in expected]

    for custom_id, messages, max_tokens in [
            ("hello-chat", [{"role": "user", "content": "hello"}], 6),
            ("sky-chat", [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": "why is the sky blue"}], 7)]:
        body = by_id[custom_id]["response"]["body"]
        expected = llm.chat(messages, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)[0]
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"] == {"role": "assistant", "content": expected.outputs[0].text}
        assert body["usage"]["prompt_tokens"] == len(expected.prompt_token_ids)


def test_bad_lines_get_errors_and_stop_nothing(batch):
    by_id = {r["custom_id"]: r for r in batch}
    not_json = batch[2]
    assert not_json["response"] is None and "not valid JSON" in not_json["error"]["message"]
    assert by_id["wrong-url"]["response"] is None and "/v1/embeddings" in by_id["wrong-url"]["error"]["message"]
    # Bodies the server would refuse get its status and error body.
    for custom_id, param in [("no-messages", "messages"), ("too-long", "max_tokens")]:
        response = by_id[custom_id]["response"]
        assert response["status_code"] == 400 and by_id[custom_id]["error"] is None
        assert response["body"]["error"]["param"] == param
    assert by_id["sky-chat"]["response"]["status_code"] == 200
