"""Reliability (issue 24): the server fuzzed from its own OpenAPI schema, the engine API under random good and bad
requests (Hypothesis), an overload burst, a disconnect storm over adapters, a short soak, the server's limits, and
engine faults and hangs seen through HTTP. The harness is `foreseer bench reliability`'s, at small sizes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import time

import httpx
import pytest
import torch
from helpers import hf_greedy, make_adapter, metrics, running_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from foreseer import LLM, SamplingParams
from foreseer.bench import reliability
from foreseer.config import EngineConfig
from foreseer.engine.async_engine import AsyncLLMEngine
from foreseer.engine.engine import LLMEngine
from foreseer.engine.faults import Fault, FaultInjector

TINY_ENGINE = {"kv_cache_gib": 0.01}
GREEDY = {"temperature": 0, "ignore_eos": True}


def _served_model(url: str) -> str:
    return httpx.get(url + "/v1/models").json()["data"][0]["id"]


def _idle(engine) -> bool:
    blocks = engine.engine.block_manager
    return not engine.engine.has_unfinished_requests() and blocks.num_free_blocks == blocks.num_blocks


def _wait(condition, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def offline(tiny_llama) -> LLM:
    return LLM(tiny_llama, **TINY_ENGINE)


# -- the schema fuzzed --------------------------------------------------------------------------------------------
def test_fuzzing_the_openapi_schema_gives_no_5xx_and_only_openai_errors(tiny_llama, offline):
    with running_server(tiny_llama, max_num_seqs=8, **TINY_ENGINE) as (url, engine):
        model = _served_model(url)
        report = reliability.fuzz(url, model, count=400, seed=3, good_every=40, workers=2)
        good = httpx.post(url + "/v1/completions", json={"model": model, "prompt": reliability.GOOD_PROMPT,
                                                         "max_tokens": 12, "temperature": 0}).json()
        assert _wait(lambda: _idle(engine))
    assert (report["sent"], report["5xx"], report["dropped"], report["malformed_errors"]) == (400, 0, 0, 0), \
        report["failures"]
    assert report["good_sent"] == report["good_exact"] == 10
    # Every operation was tried, and the generation endpoints both served and refused.
    tried = {key.rsplit(" ", 2)[0] for key in report["by_status"]}
    assert tried == {"POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models", "GET /health",
                     "GET /metrics", "POST /v1/load_lora_adapter", "POST /v1/unload_lora_adapter", "POST /tokenize",
                     "POST /detokenize", "GET /version"}
    for path in ("/v1/completions", "/v1/chat/completions"):
        statuses = {int(key.rsplit(" ", 1)[1]) for key in report["by_status"] if f" {path} " in key}
        assert 200 in statuses and statuses & {400, 404}, (path, statuses)
    reference = offline.generate([reliability.GOOD_PROMPT], SamplingParams(max_tokens=12, temperature=0),
                                 use_tqdm=False)[0]
    assert good["choices"][0]["text"] == reference.outputs[0].text


# -- the engine API under random requests -------------------------------------------------------------------------
VOCAB = 400  # the tiny models' tokenizer (conftest)
CONTEXT = 512

good_prompts = st.one_of(st.lists(st.integers(5, VOCAB - 1), min_size=1, max_size=24),
                         st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), min_size=1, max_size=40))
# Legal values the sampler once choked on: they must sample as the greedy request does.
greedy_params = st.fixed_dictionaries({
    "max_tokens": st.integers(1, 6), "temperature": st.sampled_from([0, 0.0, 1e-320, 1e-6])}, optional={
    "top_k": st.sampled_from([0, -1, 1, 2**64]),
    "top_p": st.sampled_from([1.0, 1e-50]), "min_p": st.sampled_from([0.0, 1.0]), "logprobs": st.integers(0, 5)})
sampled_params = st.fixed_dictionaries({
    "max_tokens": st.integers(1, 6), "temperature": st.floats(0.3, 2.0), "seed": st.integers(-(2**63), 2**63 - 1)},
    optional={"top_k": st.integers(0, 50), "top_p": st.floats(0.05, 1.0), "min_p": st.floats(0.0, 0.2),
              "n": st.integers(1, 3)})
# (prompt, sampling keywords, what the error must name)
bad_requests = st.one_of(
    st.tuples(st.lists(st.integers(5, VOCAB - 1), max_size=3).flatmap(
        lambda ids: st.sampled_from([ids + [VOCAB], ids + [-1], ids + [True], ids + [2**70]])),
        st.just({}), st.just("token ids")),
    st.tuples(st.sampled_from(["", [], None, b"hi", 3.5]), st.just({}), st.just("prompt")),
    st.tuples(st.just("Hi \ud800 there"), st.just({}), st.just("lone surrogate")),
    st.tuples(st.integers(CONTEXT, CONTEXT + 50).map(lambda n: [7] * n), st.just({}), st.just("context")),
    st.tuples(st.just([5, 6]), st.integers(CONTEXT - 1, 2**70).map(lambda n: {"max_tokens": n}),
              st.just("max_tokens")),
    *(st.tuples(st.just([5, 6]), values.map(lambda v, name=name: {name: v}), st.just(name)) for name, values in {
        "temperature": st.one_of(st.floats(max_value=-1e-9), st.just(float("nan")), st.just(float("inf")),
                                 st.just(2**1100), st.just("hot")),
        "top_p": st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0001), st.just(float("nan"))),
        "top_k": st.one_of(st.integers(max_value=-2), st.just(2.5)),
        "min_p": st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.0001)),
        "n": st.one_of(st.integers(max_value=0), st.just(True)),
        "seed": st.one_of(st.integers(min_value=2**63), st.integers(max_value=-(2**63) - 1), st.just(1.5)),
        "max_tokens": st.one_of(st.integers(max_value=0), st.just(2.0)),
        "logprobs": st.one_of(st.integers(max_value=-1), st.integers(VOCAB + 1, 10**9)),
        "stop": st.one_of(st.just(""), st.just([""]), st.just(5), st.just(["ok", None])),
        "stop_token_ids": st.one_of(st.just(5), st.just([-1]), st.just([1.5])),
    }.items()),
)
requests = st.lists(st.one_of(st.tuples(st.just("greedy"), good_prompts, greedy_params),
                              st.tuples(st.just("sampled"), good_prompts, sampled_params),
                              st.tuples(st.just("bad"), bad_requests, st.just(None))), min_size=1, max_size=8)


@pytest.fixture(scope="module")
def api_engine(tiny_llama) -> LLMEngine:
    return LLMEngine(EngineConfig.from_kwargs(tiny_llama, max_num_seqs=4, max_num_batched_tokens=48,
                                              **TINY_ENGINE))


@pytest.fixture(scope="module")
def hf_tiny(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)


def _run(engine: LLMEngine, submitted: dict) -> dict:
    finals = {}
    while engine.has_unfinished_requests():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    assert set(finals) == set(submitted)
    return finals


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(batch=requests)
def test_the_engine_api_refuses_each_bad_request_by_name_and_answers_the_good_ones_exactly(api_engine, hf_tiny,
                                                                                        batch):
    """Random good and bad requests in one batch: each bad one raises ValueError naming its problem, at
    SamplingParams or add_request, and leaves nothing behind; the greedy ones equal transformers' greedy
    continuations, and the seeded sampled ones what they give alone."""
    engine = api_engine
    submitted = {}
    for index, (kind, prompt, params) in enumerate(batch):
        request_id = f"q{index}"
        if kind == "bad":
            prompt, keywords, named = prompt
            with pytest.raises(ValueError, match=named):
                engine.add_request(request_id, prompt, SamplingParams(**{"max_tokens": 4, **keywords}))
            assert request_id not in engine.parents
            continue
        engine.add_request(request_id, prompt, SamplingParams(**params, ignore_eos=True))
        submitted[request_id] = (kind, prompt, params)
    finals = _run(engine, submitted)
    for request_id, (kind, prompt, params) in submitted.items():
        output = finals[request_id]
        assert output.error is None
        token_ids = [c.token_ids for c in output.outputs]
        if kind == "greedy":
            ids = prompt if isinstance(prompt, list) else engine.tokenizer.encode(prompt)
            assert token_ids == hf_greedy(hf_tiny, [ids], params["max_tokens"]), (prompt, params)
        else:
            engine.add_request("alone", prompt, SamplingParams(**params, ignore_eos=True))
            alone = _run(engine, {"alone": None})["alone"]
            assert token_ids == [c.token_ids for c in alone.outputs], (prompt, params)
    blocks = engine.block_manager
    assert blocks.num_free_blocks == blocks.num_blocks and not engine.parents


# -- overload, disconnects, soak ------------------------------------------------------------------------------
def test_an_overload_burst_far_past_the_queue_gets_only_exact_completions_and_503s(tiny_llama):
    with running_server(tiny_llama, max_waiting_requests=3, max_num_seqs=2, **TINY_ENGINE) as (url, engine):
        report = reliability.overload(url, _served_model(url), count=120)
        assert _wait(lambda: _idle(engine))
    assert report["lost"] == report["changed"] == 0
    assert report["completed"] + report["refused_503_retry_after"] == 120
    assert report["completed"] >= 3 and report["refused_503_retry_after"] >= 60


def test_a_disconnect_storm_returns_kv_blocks_and_adapter_slots_to_idle(tiny_llama, tmp_path):
    adapters = {name: make_adapter(tiny_llama, str(tmp_path / name), seed=seed, r=4, lora_alpha=8,
                                   target_modules=["q_proj", "v_proj"]) for name, seed in (("a", 1), ("b", 2))}
    with running_server(tiny_llama, lora_modules=adapters, enable_lora=True, max_loras=2, max_num_seqs=6,
                        **TINY_ENGINE) as (url, engine):
        models = [entry["id"] for entry in httpx.get(url + "/v1/models").json()["data"]]
        assert len(models) == 3
        report = reliability.disconnects(url, models, count=60, seed=5, concurrency=6)
        manager = engine.engine.lora
        assert _wait(lambda: _idle(engine))
        assert manager.num_obtainable_slots() == 2
        assert all(manager.num_running(i) == 0 for i in manager.loaded_ids) and len(manager.loaded_ids) == 2
        exported = metrics(url)
    assert report["left_early"] > 30 and report["requests_left"] == report["leaked_blocks"] == 0
    assert exported[("foreseer_kv_cache_used_blocks", ())] == 0


def test_a_short_soak_loses_nothing_and_memory_stays_flat(tiny_llama):
    with running_server(tiny_llama, max_waiting_requests=64, max_num_seqs=8, **TINY_ENGINE) as (url, engine):
        report = reliability.soak(url, _served_model(url), seconds=20, rate=10, pid=os.getpid(), seed=2)
        assert _wait(lambda: _idle(engine))
    assert report["good_sent"] > 100 and report["good_completed"] == report["good_sent"]
    assert report["lost"] == report["bad_not_400"] == 0
    assert report["by_kind"].get("abandon_200", 0) > 0
    assert report["rss_growth_mb"] < reliability.MAX_RSS_GROWTH_MB


def test_a_server_makes_its_kv_pool_resident_at_start_and_cached_prefixes_survive(tiny_llama):
    """A CPU pool's pages become resident as blocks are first used, which looks like a leak in a long-running
    server: the server reserves them at start, writing every value back unchanged."""
    import psutil

    engine = LLMEngine(EngineConfig.from_kwargs(tiny_llama, kv_cache_gib=0.125))
    prompt = list(range(5, 69))  # 4 full blocks of 16, cached after the first run
    params = SamplingParams(max_tokens=8, **GREEDY)
    engine.add_request("first", prompt, params)
    first = _run(engine, {"first": None})["first"].outputs[0].token_ids
    process = psutil.Process()
    before = process.memory_info().rss
    server_engine = AsyncLLMEngine(engine)
    server_engine.start()
    grown = process.memory_info().rss - before
    asyncio.run(server_engine.stop())
    assert grown > 0.9 * 0.125 * 2**30
    engine.add_request("again", prompt, params)
    again = _run(engine, {"again": None})["again"]
    assert again.metrics.num_cached_tokens == 48 and again.outputs[0].token_ids == first  # 3 blocks cached


# -- limits -----------------------------------------------------------------------------------------------------
def test_each_limit_is_a_4xx_that_names_its_flag(tiny_llama):
    limits = {"max_header_count": 20, "max_header_bytes": 2000, "max_prompts": 3, "max_messages": 4, "max_n": 2,
              "max_logprobs": 3}
    with running_server(tiny_llama, **limits, **TINY_ENGINE) as (url, engine):
        model = _served_model(url)
        completion = {"model": model, "prompt": "hi", "max_tokens": 2}
        chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        cases = [
            ({**completion, "prompt": ["a", "b", "c", "d"]}, "/v1/completions", {}, 400, "prompt", "--max-prompts"),
            ({**chat, "messages": chat["messages"] * 5}, "/v1/chat/completions", {}, 400, "messages",
             "--max-messages"),
            ({**completion, "n": 3}, "/v1/completions", {}, 400, "n", "--max-n"),
            ({**completion, "logprobs": 4}, "/v1/completions", {}, 400, "logprobs", "--max-logprobs"),
            ({**chat, "logprobs": True, "top_logprobs": 4}, "/v1/chat/completions", {}, 400, "top_logprobs",
             "--max-logprobs"),
            (completion, "/v1/completions", {f"x-h{i}": "v" for i in range(25)}, 431, None, "--max-header-count"),
            (completion, "/v1/completions", {"x-big": "v" * 3000}, 431, None, "--max-header-bytes"),
        ]
        for body, path, headers, status, param, flag in cases:
            response = httpx.post(url + path, json=body, headers=headers)
            error = response.json()["error"]
            assert (response.status_code, error["param"]) == (status, param), (body, error)
            assert flag in error["message"], error
            assert error["code"] in ("limit_exceeded", "headers_too_large")
        at_limits = {**completion, "prompt": ["a", "b", "c"], "n": 2, "logprobs": 3}
        assert httpx.post(url + "/v1/completions", json=at_limits).status_code == 200
        assert _wait(lambda: _idle(engine))


def test_a_request_past_its_time_limit_gets_408_and_is_aborted(tiny_llama):
    with running_server(tiny_llama, request_timeout_s=0.3, **TINY_ENGINE) as (url, engine):
        model = _served_model(url)
        hold = Fault("hang", seconds=0.05, times=None)  # every step: 480 tokens take 24 s
        injector = FaultInjector(engine.engine, [hold])
        injector.install()  # the engine is idle: its thread waits for commands
        try:
            body = {"model": model, "prompt": "the quick brown fox", "max_tokens": 480, **GREEDY}
            response = httpx.post(url + "/v1/completions", json=body, timeout=30)
            assert response.status_code == 408 and response.json()["error"]["code"] == "request_timeout"
            assert "--request-timeout-s" in response.json()["error"]["message"]
            with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=30) as stream:
                events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
            assert json.loads(events[-2])["error"]["code"] == "request_timeout" and events[-1] == "[DONE]"
            assert _wait(lambda: _idle(engine))
        finally:
            injector.remove()
        short = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 3}, timeout=30)
        assert short.status_code == 200


# -- faults and hangs seen through HTTP ---------------------------------------------------------------------------
def test_a_fault_in_one_requests_sampling_fails_it_alone_and_health_reports_degraded(tiny_llama, offline):
    with running_server(tiny_llama, **TINY_ENGINE) as (url, engine):
        model = _served_model(url)
        assert httpx.get(url + "/health").json()["status"] == "ok"
        injector = FaultInjector(engine.engine, [Fault("sampling", request_id="cmpl-doomed", times=None)])
        injector.install()  # the engine is idle: its thread waits for commands
        prompts = ["the quick brown fox", "hello world", "a paged cache"]
        body = {"max_tokens": 24, **GREEDY, "model": model}

        async def run():
            async with httpx.AsyncClient(timeout=60) as client:
                doomed = client.post(url + "/v1/completions", json={**body, "prompt": "doomed"},
                                     headers={"X-Request-Id": "doomed"})
                others = [client.post(url + "/v1/completions", json={**body, "prompt": p}) for p in prompts]
                return await asyncio.gather(doomed, *others)

        try:
            doomed, *others = asyncio.run(run())
        finally:
            injector.remove()
        error = doomed.json()["error"]
        assert doomed.status_code == 500 and error["code"] == "request_failed" and "InjectedFault" in error["message"]
        expected = offline.generate(prompts, SamplingParams(max_tokens=24, **GREEDY), use_tqdm=False)
        assert [r.json()["choices"][0]["text"] for r in others] == [e.outputs[0].text for e in expected]
        health = httpx.get(url + "/health")
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert health.json()["faults"] >= 1 and "cmpl-doomed#0" in health.json()["last_fault"]
        assert _wait(lambda: _idle(engine))


def test_a_hung_step_turns_health_to_503_hung_until_it_ends(tiny_llama):
    with running_server(tiny_llama, step_timeout_s=0.3, **TINY_ENGINE) as (url, engine):
        model = _served_model(url)
        injector = FaultInjector(engine.engine, [Fault("hang", seconds=2.0)])
        injector.install()  # the engine is idle: its thread waits for commands
        try:
            body = {"model": model, "prompt": "hello", "max_tokens": 3, **GREEDY}
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                pending = pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=30)
                assert _wait(lambda: httpx.get(url + "/health").status_code == 503, timeout_s=5)
                hung = httpx.get(url + "/health").json()
                assert hung["status"] == "hung" and hung["step_seconds"] > 0.3
                assert pending.result(timeout=30).status_code == 200
            assert httpx.get(url + "/health").json()["status"] == "ok"
        finally:
            injector.remove()
