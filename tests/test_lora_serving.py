"""Multi-LoRA serving: adapter tiers (device slots, host cache, disk) with LRU eviction and prefetch, admission
within the slots and fairness across adapters, unified memory with the KV cache, and the server's LoRA API."""

from __future__ import annotations

import argparse
import os
import shutil
import threading
import time

import httpx
import pytest
from helpers import make_adapter, metrics, random_prompts, running_server

from foreseer import LLM, LoRARequest, SamplingParams
from foreseer.cli import lora_module
from foreseer.cli import main as cli_main
from foreseer.config import EngineConfig, LoRAConfig
from foreseer.core.request import RequestStatus
from foreseer.engine.async_engine import AsyncLLMEngine
from foreseer.engine.engine import LLMEngine
from foreseer.server import create_app

PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
TINY = {"kv_cache_gib": 0.01}


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory) -> dict[str, LoRARequest]:
    root = tmp_path_factory.mktemp("serving_adapters")
    specs = {
        "a": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
        "b": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "o_proj"]),
        "c": dict(r=8, lora_alpha=8, target_modules=["gate_proj", "up_proj"]),
        "d": dict(r=4, lora_alpha=16, target_modules=["v_proj", "o_proj", "down_proj"]),
    }
    return {name: LoRARequest(name, i + 1, make_adapter(tiny_llama, str(root / name), seed=10 + i, **spec))
            for i, (name, spec) in enumerate(specs.items())}


@pytest.fixture(scope="module")
def reference(tiny_llama) -> LLM:
    """Runs each request alone."""
    return LLM(tiny_llama, **TINY, enable_lora=True)


def _alone(llm: LLM, prompts: list, loras: list, params: SamplingParams = PARAMS) -> list[list[int]]:
    return [llm.generate([p], params, use_tqdm=False, lora_request=lora)[0].outputs[0].token_ids
            for p, lora in zip(prompts, loras)]


def _texts(llm: LLM, prompt: str, loras: list) -> list[str]:
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    return [llm.generate([prompt], params, use_tqdm=False, lora_request=lora)[0].outputs[0].text for lora in loras]


def _ids(*loras: LoRARequest) -> list[int]:
    return [lora.lora_int_id for lora in loras]


# -- tiers --------------------------------------------------------------------------------------------------


def test_lru_at_host_and_device_tiers(tiny_llama, adapters):
    llm = LLM(tiny_llama, **TINY, enable_lora=True, max_loras=2, max_cpu_loras=3)
    manager = llm.engine.lora
    a, b, c, d = (adapters[n] for n in "abcd")
    for lora in (a, b, c):
        manager.load_to_host(lora)  # host only: no slot taken
    assert (manager.host_ids, manager.loaded_ids) == (_ids(a, b, c), [])
    manager.load_to_host(a)  # used: most recent
    manager.load_to_host(d)  # the host cache holds 3: B, least recently used, goes
    assert manager.host_ids == _ids(c, a, d)
    assert manager.stats().host_evictions == 1

    manager.load(c)
    manager.load(a)
    assert manager.loaded_ids == _ids(c, a)
    manager.load(d)  # both slots taken: C, least recently used and idle, gives its slot up (stays in host)
    assert manager.loaded_ids == _ids(a, d) and manager.host_ids == _ids(c, a, d)
    manager.load(b)  # from disk; the host cache evicts C (A and D are in slots: they stay), A leaves its slot
    assert manager.loaded_ids == _ids(d, b) and manager.host_ids == _ids(a, d, b)
    stats = manager.stats()
    sizes = {lora.lora_int_id: manager.load_to_host(lora).num_bytes for lora in (a, d, b)}
    assert (stats.device_adapters, stats.host_adapters) == (2, 3)
    assert stats.device_bytes == sizes[d.lora_int_id] + sizes[b.lora_int_id]
    assert stats.host_bytes == sum(sizes.values())

    # A slot whose adapter a running request uses is never taken.
    engine = llm.engine
    engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=20, ignore_eos=True), lora_request=d)
    engine.step()
    assert engine.scheduler.running and manager.num_running(d.lora_int_id) == 1
    for lora in (a, c, a):
        assert manager.activate(lora)
        assert d.lora_int_id in manager.loaded_ids
    assert manager.loaded_ids == _ids(d, a)
    manager.pin(a.lora_int_id)  # every slot busy now: no room
    assert not manager.activate(c)
    manager.unpin(a.lora_int_id)
    engine.abort_request("r")  # D is idle now (and was used last)
    assert manager.num_running(d.lora_int_id) == 0
    assert manager.activate(c) and manager.loaded_ids == _ids(d, c)
    assert manager.activate(b) and manager.loaded_ids == _ids(c, b)


