"""Scheduling policies: SJF with aging, skip-join MLFQ with paused preemption, S³ reservations; outputs unchanged."""

import itertools

import pytest
import torch

from foreseer import LLM, SamplingParams
from foreseer.config import SchedulerConfig
from foreseer.core.block_manager import BlockManager
from foreseer.core.output import ModelRunnerOutput
from foreseer.core.policies import get_policy
from foreseer.core.request import Request, RequestStatus
from foreseer.core.scheduler import Scheduler
from foreseer.lengths.features import prompt_hidden_states
from foreseer.lengths.probe import ProbeConfig, ProbeHead


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _scheduler(policy: str, blocks: int = 64, clock: Clock | None = None, **config) -> Scheduler:
    config = SchedulerConfig(**{"max_num_batched_tokens": 100, "policy": policy, **config})
    return Scheduler(config, BlockManager(blocks, 4), get_policy(policy, config), clock or Clock())


_first_tokens = itertools.count(1, 1000)  # prompts share no prefix to reuse


def _request(rid: str, prompt_len: int, t: float, max_tokens: int = 20) -> Request:
    first = next(_first_tokens)
    return Request(rid, list(range(first, first + prompt_len)), SamplingParams(max_tokens=max_tokens), max_tokens,
                   set(), arrival_time=t)


def _add(s: Scheduler, rid: str, prompt_len: int, t: float, max_tokens: int = 20,
         predicted: int | None = None) -> Request:
    r = _request(rid, prompt_len, t, max_tokens)
    r.predicted_length = predicted
    s.add_request(r)
    return r


def _step(s: Scheduler) -> list[tuple[str, int]]:
    """Schedule and pretend the model ran: a token for every request whose scheduled tokens reach its end."""
    out = s.schedule()
    sampled = {i.request.request_id: [7] for i in out.scheduled
               if i.request.num_computed_tokens + i.num_new_tokens == i.request.num_tokens}
    s.update_from_output(out, ModelRunnerOutput(sampled=sampled))
    return [(i.request.request_id, i.num_new_tokens) for i in out.scheduled]


def _admission_order(s: Scheduler) -> list[str]:
    order: list[str] = []
    while s.num_unfinished:
        order += [rid for rid, _ in _step(s) if rid not in order]
    return order


def test_sjf_serves_shortest_predicted_remaining_first():
    s = _scheduler("sjf", max_num_seqs=1)
    long = _add(s, "long", 4, 0.0, max_tokens=30, predicted=30)
    _add(s, "short", 4, 1.0, max_tokens=5, predicted=5)
    unpredicted = _add(s, "unpredicted", 4, 2.0, max_tokens=8)
    _add(s, "mid", 4, 3.0, max_tokens=12, predicted=12)
    assert s.policy.key(long, 0.0) == (1, 30, 0.0)
    long.token_ids += [7] * 26  # remaining is the prediction less the tokens generated, at least 0
    assert s.policy.key(long, 0.0) == (1, 4, 0.0)
    long.token_ids += [7] * 10
    assert s.policy.key(long, 0.0) == (1, 0, 0.0)
    del long.token_ids[4:]
    # Not predicted yet (its prefill predicts it in the engine): it ranks by what its max_tokens leaves.
    assert s.policy.key(unpredicted, 0.0) == (1, 8, 2.0)
    assert _admission_order(s) == ["short", "unpredicted", "mid", "long"]


def test_sjf_pauses_only_for_a_shorter_request():
    """One seat: a new request whose max_tokens is shorter than the running one's predicted remainder pauses it
    (its KV kept), runs to the end, and the longer one resumes with no recompute; a longer new one waits."""
    s = _scheduler("sjf", max_num_seqs=1)
    long = _add(s, "long", 8, 0.0, max_tokens=10, predicted=10)
    assert _step(s) == [("long", 8)]
    assert _step(s) == [("long", 1)]
    longer = _add(s, "longer", 8, 0.5, max_tokens=50)  # unpredicted: ranks by its 50 tokens, after long's 8
    assert _step(s) == [("long", 1)] and longer.status == RequestStatus.WAITING
    new = _add(s, "new", 8, 1.0, max_tokens=3)
    assert _step(s) == [("new", 8)]  # the long one is paused, its blocks kept
    assert long.status == RequestStatus.PREEMPTED and long.block_table
    new.predicted_length = 3  # what the engine sets from the hidden state at the end of the prefill
    assert _step(s) == [("new", 1)]
    assert _step(s) == [("new", 1)]  # its third token finishes it
    assert new.is_finished
    assert _step(s) == [("long", 1)]  # resumed where it stopped
    assert long.metrics.num_preemptions == 1 and long.num_output_tokens == 4


