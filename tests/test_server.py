"""The OpenAI-compatible server and `foreseer bench serve`, driven over HTTP on 127.0.0.1.

Servers run in this process (uvicorn in a thread, on a socket bound to a free port) or, for the SIGTERM test,
as `foreseer serve` in a subprocess. Outputs are checked against the offline LLM API on the same model.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from helpers import metrics, running_server

from foreseer import LLM, SamplingParams
from foreseer.bench.serve import ServeBenchArgs
from foreseer.bench.serve import run as run_bench
from foreseer.cli import main as cli_main
from foreseer.engine.async_engine import AsyncLLMEngine
from foreseer.spec.cost_model import StepCostModel

TINY_ENGINE = {"kv_cache_gib": 0.01}
REAL_MODEL = "smollm2-135m-instruct"


def wait_until(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def sse_events(lines: Iterator[str]) -> Iterator[dict | str]:
    """The data of each server-sent event; "[DONE]" as a string."""
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            yield data if data == "[DONE]" else json.loads(data)


def post_stream(url: str, path: str, body: dict) -> list[dict | str]:
    with httpx.stream("POST", url + path, json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(sse_events(response.iter_lines()))


def engine_is_idle(engine: AsyncLLMEngine) -> bool:
    blocks = engine.engine.block_manager
    return not engine.engine.has_unfinished_requests() and blocks.num_free_blocks == blocks.num_blocks


# -- the tiny model ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_server(tiny_llama) -> Iterator[tuple[str, AsyncLLMEngine]]:
    with running_server(tiny_llama, **TINY_ENGINE) as server:
        yield server


@pytest.fixture(scope="module")
def offline(tiny_llama) -> LLM:
    return LLM(tiny_llama, **TINY_ENGINE)


def test_models_and_health(tiny_server, tiny_llama):
    url, _ = tiny_server
    models = httpx.get(url + "/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["max_model_len"]) for m in models["data"]] == [(tiny_llama, "model", 512)]
    assert httpx.get(url + "/health").status_code == 200


def test_completion_matches_offline_and_stream_concatenates(tiny_server, tiny_llama, offline):
    url, _ = tiny_server
    body = {"model": tiny_llama, "prompt": "the quick brown fox", "max_tokens": 20, "temperature": 0,
            "ignore_eos": True}
    expected = offline.generate("the quick brown fox", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                                use_tqdm=False)[0]
    response = httpx.post(url + "/v1/completions", json=body).json()
    assert response["id"].startswith("cmpl-") and response["object"] == "text_completion"
    [choice] = response["choices"]
    assert (choice["index"], choice["text"], choice["finish_reason"]) == (0, expected.outputs[0].text, "length")
    assert response["usage"] == {"prompt_tokens": len(expected.prompt_token_ids), "completion_tokens": 20,
                                 "total_tokens": len(expected.prompt_token_ids) + 20}

    events = post_stream(url, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"] != response["id"]
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == expected.outputs[0].text
    assert len(chunks) > 3  # tokens arrive as they are produced, not in one piece
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 2) + ["length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == response["usage"]


def test_sampling_values_that_once_killed_the_engine_answer_as_greedy(tiny_server, tiny_llama, offline):
    """temperature 1e-320 (0 in float32), top_p 1e-50 and a top_k past int64 made the sampler's probabilities
    NaN or overflowed, which ended the engine for every later request."""
    url, _ = tiny_server
    expected = offline.generate("the quick brown fox", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                                use_tqdm=False)[0].outputs[0].text
    body = {"model": tiny_llama, "prompt": "the quick brown fox", "max_tokens": 12, "ignore_eos": True}
    for hostile in ({"temperature": 1e-320}, {"temperature": 0.7, "top_p": 1e-50},
                    {"temperature": 0.7, "top_k": 18446744073709551616, "top_p": 1e-50}):
        response = httpx.post(url + "/v1/completions", json={**body, **hostile})
        assert response.status_code == 200 and response.json()["choices"][0]["text"] == expected, hostile
    assert httpx.get(url + "/health").status_code == 200


def test_completion_batch_with_n_seed_and_logprobs(tiny_server, tiny_llama, offline):
    url, _ = tiny_server
    prompts = ["the quick brown fox", "hello world"]
    body = {"model": tiny_llama, "prompt": prompts, "n": 2, "temperature": 0.8, "seed": 7, "logprobs": 3,
            "max_tokens": 12, "ignore_eos": True}
    params = SamplingParams(n=2, temperature=0.8, seed=7, logprobs=3, max_tokens=12, ignore_eos=True)
    expected = [c for out in offline.generate(prompts, params, use_tqdm=False) for c in out.outputs]
    response = httpx.post(url + "/v1/completions", json=body).json()
    choices = response["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert [c["text"] for c in choices] == [e.text for e in expected]
    for choice, reference in zip(choices, expected):
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 12
        assert logprobs["token_logprobs"] == pytest.approx(
            [lp[t].logprob for t, lp in zip(reference.token_ids, reference.logprobs)], abs=1e-4)
        assert all(len(top) <= 3 for top in logprobs["top_logprobs"])
        assert logprobs["text_offset"][0] == 0

    events = post_stream(url, "/v1/completions", {**body, "stream": True})
    texts, tokens = {}, {}
    for chunk in events[:-1]:
        [choice] = chunk["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        tokens[choice["index"]] = tokens.get(choice["index"], []) + choice["logprobs"]["tokens"]
    assert [texts[i] for i in range(4)] == [c["text"] for c in choices]
    assert [tokens[i] for i in range(4)] == [c["logprobs"]["tokens"] for c in choices]


def test_chat_matches_offline_chat_with_stop_and_logprobs(tiny_server, tiny_llama, offline):
    url, _ = tiny_server
    messages = [{"role": "system", "content": "answer in one sentence please."},
                {"role": "user", "content": "hello world, how are you today?"}]
    unstopped = offline.chat(messages, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0].text
    stop = unstopped[8:10]
    expected = offline.chat(messages, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=stop,
                                                     logprobs=2), use_tqdm=False)[0]
    body = {"model": tiny_llama, "messages": messages, "temperature": 0, "max_completion_tokens": 24,
            "ignore_eos": True, "stop": [stop], "logprobs": True, "top_logprobs": 2}
    response = httpx.post(url + "/v1/chat/completions", json=body).json()
    assert response["id"].startswith("chatcmpl-") and response["object"] == "chat.completion"
    [choice] = response["choices"]
    assert choice["message"] == {"role": "assistant", "content": expected.outputs[0].text}
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", stop)
    content = choice["logprobs"]["content"]
    assert len(content) == len(expected.outputs[0].token_ids) == response["usage"]["completion_tokens"]
    assert [c["logprob"] for c in content] == pytest.approx(
        [lp[t].logprob for t, lp in zip(expected.outputs[0].token_ids, expected.outputs[0].logprobs)], abs=1e-4)
    assert all(len(c["top_logprobs"]) == 2 and bytes(c["bytes"]).decode() == c["token"] for c in content)

    events = post_stream(url, "/v1/chat/completions",
                         {**body, "stream": True, "stream_options": {"include_usage": True}})
    chunks = events[:-1]
    assert events[-1] == "[DONE]" and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0] for c in chunks[1:-1]]
    assert "".join(d["delta"]["content"] for d in deltas) == expected.outputs[0].text
    assert deltas[-1]["finish_reason"] == "stop"
    assert sum(len(d["logprobs"]["content"]) for d in deltas) == len(content)
    assert chunks[-1]["usage"] == response["usage"]


def test_requests_are_batched_together(tiny_server, tiny_llama, offline):
    """Concurrent HTTP requests share engine steps: all are generating at the same time, and outputs are exact."""
    url, _ = tiny_server
    prompts = ["the quick brown fox", "a paged cache keeps blocks", "continuous batching", "hello world"]
    expected = offline.generate(prompts, SamplingParams(temperature=0, max_tokens=150, ignore_eos=True),
                                use_tqdm=False)

    async def stream(client: httpx.AsyncClient, prompt: str) -> tuple[str, float, float]:
        body = {"model": tiny_llama, "prompt": prompt, "max_tokens": 150, "temperature": 0, "ignore_eos": True,
                "stream": True}
        text, first = "", None
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    first = first or time.monotonic()
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text, first, time.monotonic()

    async def run() -> list[tuple[str, float, float]]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(stream(client, p) for p in prompts))

    results = asyncio.run(run())
    assert [text for text, _, _ in results] == [e.outputs[0].text for e in expected]
    assert max(first for _, first, _ in results) < min(last for _, _, last in results)


BAD_REQUESTS = [
    # (path, body: raw bytes or JSON, status, param, words in the message)
    ("/v1/completions", b"{not json", 400, None, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, None, "valid dictionary"),
    ("/v1/completions", {"prompt": "hi"}, 400, "model", "Field required"),
    ("/v1/completions", {"model": "M"}, 400, "prompt", "Field required"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model", "gpt-4"),
    ("/v1/completions", {"model": "M", "prompt": ""}, 400, "prompt", "empty"),
    ("/v1/completions", {"model": "M", "prompt": []}, 400, "prompt", "empty"),
    ("/v1/completions", {"model": "M", "prompt": 42}, 400, "prompt", "valid string"),
    ("/v1/completions", {"model": "M", "prompt": "fox " * 600}, 400, "prompt", "context is 512"),
    ("/v1/completions", {"model": "M", "prompt": [10**9]}, 400, "prompt", "token ids"),
    ("/v1/completions", {"model": "M", "prompt": ["ok", ""]}, 400, "prompt", "prompt 1: prompt is empty"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "max_tokens": 10**6}, 400, "max_tokens", "context of 512"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens", "valid integer"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "temperature": -0.5}, 400, "temperature", ">= 0"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "top_p": 1.5}, 400, "top_p", "(0, 1]"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ("/v1/completions", b'{"model": "M", "prompt": "hi", "top_p": NaN}', 400, "top_p", "finite"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "top_k": -5}, 400, "top_k", "integer >= 1"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "min_p": 2}, 400, "min_p", "[0, 1]"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "n": 0}, 400, "n", "greater than or equal to 1"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "n": 1000}, 400, "n", "at most 128 (--max-n)"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "logprobs": 100}, 400, "logprobs",
     "at most 20 (--max-logprobs)"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "seed": "abc"}, 400, "seed", "valid integer"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "seed": 2**70}, 400, "seed", "less than"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "stop": [""]}, 400, "stop", "non-empty"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "stop": 5}, 400, "stop", "valid string"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "stream": "maybe"}, 400, "stream", "valid boolean"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "frequency_penalty": 3}, 400, "frequency_penalty",
     "[-2, 2]"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "echo": True}, 400, "echo", "not supported"),
    ("/v1/chat/completions", {"model": "M"}, 400, "messages", "Field required"),
    ("/v1/chat/completions", {"model": "M", "messages": []}, 400, "messages", "at least 1 item"),
    ("/v1/chat/completions", {"model": "M", "messages": "hello"}, 400, "messages", "valid list"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "robot", "content": "hi"}]}, 400,
     "messages.0.role", "'robot'"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user"}]}, 400, "messages.0.content",
     "Field required"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": 5}]}, 400,
     "messages.0.content", "valid string"),
    ("/v1/chat/completions", {"model": "M", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages.0.content.0.type", "'image_url'"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": "hi"}],
                              "max_completion_tokens": 10**5}, 400, "max_completion_tokens", "context of 512"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
     400, "top_logprobs", "requires logprobs"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 50}, 400, "top_logprobs", "at most 20 (--max-logprobs)"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function"}]}, 400, "tools", "not supported"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": "hi" * 600}]}, 400,
     "messages", "context is 512"),
    ("/v1/nothing", {"model": "M"}, 404, None, "Not Found"),
    ("/v1/completions", {"model": "M", "prompt": "Hi \ud800"}, 400, "prompt", "lone surrogate"),
    ("/v1/completions", b'{"model": "M", "prompt": "Hi \xed\xa0\x80"}', 400, "prompt", "lone surrogate"),
    ("/v1/completions", {"model": "\udfff", "prompt": "hi"}, 400, "model", "lone surrogate"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": "Hi \ud800"}]}, 400,
     "messages.0.content", "lone surrogate"),
]


def test_bad_requests_get_4xx_and_good_ones_still_complete(tiny_server, tiny_llama, offline):
    url, engine = tiny_server
    good_prompts = ["the quick brown fox", "hello world", "a paged cache", "0123456789"]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected_completions = [o.outputs[0].text for o in offline.generate(good_prompts, params, use_tqdm=False)]
    conversations = [[{"role": "user", "content": p}] for p in good_prompts]
    expected_chats = [o.outputs[0].text for o in offline.chat(conversations, params, use_tqdm=False)]

    async def bad(client: httpx.AsyncClient, path: str, body: bytes | dict) -> httpx.Response:
        if isinstance(body, dict):
            body = json.dumps({**body, "model": tiny_llama} if body.get("model") == "M" else body).encode()
        else:
            body = body.replace(b'"M"', json.dumps(tiny_llama).encode())
        return await client.post(url + path, content=body, headers={"Content-Type": "application/json"})

    async def completion(client: httpx.AsyncClient, prompt: str) -> str:
        body = {"model": tiny_llama, "prompt": prompt, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
        response = await client.post(url + "/v1/completions", json=body)
        return response.json()["choices"][0]["text"]

    async def chat(client: httpx.AsyncClient, messages: list[dict]) -> str:
        body = {"model": tiny_llama, "messages": messages, "max_tokens": 40, "temperature": 0, "ignore_eos": True,
                "stream": True}
        text = ""
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["delta"]["content"]
        return text

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            goods = asyncio.gather(*(completion(client, p) for p in good_prompts),
                                   *(chat(client, m) for m in conversations))
            bads = asyncio.gather(*(bad(client, path, body) for path, body, *_ in BAD_REQUESTS))
            return await asyncio.gather(goods, bads)

    goods, bads = asyncio.run(run())
    assert goods == expected_completions + expected_chats
    for (_, body, status, param, words), response in zip(BAD_REQUESTS, bads):
        error = response.json()["error"]
        assert (response.status_code, error["param"]) == (status, param), (body, error)
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert words in error["message"], (body, error)
    assert httpx.get(url + "/health").status_code == 200
    assert wait_until(lambda: engine_is_idle(engine))


def test_client_disconnect_aborts_the_request_and_frees_its_blocks(tiny_server, tiny_llama):
    url, engine = tiny_server
    aborted = ("foreseer_requests_finished_total", (("finish_reason", "abort"),))
    before = metrics(url).get(aborted, 0)
    body = {"model": tiny_llama, "prompt": "the quick brown fox", "max_tokens": 480, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as response:
        first = next(sse_events(response.iter_lines()))
        assert first["choices"][0]["text"] is not None
        assert engine.engine.has_unfinished_requests()
    # Leaving the block closed the connection mid-stream.
    assert wait_until(lambda: engine_is_idle(engine))
    assert metrics(url)[aborted] == before + 1

    # Non-streaming: the client gives up waiting for the whole answer (4 x 480 tokens take far longer).
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json={**body, "n": 4}, timeout=0.05)
    assert wait_until(lambda: engine_is_idle(engine))
    assert metrics(url)[aborted] == before + 1 + 4  # counted per choice


def test_metrics_count_requests_tokens_and_latencies(tiny_server, tiny_llama):
    url, engine = tiny_server
    before = metrics(url)
    completion = httpx.post(url + "/v1/completions", json={
        "model": tiny_llama, "prompt": "hello world", "max_tokens": 10, "ignore_eos": True}).json()
    chat_events = post_stream(url, "/v1/chat/completions", {
        "model": tiny_llama, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True}})
    assert httpx.post(url + "/v1/completions", json={"model": tiny_llama, "prompt": ""}).status_code == 400
    usages = [completion["usage"], chat_events[-2]["usage"]]
    after = metrics(url)

    def delta(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0)

    assert delta("foreseer_generation_tokens_total") == 17
    assert delta("foreseer_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert delta("foreseer_requests_finished_total", finish_reason="length") == 2
    for histogram in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        assert delta(f"foreseer_{histogram}_count") == 2
        assert delta(f"foreseer_{histogram}_sum") > 0
    assert delta("foreseer_http_responses_total", endpoint="/v1/completions", status="200") == 1
    assert delta("foreseer_http_responses_total", endpoint="/v1/chat/completions", status="200") == 1
    assert delta("foreseer_http_responses_total", endpoint="/v1/completions", status="400") == 1
    assert wait_until(lambda: engine_is_idle(engine))
    idle = metrics(url)
    assert idle[("foreseer_num_requests_running", ())] == idle[("foreseer_num_requests_waiting", ())] == 0
    assert idle[("foreseer_kv_cache_usage_perc", ())] == 0


def test_speculating_server_matches_offline_and_exports_acceptance(tiny_llama, offline):
    with running_server(tiny_llama, speculative_config={"method": "ngram", "calibrate": False},
                        **TINY_ENGINE) as (url, engine):
        # The measured cost model of a tiny model on a busy machine is noise; pin one that always drafts.
        engine.engine.speculator.cost = StepCostModel([1, 1024], [1.0, 1.0])
        prompt = "the quick brown fox jumps over the lazy dog. " * 3
        body = {"model": tiny_llama, "prompt": prompt, "max_tokens": 64, "ignore_eos": True, "temperature": 0}
        completion = httpx.post(url + "/v1/completions", json=body).json()
        want = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=64, ignore_eos=True),
                                use_tqdm=False)[0]
        assert completion["choices"][0]["text"] == want.outputs[0].text
        assert wait_until(lambda: engine_is_idle(engine))
        exported = metrics(url)
    figures = engine.engine.spec_stats
    assert exported[("foreseer_spec_decode_num_draft_tokens_total", ())] == figures.num_draft_tokens > 0
    assert exported[("foreseer_spec_decode_num_accepted_tokens_total", ())] == figures.num_accepted_tokens
    assert exported[("foreseer_spec_decode_num_drafted_tokens_per_pos_total", (("position", "0"),))] == \
        figures.drafted_per_position[0]


def test_overload_gets_503_with_retry_after(tiny_llama):
    with running_server(tiny_llama, max_waiting_requests=2, max_num_seqs=1, **TINY_ENGINE) as (url, engine):
        body = {"model": tiny_llama, "prompt": "the quick brown fox", "max_tokens": 100, "ignore_eos": True}

        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.gather(*(client.post(url + "/v1/completions", json=body) for _ in range(10)))

        responses = asyncio.run(run())
        served = [r for r in responses if r.status_code == 200]
        refused = [r for r in responses if r.status_code == 503]
        assert len(served) + len(refused) == 10 and served and len(refused) >= 5
        assert all(r.json()["usage"]["completion_tokens"] == 100 for r in served)
        for response in refused:
            assert response.headers["Retry-After"] == "1"
            assert response.json()["error"]["code"] == "overloaded"
        assert wait_until(lambda: engine_is_idle(engine))
        assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 200


def test_an_internal_error_closes_its_connection_and_the_next_request_completes(tiny_llama, monkeypatch):
    with running_server(tiny_llama, **TINY_ENGINE) as (url, engine):
        add_request = engine.engine.add_request

        def faulty(request_id, prompt, params, *args, **kwargs):  # an injected bug, for one request only
            if params.max_tokens == 7:
                raise RuntimeError("injected")
            return add_request(request_id, prompt, params, *args, **kwargs)

        monkeypatch.setattr(engine.engine, "add_request", faulty)
        body = {"model": tiny_llama, "prompt": "hello", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
        with httpx.Client(timeout=60) as client:  # one keep-alive connection, as far as the server allows
            failed = client.post(url + "/v1/completions", json={**body, "max_tokens": 7})
            assert failed.status_code == 500 and failed.headers["connection"] == "close"
            assert failed.json()["error"]["type"] == "server_error"
            ok = client.post(url + "/v1/completions", json=body)
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_a_body_over_the_limit_gets_413_and_a_huge_prompt_holds_up_no_one(tiny_llama):
    with running_server(tiny_llama, max_body_bytes=100_000, **TINY_ENGINE) as (url, engine):
        body = {"model": tiny_llama, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
        big = {**body, "prompt": "fox " * 30_000}
        by_length = httpx.post(url + "/v1/completions", json=big)

        def chunks():  # no Content-Length: the limit counts the chunks as they come
            data = json.dumps(big).encode()
            for start in range(0, len(data), 10_000):
                yield data[start:start + 10_000]

        chunked = httpx.post(url + "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
        for response in (by_length, chunked):
            assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
            assert "100000 bytes" in response.json()["error"]["message"]
        assert httpx.post(url + "/v1/completions", json={**body, "prompt": "hello"}).status_code == 200
    with running_server(tiny_llama, **TINY_ENGINE) as (url, engine):
        # Half a million words are tokenized beside the engine, not on its thread: a short request sent after it
        # completes while the long one is still being tokenized.

        async def run():
            async with httpx.AsyncClient(timeout=120) as client:
                huge = asyncio.create_task(client.post(url + "/v1/completions",
                                                       json={**body, "prompt": "fox " * 500_000}))
                await asyncio.sleep(0.3)
                short = await client.post(url + "/v1/completions", json={**body, "prompt": "hello"})
                return short, huge.done(), await huge

        short, huge_was_done, huge = asyncio.run(run())
        assert short.status_code == 200 and not huge_was_done
        assert huge.status_code == 400 and huge.json()["error"]["param"] == "prompt"
        assert wait_until(lambda: engine_is_idle(engine))


def test_api_key_is_required_on_v1_endpoints(tiny_llama):
    with running_server(tiny_llama, api_key="sesame", **TINY_ENGINE) as (url, _):
        body = {"model": tiny_llama, "prompt": "hi", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            response = httpx.post(url + "/v1/completions", json=body, headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/v1/models").status_code == 401
        ok = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer sesame"})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/metrics").status_code == 200  # open by default, for scrapers
    with running_server(tiny_llama, api_key="sesame", protect_metrics=True, **TINY_ENGINE) as (url, _):
        assert httpx.get(url + "/metrics").status_code == 401
        key = {"Authorization": "Bearer sesame"}
        assert "foreseer" in httpx.get(url + "/metrics", headers=key).text
        assert httpx.get(url + "/health").status_code == 200


def test_sigterm_lets_running_requests_finish_and_refuses_new_ones(tiny_llama):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "foreseer.cli", "serve", "--model", tiny_llama, "--kv-cache-gib", "0.01",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def healthy() -> bool:
            assert process.poll() is None, process.stderr.read()
            try:
                return httpx.get(url + "/health").status_code == 200
            except httpx.TransportError:
                return False

        assert wait_until(healthy, timeout_s=120)
        # 4 x 480 tokens: long enough to still be running when the server stops listening.
        body = {"model": tiny_llama, "prompt": "the quick brown fox", "max_tokens": 480, "n": 4, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            events = sse_events(response.iter_lines())
            received = [next(events)]
            process.send_signal(signal.SIGTERM)

            def refused() -> bool:
                try:
                    httpx.post(url + "/v1/completions", json={**body, "stream": False, "n": 1, "max_tokens": 1})
                except (httpx.ConnectError, httpx.RemoteProtocolError):  # not listening, or closed unanswered
                    return True
                return False

            assert wait_until(refused, timeout_s=5)
            received += list(events)
        assert received[-1] == "[DONE]"
        assert received[-2]["usage"]["completion_tokens"] == 4 * 480
        assert sorted(e["choices"][0]["finish_reason"] or "" for e in received[:-2])[-4:] == ["length"] * 4
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()


def test_bench_serve_measures_a_server(tiny_server, tiny_llama, offline, tmp_path):
    url, _ = tiny_server
    questions = ["what is a fox?", "count to five", "say hello to the world", "how are you today?",
                 "what is a cache?", "the quick brown fox"]
    too_long = "fox " * 600
    dataset = tmp_path / "sharegpt.json"
    dataset.write_text(json.dumps([
        {"id": str(i), "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "ok"}]}
        for i, q in enumerate(questions + [too_long])]))
    expected = offline.chat([[{"role": "user", "content": q}] for q in questions],
                            SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    out = tmp_path / "report.json"
    report = run_bench(ServeBenchArgs(base_url=url, dataset=str(dataset), num_prompts=7, max_tokens=16,
                                      output_json=str(out)))
    assert report == json.loads(out.read_text())
    assert (report["model"], report["request_rate"], report["completed"], report["failed"]) == (
        tiny_llama, "inf", 6, 1)
    [(error, count)] = report["errors"].items()
    assert count == 1 and error.startswith("HTTP 400") and "context is 512" in error
    assert report["total_output_tokens"] == sum(len(o.outputs[0].token_ids) for o in expected)
    assert report["total_prompt_tokens"] == sum(len(o.prompt_token_ids) for o in expected)
    assert report["output_throughput"] == pytest.approx(report["total_output_tokens"] / report["duration_s"])
    for key in ("ttft_ms", "tpot_ms", "e2e_latency_ms"):
        summary = report[key]
        assert 0 < summary["p50"] <= summary["p90"] <= summary["p99"] and summary["mean"] > 0
    assert report["ttft_ms"]["p99"] <= report["e2e_latency_ms"]["p99"]

    # The command line, with Poisson arrivals and a concurrency limit.
    out = tmp_path / "cli.json"
    assert cli_main(["bench", "serve", "--base-url", url, "--dataset", str(dataset), "--num-prompts", "4",
                     "--request-rate", "20", "--max-concurrency", "2", "--max-tokens", "8",
                     "--output-json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert (report["completed"], report["failed"], report["request_rate"], report["max_concurrency"]) == (
        4, 0, 20, 2)
    assert math.isfinite(report["duration_s"])


# -- the real model, through the official openai client ----------------------------------------------------
@pytest.fixture(scope="module")
def real_server() -> Iterator[str]:
    with running_server(REAL_MODEL, kv_cache_gib=0.5) as (url, _):
        yield url


@pytest.mark.slow
def test_openai_chat_matches_offline_chat(real_server, real_llm):
    client = openai.OpenAI(base_url=real_server + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": "What is the capital of France?"}]
    expected = real_llm.chat(messages, SamplingParams(temperature=0, max_tokens=32, logprobs=2), use_tqdm=False)[0]
    response = client.chat.completions.create(model=REAL_MODEL, messages=messages, temperature=0, max_tokens=32,
                                              logprobs=True, top_logprobs=2)
    [choice] = response.choices
    assert choice.message.content == expected.outputs[0].text and "Paris" in choice.message.content
    assert choice.finish_reason == expected.outputs[0].finish_reason
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert [t.logprob for t in choice.logprobs.content] == pytest.approx(
        [lp[t].logprob for t, lp in zip(expected.outputs[0].token_ids, expected.outputs[0].logprobs)], abs=1e-3)
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)

    stream = client.chat.completions.create(model=REAL_MODEL, messages=messages, temperature=0, max_tokens=32,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.total_tokens == response.usage.total_tokens


@pytest.mark.slow
def test_openai_completions_stream_and_sampling(real_server, real_llm):
    client = openai.OpenAI(base_url=real_server + "/v1", api_key="unused", max_retries=0)
    prompt = "The three primary colors are"
    expected = real_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    response = client.completions.create(model=REAL_MODEL, prompt=prompt, temperature=0, max_tokens=24)
    assert response.choices[0].text == expected.outputs[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=REAL_MODEL, prompt=prompt, temperature=0, max_tokens=24, stream=True))
    assert streamed == response.choices[0].text

    # Seeded sampling gives the same choices streamed or not, and the same as offline.
    sampled = dict(model=REAL_MODEL, prompt=prompt, temperature=0.9, top_p=0.95, seed=3, n=2, max_tokens=20,
                   logprobs=2)
    response = client.completions.create(**sampled)
    offline = real_llm.generate(prompt, SamplingParams(n=2, temperature=0.9, top_p=0.95, seed=3, max_tokens=20),
                                use_tqdm=False)[0]
    assert [c.text for c in response.choices] == [c.text for c in offline.outputs]
    texts = ["", ""]
    for chunk in client.completions.create(**sampled, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in response.choices]
    assert all(len(c.logprobs.tokens) == len(c.logprobs.top_logprobs) for c in response.choices)


@pytest.mark.slow
def test_openai_async_client_concurrent_requests_and_errors(real_server, real_llm):
    questions = ["Name a fruit.", "What is 2 + 2?", "Say hello.", "What color is the sky?"]
    expected = real_llm.chat([[{"role": "user", "content": q}] for q in questions],
                             SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)

    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=real_server + "/v1", api_key="unused", max_retries=0)
        async with client:
            assert [m.id async for m in client.models.list()] == [REAL_MODEL]
            with pytest.raises(openai.NotFoundError) as not_found:
                await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
            assert (not_found.value.code, not_found.value.param) == ("model_not_found", "model")
            with pytest.raises(openai.BadRequestError, match="exceeds the model's context") as bad:
                await client.chat.completions.create(model=REAL_MODEL, max_tokens=10**6,
                                                     messages=[{"role": "user", "content": "hi"}])
            assert bad.value.param == "max_tokens"
            responses = await asyncio.gather(*(client.chat.completions.create(
                model=REAL_MODEL, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=24)
                for q in questions))
            return [r.choices[0].message.content for r in responses]

    assert asyncio.run(run()) == [o.outputs[0].text for o in expected]


def test_priority_and_length_hint_reach_the_scheduler(tiny_llama):
    """vLLM's `priority` orders requests under --scheduling-policy priority; a bad `length_hint` is a 400."""
    with running_server(tiny_llama, scheduling_policy="priority", max_num_seqs=1, **TINY_ENGINE) as (url, engine):
        def body(priority: int, max_tokens: int) -> dict:
            return {"model": tiny_llama, "prompt": "the quick brown fox", "max_tokens": max_tokens,
                    "ignore_eos": True, "priority": priority, "length_hint": max_tokens}

        async def run() -> list[str]:
            finished: list[str] = []
            async with httpx.AsyncClient(timeout=60) as client:
                async def send(name: str, priority: int, max_tokens: int) -> None:
                    response = await client.post(url + "/v1/completions", json=body(priority, max_tokens))
                    assert response.status_code == 200, response.text
                    finished.append(name)

                first = asyncio.create_task(send("first", 0, 400))  # holds the only seat
                deadline = time.monotonic() + 30
                while not engine.engine.has_unfinished_requests():
                    assert not first.done() and time.monotonic() < deadline, "the first request never ran"
                    await asyncio.sleep(0.01)
                low = asyncio.create_task(send("low", 5, 4))
                await asyncio.sleep(0.2)
                high = asyncio.create_task(send("high", -5, 4))
                await asyncio.gather(first, low, high)
            return finished

        assert asyncio.run(run()) == ["first", "high", "low"]
        response = httpx.post(url + "/v1/completions", json={**body(0, 4), "length_hint": 0}, timeout=60)
        assert response.status_code == 400 and "length_hint" in response.json()["error"]["message"]
