"""Fault isolation in the engine step: an injected fault (as the model run starts, in an attention kernel halfway
through the layers, in one request's sampling) fails the requests it belongs to, and every other request
completes with exactly the output of a run without faults, greedy or seeded sampling, with prefix caching and
chunked prefill on."""

from __future__ import annotations

import pytest

from foreseer.config import EngineConfig
from foreseer.engine.engine import LLMEngine
from foreseer.engine.faults import Fault, FaultInjector, answers, run_requests
from foreseer.sampling_params import SamplingParams
from tests.helpers import random_prompts

NUM_REQUESTS = 6


@pytest.fixture(scope="module")
def engine(tiny_llama) -> LLMEngine:
    # A small token budget chunks the longer prompts' prefills, so faults land in prefill chunks too.
    return LLMEngine(EngineConfig.from_kwargs(tiny_llama, max_num_batched_tokens=48, kv_cache_gib=0.01))


def _requests(vocab: int) -> list[tuple[str, list[int], SamplingParams]]:
    prompts = random_prompts(vocab, [5, 70, 12, 33, 9, 50], seed=4)
    prompts[5][:20] = prompts[1][:20]  # a shared prefix: prefix-cached blocks must stay right through faults
    params = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=14, temperature=0.8, seed=11, ignore_eos=True),
              SamplingParams(max_tokens=10, temperature=0.0, logprobs=2, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=3, n=2, ignore_eos=True),
              SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0.7, top_k=20, seed=5, ignore_eos=True)]
    return [(f"r{i}", p, s) for i, (p, s) in enumerate(zip(prompts, params))]


def _run(engine: LLMEngine, faults: list[Fault]) -> tuple[dict, FaultInjector]:
    finals, injector = run_requests(engine, _requests(engine.model_config.vocab_size), faults)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks, "a failed step leaked KV blocks"
    assert not engine.scheduler.suspects
    return finals, injector


@pytest.fixture(scope="module")
def reference(engine) -> dict:
    finals, _ = _run(engine, [])
    assert len(finals) == NUM_REQUESTS and all(o.error is None for o in finals.values())
    return answers(finals)


@pytest.mark.parametrize("faults, failed", [
    # A one-off fault no one request can be blamed for: every request runs again, alone, and completes.
    ([Fault("step", at_step=3)], set()),
    ([Fault("kernel", at_step=6)], set()),
    # A kernel fault that comes back whenever r1 is in the step: isolation traces it to r1 alone.
    ([Fault("kernel", request_id="r1", times=None)], {"r1"}),
    # Sampling traces its own faults: r3 (n=2) is retried alone and fails, both of its sequences; the step's
    # others go on. A one-off sampling fault costs r3 nothing.
    ([Fault("sampling", request_id="r3", times=None)], {"r3"}),
    ([Fault("sampling", request_id="r3", at_step=4)], set()),
    # Several at once: a transient step fault (which may hit a request running alone), then a request whose
    # kernel always fails.
    ([Fault("step", at_step=2), Fault("kernel", request_id="r5", times=None)], {"r5"}),
    ([Fault("kernel", request_id="r5", times=None), Fault("step", at_step=2)], {"r5"}),
])
def test_a_fault_fails_only_its_requests_and_the_rest_are_exact(engine, reference, faults, failed):
    num_faults = engine.num_faults
    finals, injector = _run(engine, faults)
    assert injector.fired, "the fault never fired: the test tested nothing"
    assert len(finals) == NUM_REQUESTS
    assert {rid for rid, out in finals.items() if out.error is not None} == failed
    for rid in failed:
        assert "the engine failed while computing this request" in finals[rid].error
        assert "InjectedFault" in finals[rid].error
        assert all(c.finish_reason == "error" for c in finals[rid].outputs)
    # Unseeded sampling would differ anyway; these requests are greedy or seeded, so the rest must be exact.
    expected = {rid: answer for rid, answer in reference.items() if rid not in failed}
    assert answers(finals) == expected
    assert engine.num_faults > num_faults
    last = engine.faults[-1]
    assert last.stage == "execute" and "InjectedFault" in last.error


def test_a_fault_in_a_step_hook_before_scheduling_fails_nothing(engine, reference):
    class FailingHook:
        needs_hidden_states, capture_layers, predicts_lengths = False, (), False
        calls = 0

        def before_schedule(self, scheduler) -> None:
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("a drafter's kernel failed")

        def after_execute(self, sched, output, execute_seconds) -> None:
            pass

        def after_update(self, updates) -> None:
            pass

    hooks = list(engine.hooks)
    engine.hooks.append(FailingHook())
    try:
        finals, _ = _run(engine, [])
    finally:
        engine.hooks[:] = hooks
    assert answers(finals) == reference
    assert engine.faults[-1].stage == "before_schedule" and engine.faults[-1].failed == []


def test_an_unrecoverable_fault_in_the_update_fails_the_steps_requests_and_the_engine_goes_on(engine, reference,
                                                                                               monkeypatch):
    original = engine.scheduler.update_from_output
    calls = []

    def failing_update(sched, result):
        calls.append(len(calls))
        if len(calls) == 5:
            raise RuntimeError("bookkeeping bug")
        return original(sched, result)

    monkeypatch.setattr(engine.scheduler, "update_from_output", failing_update)
    finals, _ = _run(engine, [])
    fault = engine.faults[-1]
    assert fault.stage == "update" and fault.failed
    failed = {rid for rid, out in finals.items() if out.error is not None}
    assert failed == {sequence.rpartition("#")[0] for sequence in fault.failed}
    assert answers(finals) == {rid: a for rid, a in reference.items() if rid not in failed}
    monkeypatch.undo()
    finals, _ = _run(engine, [])  # and the engine serves on
    assert answers(finals) == reference