def _wait_of_long_request(max_wait_s: float) -> float:
    """One seat; a long request and a stream of short ones, one arriving every 2 steps (each runs 2 steps)."""
    clock = Clock()
    s = _scheduler("sjf", clock=clock, max_num_seqs=1, max_wait_s=max_wait_s)
    long = _add(s, "long", 4, 0.0, max_tokens=3, predicted=200)
    for step in range(80):
        clock.t = float(step)
        if step % 2 == 0:
            _add(s, f"short{step}", 4, clock.t, max_tokens=2, predicted=2)
        _step(s)
        if long.metrics.first_scheduled_time is not None:
            break
    return (long.metrics.first_scheduled_time or clock.t) - long.metrics.arrival_time


def test_sjf_aging_bounds_the_wait():
    assert _wait_of_long_request(max_wait_s=10.0) <= 10.0 + 3.0  # a short request's 2 steps to free the seat
    assert _wait_of_long_request(max_wait_s=1e9) >= 79.0  # pure SJF starves it while the stream lasts


def _mlfq(**config) -> Scheduler:
    return _scheduler("mlfq", **{"mlfq_levels": 3, "mlfq_base_quantum": 2, "mlfq_prefill_tokens_per_iteration": 4,
                                 **config})


def test_mlfq_skip_join_demotion_pausing_and_resumption():
    s = _mlfq(max_num_seqs=1)  # quanta 2, 4, 8 iterations; a prompt costs 1 iteration per 4 tokens
    other = _mlfq()
    levels = {n: other.policy.level(_add(other, str(n), n, 0.0)) for n in (4, 8, 12, 16, 40)}
    assert levels == {4: 0, 8: 0, 12: 1, 16: 1, 40: 2}  # long prompts skip the levels they would use up at once
    a = _add(s, "a", 4, 0.0, max_tokens=100)
    assert _step(s) == [("a", 4)] and s.policy.level(a) == 0
    _step(s)
    assert s.policy.level(a) == 1  # used its quantum of 2 at level 0
    b = _add(s, "b", 4, 1.0, max_tokens=100)
    table, computed = list(a.block_table), a.num_computed_tokens
    assert _step(s) == [("b", 4)]  # b ranks (0, 1.0) before a's (1, 0.0): a gives up its seat
    assert a.status == RequestStatus.PREEMPTED and a in s.waiting and a.metrics.num_preemptions == 1
    assert (a.block_table, a.num_computed_tokens) == (table, computed)  # paused, its KV kept
    assert _step(s) == [("b", 1)]
    assert s.policy.level(b) == 1
    assert _step(s) == [("a", 1)]  # a, the earlier arrival at level 1, resumes with one decode: no recompute
    assert b.status == RequestStatus.PREEMPTED and b.block_table
    for _ in range(3):
        _step(s)
    assert s.policy.level(a) == 2  # used level 1's quantum of 4
    assert _step(s) == [("b", 1)]
    for _ in range(20):
        _step(s)
    assert s.policy.level(a) == s.policy.level(b) == 2  # the bottom level keeps them


def test_mlfq_promotes_a_request_that_waited_too_long():
    clock = Clock()
    s = _mlfq(clock=clock, max_num_seqs=1, max_wait_s=5.0)
    y = _add(s, "y", 4, 0.0, max_tokens=100)
    x = _add(s, "x", 40, 0.5)  # a long prompt: joins the bottom level, behind y once y is down there too
    for step in range(6):
        clock.t = float(step)
        _step(s)
        assert x.status == RequestStatus.WAITING and s.policy.level(x) == 2
    assert s.policy.level(y) == 2
    clock.t = 6.0  # x has waited 5.5 s
    assert [rid for rid, _ in _step(s)] == ["x"]
    assert s.policy.level(x) == 0 and y.status == RequestStatus.PREEMPTED and y.block_table


