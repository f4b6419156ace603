"""SSE keep-alive: while a stream waits for its next token, the server sends comment lines, which clients skip."""

import json

import httpx
import openai
import pytest

from foreseer import LLM, SamplingParams
from foreseer.engine.faults import Fault, FaultInjector
from foreseer.server.config import ServerConfig
from tests.helpers import running_server

PROMPT = "the quick brown fox"
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def slow_server(tiny_llama):
    """A server with a 0.1 s keep-alive whose every engine step takes 0.3 s longer."""
    with running_server(tiny_llama, kv_cache_gib=0.01, sse_keepalive_s=0.1) as (url, engine):
        FaultInjector(engine.engine, [Fault("hang", seconds=0.3, times=None)]).install()  # while idle
        yield url


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return LLM(tiny_llama, kv_cache_gib=0.01)


def test_a_slow_stream_gets_keepalives_and_the_same_text(slow_server, tiny_llama, llm):
    body = {"model": tiny_llama, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{slow_server}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    keepalives = [line for line in lines if line.startswith(":")]
    assert keepalives and set(keepalives) == {": keep-alive"}
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and len(keepalives) + len(data) == len(lines)
    text = "".join(json.loads(chunk)["choices"][0]["text"] for chunk in data[:-1])
    expected = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)[0]
    assert text == expected.outputs[0].text


def test_openai_client_reads_a_stream_with_keepalives(slow_server, tiny_llama, llm):
    client = openai.OpenAI(base_url=f"{slow_server}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "hello"}]
    stream = client.chat.completions.create(model=tiny_llama, messages=messages, max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    expected = llm.chat(messages, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)[0]
    assert text == expected.outputs[0].text


def test_keepalive_interval_must_not_be_negative():
    with pytest.raises(ValueError, match="sse_keepalive_s"):
        ServerConfig(sse_keepalive_s=-1.0)