def test_waiting_requests_adapters_are_prefetched(tiny_llama, adapters, reference):
    llm = LLM(tiny_llama, **TINY, enable_lora=True, max_loras=1, max_cpu_loras=2, max_num_seqs=1)
    engine, manager = llm.engine, llm.engine.lora
    a, b, c, d = (adapters[n] for n in "abcd")
    for lora in (a, b, c, d):
        manager.load_to_host(lora)  # read once (checked); A and B are evicted from the host cache again
    assert manager.host_ids == _ids(c, d)
    reads = []
    read = manager._read

    def recording_read(lora_request):
        reads.append((lora_request.lora_name, threading.current_thread().name))
        return read(lora_request)

    manager._read = recording_read
    prompts = random_prompts(engine.model_config.vocab_size, [6, 9])
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    engine.add_request("first", prompts[0], params, lora_request=a)
    engine.add_request("second", prompts[1], params, lora_request=b)
    assert reads == []  # both were checked before: queueing them reads nothing
    outputs = {o.request_id: o for o in engine.step()}
    manager.finish_loads()
    second = engine.parents["second"].sequences[0].request
    assert second.status == RequestStatus.WAITING  # one seat: it waits behind the first
    # Both were read in the background at the step's start; B is in the host cache before its admission.
    assert sorted(reads) == [("a", "foreseer-lora-load_0"), ("b", "foreseer-lora-load_0")]
    assert b.lora_int_id in manager.host_ids and b.lora_int_id not in manager.loaded_ids
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o) for o in engine.step())
    assert len(reads) == 2  # B's admission read nothing more
    stats = manager.stats()
    # The first 4 reads were waited for; of A's and B's, B's was not (A's maybe, if it was not done in time).
    assert stats.prefetch_loads >= 1 and stats.prefetch_loads + stats.sync_loads == 4 + 2
    expected = _alone(reference, prompts, [a, b], params)
    assert [outputs[i].outputs[0].token_ids for i in ("first", "second")] == expected


# -- slots and fairness -------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora_memory", ["separate", "unified"])
def test_slots_limit_the_adapters_in_a_batch(tiny_llama, adapters, reference, lora_memory):
    """Four adapters (and the base model) requested at once, two slots: no step runs more than two adapters,
    and every request's output equals running it alone."""
    llm = LLM(tiny_llama, **TINY, block_size=4, max_num_batched_tokens=32, enable_lora=True, max_loras=2,
              lora_memory=lora_memory)
    engine = llm.engine
    per_step: list[set[int]] = []
    execute = engine.runner.execute

    def recording_execute(sched):
        per_step.append({s.request.lora_request.lora_int_id for s in sched.scheduled if s.request.lora_request})
        return execute(sched)

    engine.runner.execute = recording_execute
    loras = [adapters["a"], adapters["b"], None, adapters["c"], adapters["d"], adapters["a"], adapters["c"],
             adapters["b"], None, adapters["d"]]
    prompts = random_prompts(engine.model_config.vocab_size, [5, 17, 9, 30, 3, 12, 21, 7, 14, 26], seed=4)
    outputs = llm.generate(prompts, PARAMS, use_tqdm=False, lora_request=loras)
    assert max(len(s) for s in per_step) == 2
    assert len(set().union(*per_step)) == 4
    assert [o.outputs[0].token_ids for o in outputs] == _alone(reference, prompts, loras)
    stats = engine.lora_stats()
    assert stats.device_adapters <= 2 and stats.device_evictions >= 2
    if lora_memory == "unified":
        blocks = engine.block_manager
        assert stats.device_pages > 0 and blocks.num_free_blocks == blocks.num_blocks - stats.device_pages


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _run_with_a_stream_of(engine: LLMEngine, clock: _Clock, stream: LoRARequest, steps: int) -> dict:
    """Each step (a second), keep a request of `stream`'s adapter queued: on two seats, its 4-token requests
    start a step apart, so they end a step apart and its slot never idles. Returns final outputs by request id."""
    finished = {}
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    for _ in range(steps):
        if not any(r.lora_request == stream for r in engine.scheduler.waiting):
            engine.add_request(f"{stream.lora_name}{clock.now}", [5, 6, 7, 8], params, arrival_time=clock.now,
                               lora_request=stream)
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
        clock.now += 1.0
    return finished