def test_mlfq_frees_paused_blocks_when_memory_is_short():
    s = _mlfq(blocks=4, max_num_seqs=1)
    a = _add(s, "a", 8, 0.0)
    _step(s)
    _step(s)  # a: 10 tokens in 3 of the 4 blocks, down to level 1
    b = _add(s, "b", 8, 1.0)  # needs 2 blocks: only a's can make room
    assert _step(s) == [("b", 8)]
    assert a.status == RequestStatus.PREEMPTED and a.block_table == [] and a.num_computed_tokens == 0
    assert len(b.block_table) == 2
    assert _step(s) == [("b", 1)]  # b is down to level 1 now, behind the earlier arrival a
    # a resumes; the blocks it needs are paused b's now. It recomputes all but its first block, which is still
    # in the prefix cache.
    assert _step(s) == [("a", 6)]
    assert b.status == RequestStatus.PREEMPTED and b.block_table == [] and b.num_computed_tokens == 0


def test_s3_admits_only_within_reservations():
    s = _scheduler("s3", blocks=16)  # 64 token slots
    a = _add(s, "a", 8, 0.0, max_tokens=24, predicted=24)  # reserves 8 blocks
    b = _add(s, "b", 8, 1.0, max_tokens=40, predicted=40)  # would need 12: only 16 - 8 are left
    assert _step(s) == [("a", 8)]
    while a.status == RequestStatus.RUNNING:
        assert b.status == RequestStatus.WAITING
        _step(s)
    assert _step(s) == [("b", 8)]

    s = _scheduler("s3", blocks=16)
    _add(s, "a", 8, 0.0, max_tokens=24, predicted=24)
    _add(s, "c", 8, 1.0, max_tokens=40, predicted=16)  # 6 blocks fit beside a's 8
    assert _step(s) == [("a", 8), ("c", 8)]


def test_s3_doubles_the_reservation_of_a_mispredicted_request():
    s = _scheduler("s3", blocks=16)
    a = _add(s, "a", 8, 0.0, max_tokens=40, predicted=4)
    b = _request("b", 8, 1.0, max_tokens=44)
    b.predicted_length = 44  # 13 blocks
    reserved = []
    for _ in range(3):
        _step(s)
        reserved.append(s.policy.reserved_tokens(a))
    assert s.policy.can_admit(b, s.running, s.block_manager)  # a reserves 3 blocks and holds them
    for _ in range(14):
        _step(s)
        reserved.append(s.policy.reserved_tokens(a))
    assert reserved == [4] * 3 + [8] * 4 + [16] * 8 + [32] * 2  # doubled each time it reaches the reservation
    for _ in range(17):
        _step(s)
    assert s.policy.reserved_tokens(a) == 40  # never above max_tokens

    s = _scheduler("s3", blocks=16)
    a = _add(s, "a", 8, 0.0, max_tokens=40, predicted=4)
    for _ in range(4):
        _step(s)  # a reached its 4 predicted tokens unfinished: 8 reserved now, 4 blocks, of which it holds 3
    s.add_request(b)
    _step(s)
    assert b.status == RequestStatus.WAITING and not s.policy.can_admit(b, s.running, s.block_manager)


@pytest.fixture(scope="module")
def random_probe(tmp_path_factory) -> str:
    torch.manual_seed(0)
    head = ProbeHead(ProbeConfig(hidden_size=64, kind="regression", hidden_dim=16, max_length=48))
    with torch.no_grad():  # spread the predictions over the range, so that they differ between prompts
        head.net[-1].weight.normal_(0, 0.5)
        head.net[-1].bias.fill_(0.5)
    directory = str(tmp_path_factory.mktemp("probe"))
    head.save(directory)
    return directory


def _staggered_outputs(llm: LLM) -> dict[str, list[int]]:
    """Prompts of 6 to 41 tokens and answers of 6 to 42, arriving 3 at a time every 2 steps."""
    engine, outputs = llm.engine, {}
    for i in range(12):
        prompt = [(7 * i + j) % 300 + 5 for j in range(6 + (i * 13) % 36)]
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=6 + (i * 17) % 37,
                                                          ignore_eos=True))
        if i % 3 == 2:
            for _ in range(2):
                outputs.update({o.request_id: o for o in engine.step() if o.finished})
    while engine.has_unfinished_requests():
        outputs.update({o.request_id: o for o in engine.step() if o.finished})
    return outputs


