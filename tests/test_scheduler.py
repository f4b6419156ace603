"""Scheduler: token budget (decodes first, then prefill chunks), max_num_seqs, policies, prefix reuse, preemption."""

import pytest

from foreseer import LLM, SamplingParams
from foreseer.config import SchedulerConfig
from foreseer.core.block_manager import BlockManager
from foreseer.core.policies import get_policy
from foreseer.core.request import Request
from foreseer.core.scheduler import Scheduler


def _scheduler(budget=8, max_seqs=8, blocks=64, policy="fcfs") -> Scheduler:
    return Scheduler(SchedulerConfig(budget, max_seqs, policy), BlockManager(blocks, 4), get_policy(policy))


def _add(s: Scheduler, rid: str, n: int, t: float, priority: int = 0) -> Request:
    r = Request(rid, list(range(1, n + 1)), SamplingParams(max_tokens=4), 4, set(), arrival_time=t, priority=priority)
    s.add_request(r)
    return r


def _step(s: Scheduler):
    out = s.schedule()
    for item in out.scheduled:  # pretend the model ran: advance and append a token where sampling happens
        r = item.request
        if r.num_computed_tokens + item.num_new_tokens == r.num_tokens:
            r.token_ids.append(7)
        r.num_computed_tokens += item.num_new_tokens
    return [(i.request.request_id, i.num_new_tokens) for i in out.scheduled]


def test_budget_chunks_prefill_and_puts_decodes_first():
    s = _scheduler(budget=8)
    _add(s, "a", 5, 0.0)
    _add(s, "b", 10, 1.0)
    assert _step(s) == [("a", 5), ("b", 3)]
    assert _step(s) == [("a", 1), ("b", 7)]  # a decodes first, b's prefill continues in the rest
    assert _step(s) == [("a", 1), ("b", 1)]


def test_max_num_seqs_limits_running():
    s = _scheduler(budget=100, max_seqs=2)
    for i in range(3):
        _add(s, str(i), 3, float(i))
    assert [rid for rid, _ in _step(s)] == ["0", "1"]
    assert len(s.waiting) == 1


def test_priority_policy_admits_lower_value_first():
    s = _scheduler(budget=6, policy="priority")
    _add(s, "late-urgent", 3, 2.0, priority=-1)
    _add(s, "early", 3, 1.0, priority=0)
    _add(s, "later", 3, 3.0, priority=0)
    assert [rid for rid, _ in _step(s)] == ["late-urgent", "early"]


def test_preemption_frees_blocks_of_lowest_ranked_request():
    s = _scheduler(budget=100, blocks=4)  # 16 token slots of 4
    a = _add(s, "a", 7, 0.0)
    b = _add(s, "b", 7, 1.0)
    _step(s)  # both prefilled into 2 blocks each: the cache is full
    _step(s)  # both decode token 8 into their second block
    out = s.schedule()  # a's token 9 needs a third block: b, the later arrival, gives its blocks up
    assert out.preempted == [b]
    assert [(i.request, i.num_new_tokens) for i in out.scheduled] == [(a, 1)]
    assert b.num_computed_tokens == 0 and b.block_table == [] and b in s.waiting
    assert s.block_manager.num_free_blocks == 1


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match="scheduling_policy"):
        get_policy("random")


def test_shared_prefix_computes_only_new_tokens(tiny_llama):
    llm = LLM(tiny_llama, kv_cache_gib=0.01, block_size=4)
    prefix = list(range(5, 105))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    first = llm.generate([prefix + [7, 8, 9]], params, use_tqdm=False)[0]
    computed_before = _computed_tokens(llm)
    second = llm.generate([prefix + [10, 11]], params, use_tqdm=False)[0]
    assert second.metrics.num_cached_tokens == 100  # 25 full blocks of the shared prefix
    fresh = LLM(tiny_llama, kv_cache_gib=0.01, block_size=4, enable_prefix_caching=False)
    assert fresh.generate([prefix + [10, 11]], params, use_tqdm=False)[0].outputs[0].token_ids == \
        second.outputs[0].token_ids
    assert first.metrics.num_cached_tokens == 0
    assert _computed_tokens(llm) - computed_before == 2 + 8 - 1  # new prompt tokens, then decodes


def _computed_tokens(llm: LLM) -> int:
    return llm.engine.runner.num_computed_tokens_total


def test_preemption_under_memory_pressure_keeps_outputs(tiny_llama):
    prompts = [list(range(5 + i, 45 + i)) for i in range(12)]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    roomy = LLM(tiny_llama, kv_cache_gib=0.01, block_size=4)
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    # 40 blocks of 4 tokens: room for about two of these 88-token requests at a time.
    tight = LLM(tiny_llama, kv_cache_gib=40 * tight_block_bytes(roomy), block_size=4)
    outputs = tight.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert sum(o.metrics.num_preemptions for o in outputs) > 0
    assert tight.engine.block_manager.num_free_blocks == tight.engine.block_manager.num_blocks


def tight_block_bytes(llm: LLM) -> float:
    return llm.engine.runner.kv_bytes_per_block() / 2**30