@pytest.mark.parametrize("max_wait_s", [5.0, 1e9], ids=["bounded", "unbounded"])
def test_no_adapter_starves_behind_a_busy_slot(tiny_llama, adapters, max_wait_s):
    """One slot, kept busy by a stream of adapter A's requests that are admitted as soon as seats free: adapter
    B's request gets the slot once it has waited max_wait_s (A's slot is drained for it). Without the bound
    (the control) it would starve."""
    llm = LLM(tiny_llama, **TINY, enable_lora=True, max_loras=1, max_num_seqs=2, max_wait_s=max_wait_s)
    engine, clock = llm.engine, _Clock()
    engine.scheduler.clock = clock
    a, b = adapters["a"], adapters["b"]
    _run_with_a_stream_of(engine, clock, a, 2)  # A holds the slot
    engine.add_request("starving", [9, 10, 11], SamplingParams(max_tokens=3, ignore_eos=True),
                       arrival_time=clock.now, lora_request=b)
    arrival = clock.now
    finished = _run_with_a_stream_of(engine, clock, a, 30)
    if max_wait_s > 100:
        request = engine.parents["starving"].sequences[0].request
        assert request.metrics.first_scheduled_time is None  # starved for 30 s
        return
    waited = finished["starving"].metrics.first_scheduled_time - arrival
    # It waited out the bound, then for A's running requests (4 tokens each) to finish: no longer.
    assert max_wait_s < waited <= max_wait_s + 6
    assert sum(1 for o in finished.values() if o.finished) > 10  # A's stream went on around B's turn
    after = [o for o in finished.values() if o.metrics.first_scheduled_time > arrival + waited]
    assert any(o.request_id != "starving" for o in after)


def test_longest_waiting_adapter_gets_the_next_slot(tiny_llama, adapters):
    """Under the priority policy B's request ranks first, but C's has waited longer: the freed slot goes to C."""
    llm = LLM(tiny_llama, **TINY, enable_lora=True, max_loras=1, scheduling_policy="priority")
    engine, clock = llm.engine, _Clock()
    engine.scheduler.clock = clock
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    engine.add_request("a", [5, 6, 7], params, arrival_time=clock.now, lora_request=adapters["a"])
    engine.step()
    engine.add_request("c", [5, 6, 7], params, arrival_time=clock.now + 1, priority=1, lora_request=adapters["c"])
    engine.add_request("b", [5, 6, 7], params, arrival_time=clock.now + 2, priority=0, lora_request=adapters["b"])
    order = []
    while engine.has_unfinished_requests():
        clock.now += 1
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["a", "c", "b"]


# -- unified memory -----------------------------------------------------------------------------------------