def test_policies_keep_greedy_outputs(tiny_llama, random_probe):
    roomy = LLM(tiny_llama, kv_cache_gib=0.01, block_size=4)
    expected = {rid: o.outputs[0].token_ids for rid, o in _staggered_outputs(roomy).items()}
    # 30 blocks of 4 tokens and 3 seats: queueing, block shortages (preemptions under every policy but s3, whose
    # reservations avoid them), SJF and MLFQ pausing.
    kv_cache_gib = 30 * roomy.engine.runner.kv_bytes_per_block() / 2**30
    preemptions = {}
    for policy in ("fcfs", "priority", "sjf", "mlfq", "s3"):
        llm = LLM(tiny_llama, kv_cache_gib=kv_cache_gib, block_size=4, max_num_seqs=3, max_num_batched_tokens=32,
                  scheduling_policy=policy, length_predictor=random_probe, mlfq_base_quantum=2,
                  mlfq_prefill_tokens_per_iteration=8)
        outputs = _staggered_outputs(llm)
        assert {rid: o.outputs[0].token_ids for rid, o in outputs.items()} == expected, policy
        preemptions[policy] = sum(o.metrics.num_preemptions for o in outputs.values())
        blocks = llm.engine.block_manager
        assert blocks.num_free_blocks == blocks.num_blocks, policy
    assert min(preemptions[p] for p in ("fcfs", "priority", "sjf", "mlfq")) > 0 and preemptions["s3"] == 0


def test_lengths_are_predicted_from_each_requests_own_prefill(tiny_llama, random_probe):
    """SJF with one seat: a request is predicted in the step that computes its prompt, from that prefill's last
    hidden state, never before; no prompt is computed twice."""
    llm = LLM(tiny_llama, kv_cache_gib=0.01, block_size=4, max_num_seqs=1, scheduling_policy="sjf",
              length_predictor=random_probe)
    prompts = [list(range(5 + i, 20 + 5 * i)) for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        llm.engine.add_request(str(i), prompt, params)
    computed = []
    execute = llm.engine.runner.execute
    llm.engine.runner.execute = lambda sched: computed.append(sched.num_batched_tokens) or execute(sched)
    requests = [llm.engine.parents[str(i)].sequences[0].request for i in range(4)]
    outputs = {}
    while llm.engine.has_unfinished_requests():
        outputs.update({o.request_id: o for o in llm.engine.step()})
        assert [r.predicted_length is not None for r in requests] == [r.num_computed_tokens > 0 for r in requests]
    assert sum(computed) == sum(len(p) for p in prompts) + 4 * (4 - 1)  # the last token's KV is never computed
    head = ProbeHead.load(random_probe, 64)
    reference = head.predict(prompt_hidden_states(llm.engine, prompts), torch.tensor([len(p) for p in prompts]))
    assert [outputs[str(i)].predicted_length for i in range(4)] == reference and len(set(reference)) > 1


def test_policy_errors(tiny_llama):
    with pytest.raises(ValueError, match="scheduling_policy must be one of .*got 'random'"):
        LLM(tiny_llama, kv_cache_gib=0.01, scheduling_policy="random")
    with pytest.raises(ValueError, match="unknown scheduling_policy 'random'"):
        get_policy("random")
    for policy in ("sjf", "s3"):
        with pytest.raises(ValueError, match=f"'{policy}' needs length_predictor.*no remaining-length head"):
            LLM(tiny_llama, kv_cache_gib=0.01, scheduling_policy=policy)
    with pytest.raises(ValueError, match="max_wait_s must be > 0"):
        SchedulerConfig(max_wait_s=0)


def test_sjf_bound_simulation_orders_a_worked_example():
    """scripts/sjf_bound.py backs the README's bound on sjf; worked by hand: one seat, 1 s a step, a 3-token and a
    1-token answer arriving together, then a 2-token one at 0.5 s. fcfs finishes them at 3, 4, 6 s; shortest
    remaining first at 1 (the short one), 3 (the late one, before the long one's remaining 3) and 6 s."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).parent.parent / "scripts" / "sjf_bound.py"
    spec = importlib.util.spec_from_file_location("sjf_bound", path)
    sjf_bound = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = sjf_bound  # dataclasses look their module up there
    spec.loader.exec_module(sjf_bound)
    fcfs = sjf_bound.simulate([3, 1, 2], [0.0, 0.0, 0.5], 1, False, 1.0, 0.0)
    sjf = sjf_bound.simulate([3, 1, 2], [0.0, 0.0, 0.5], 1, True, 1.0, 0.0)
    assert fcfs.mean_s == pytest.approx((3 + 4 + 5.5) / 3)
    assert sjf.mean_s == pytest.approx((1 + 6 + 2.5) / 3)
    assert (fcfs.p99_s, sjf.p99_s) == (5.5, 6.0)