def test_unified_memory_shares_the_kv_pool(tiny_llama, adapters):
    kv_bytes = 2 * 2 * 16 * 2 * 16 * 4  # K and V, 2 layers, 16 tokens a block, 2 KV heads of 16, float32
    llm = LLM(tiny_llama, kv_cache_gib=32 * kv_bytes / 2**30, enable_lora=True, max_loras=2, lora_memory="unified")
    engine, manager, blocks = llm.engine, llm.engine.lora, llm.engine.block_manager
    assert (blocks.num_blocks, engine.runner.kv_bytes_per_block()) == (32, kv_bytes)  # 512 tokens: the context
    a, c = adapters["a"], adapters["c"]
    pages = {n: -(-manager.load_to_host(adapters[n]).num_bytes // kv_bytes) for n in "ac"}
    assert pages == {"a": 4, "c": 3}
    assert blocks.num_free_blocks == 32  # the host cache takes no KV blocks
    manager.load(a)
    assert blocks.num_free_blocks == 32 - 4 and manager.stats().device_pages == 4
    manager.load(c)
    assert blocks.num_free_blocks == 32 - 7 and blocks.num_reserved_blocks == 7
    assert manager.unload(c.lora_int_id)
    assert blocks.num_free_blocks == 32 - 4

    # KV pressure takes idle adapters' pages before preempting anything: a base request needing every block.
    manager.load(c)
    tokens = random_prompts(engine.model_config.vocab_size, [300])[0]
    whole_pool = SamplingParams(max_tokens=512 - 300, ignore_eos=True)
    output = llm.generate([tokens], whole_pool, use_tqdm=False)[0]
    assert output.error is None and len(output.outputs[0].token_ids) == 212
    assert output.metrics.num_preemptions == 0
    assert manager.loaded_ids == [] and manager.stats().device_evictions == 3  # C's unload, then A and C
    assert blocks.num_free_blocks == 32
    # An adapter's pages count against a request's room in the pool.
    with pytest.raises(ValueError, match="beside its LoRA adapter's 4 blocks"):
        engine.add_request("too-long", tokens, whole_pool, lora_request=a)


# -- failures -----------------------------------------------------------------------------------------------


def test_adapter_gone_from_disk_fails_its_requests_only(tiny_llama, adapters, reference, tmp_path):
    llm = LLM(tiny_llama, **TINY, enable_lora=True, max_loras=1, max_cpu_loras=1)
    engine, manager = llm.engine, llm.engine.lora
    path = shutil.copytree(adapters["a"].lora_path, tmp_path / "doomed")
    doomed = LoRARequest("doomed", 50, str(path))
    manager.load_to_host(doomed)
    manager.load_to_host(adapters["b"])  # evicts it from the host cache
    shutil.rmtree(path)
    prompts = random_prompts(engine.model_config.vocab_size, [4, 6], seed=9)
    engine.add_request("doomed", prompts[0], PARAMS, lora_request=doomed)  # checked before: accepted
    engine.add_request("fine", prompts[1], PARAMS, lora_request=adapters["b"])
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o) for o in engine.step())
    assert "does not exist" in outputs["doomed"].error
    assert outputs["doomed"].outputs[0].finish_reason == "error"
    assert outputs["fine"].error is None
    assert outputs["fine"].outputs[0].token_ids == _alone(reference, [prompts[1]], [adapters["b"]])[0]


def test_lora_config_validation():
    assert LoRAConfig().max_cpu_loras == 16 and LoRAConfig(max_loras=20).max_cpu_loras == 20
    with pytest.raises(ValueError, match="max_cpu_loras must be an integer >= max_loras"):
        LoRAConfig(max_loras=4, max_cpu_loras=2)
    with pytest.raises(ValueError, match="lora_memory must be 'separate' or 'unified'"):
        LoRAConfig(lora_memory="shared")


# -- the server ---------------------------------------------------------------------------------------------


def test_server_serves_adapters_by_name(tiny_llama, adapters, reference, tmp_path):
    modules = {"sql": adapters["a"].lora_path, "chat": adapters["b"].lora_path}
    with running_server(tiny_llama, lora_modules=modules, **TINY, enable_lora=True, max_loras=2) as (url, engine):
        cards = httpx.get(url + "/v1/models").json()["data"]
        assert [(m["id"], m.get("parent"), m["root"]) for m in cards] == [
            (tiny_llama, None, tiny_llama), ("sql", tiny_llama, modules["sql"]), ("chat", tiny_llama, modules["chat"])]

        body = {"prompt": "the quick brown fox", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        expected = _texts(reference, body["prompt"], [None, adapters["a"], adapters["b"]])
        assert len(set(expected)) == 3
        for model, text in zip((tiny_llama, "sql", "chat"), expected):
            response = httpx.post(url + "/v1/completions", json={**body, "model": model}).json()
            assert (response["model"], response["choices"][0]["text"]) == (model, text)

        unknown = httpx.post(url + "/v1/completions", json={**body, "model": "nope"})
        assert unknown.status_code == 404
        error = unknown.json()["error"]
        assert (error["code"], error["type"], error["param"]) == ("model_not_found", "invalid_request_error", "model")
        assert "`sql`" in error["message"]

        # Loading at run time: bad ones are refused with what is wrong, and the engine keeps serving.
        bad = tmp_path / "bad"
        os.makedirs(bad)
        (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 64, "target_modules": ["q_proj"]}')
        for payload, message in (({"lora_name": "x", "lora_path": str(tmp_path / "missing")}, "does not exist"),
                                 ({"lora_name": "x", "lora_path": str(bad)}, "rank 64, above max_lora_rank 16"),
                                 ({"lora_name": "sql", "lora_path": modules["sql"]}, "already been loaded"),
                                 ({"lora_name": "x"}, "lora_path")):
            response = httpx.post(url + "/v1/load_lora_adapter", json=payload)
            assert response.status_code == 400 and message in response.json()["error"]["message"], response.text
        response = httpx.post(url + "/v1/load_lora_adapter",
                              json={"lora_name": "new", "lora_path": adapters["c"].lora_path})
        assert response.status_code == 200 and "added successfully" in response.text
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]][-1] == "new"
        response = httpx.post(url + "/v1/completions", json={**body, "model": "new"}).json()
        assert response["choices"][0]["text"] == _texts(reference, body["prompt"], [adapters["c"]])[0]

        # Unloading: unknown 404, in use 409 (the request keeps it), then done.
        assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "nope"}).status_code == 404
        long = {**body, "model": "new", "max_tokens": 400, "stream": True}
        runner = engine.engine.runner
        execute = runner.execute
        runner.execute = lambda sched: time.sleep(0.02) or execute(sched)  # 400 tokens take 8 s now
        try:
            with httpx.stream("POST", url + "/v1/completions", json=long, timeout=60) as stream:
                lines = stream.iter_lines()  # kept: a dropped iterator closes the connection (an abort)
                next(lines)  # accepted and generating
                response = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "new"})
                assert response.status_code == 409 and response.json()["error"]["code"] == "lora_in_use"
        finally:
            runner.execute = execute
        deadline = time.monotonic() + 30  # the closed stream's request is aborted
        while engine.stats.num_running and time.monotonic() < deadline:
            time.sleep(0.02)
        response = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "new"})
        assert response.status_code == 200 and "removed successfully" in response.text
        assert "new" not in [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        assert httpx.post(url + "/v1/completions", json={**body, "model": "new"}).status_code == 404
        assert httpx.get(url + "/health").status_code == 200

        samples = metrics(url)
        assert samples[("foreseer_lora_adapters", (("tier", "device"),))] <= 2
        assert samples[("foreseer_lora_adapter_capacity", (("tier", "host"),))] == 16
        assert samples[("foreseer_lora_loads_total", (("mode", "prefetch"),))] >= 0


def test_server_without_lora(tiny_llama, adapters):
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        create_app(AsyncLLMEngine(LLMEngine(EngineConfig.from_kwargs(tiny_llama, **TINY))),
                   lora_modules={"a": adapters["a"].lora_path})
    with pytest.raises(ValueError, match="does not exist"):
        create_app(AsyncLLMEngine(LLMEngine(EngineConfig.from_kwargs(tiny_llama, **TINY, enable_lora=True))),
                   lora_modules={"a": "/no/such/adapter"})
    with running_server(tiny_llama, **TINY) as (url, _):
        response = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/x"})
        assert response.status_code == 400 and response.json()["error"]["code"] == "lora_not_enabled"


def test_lora_modules_parsing(capsys):
    assert lora_module("sql=/adapters/sql") == ("sql", "/adapters/sql")
    assert lora_module('{"name": "sql", "path": "/a/b", "base_model_name": "m"}') == ("sql", "/a/b")
    for value, message in (("sql", "expected name=path"), ("=/a", "must be non-empty"), ("sql=", "must be non-empty"),
                           ('{"name": "sql"}', '"name" and "path"'), ("{oops", "not valid JSON")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            lora_module(value)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["serve", "--enable-lora", "--lora-modules", "sql"])
    assert exit_info.value.code == 2 and "expected name=path" in capsys.readouterr().err
    assert cli_main(["serve", "--enable-lora", "--lora-modules", "a=/x", "a=/y"]) == 2
    assert "names 'a' twice" in capsys.readouterr().err
    assert cli_main(["serve", "--lora-modules", "a=/x"]) == 2
    assert "--lora-modules needs --enable-lora" in capsys.readouterr().err
