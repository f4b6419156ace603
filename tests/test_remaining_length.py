"""The remaining-length predictor: the distribution's arithmetic, the layer states the engine captures (against
transformers), the resumable trace builder, a head that learns a planted length signal, refinement in the engine,
limited preemption, quantile reservations and the oracle's length hints."""

import dataclasses
import itertools
import json
import os
import shutil

import pytest
import torch

from foreseer import LLM, SamplingParams
from foreseer.config import SchedulerConfig
from foreseer.core.block_manager import BlockManager
from foreseer.core.length_estimate import RemainingLength
from foreseer.core.output import ModelRunnerOutput
from foreseer.core.policies import get_policy, remaining_tokens
from foreseer.core.request import Request, RequestStatus
from foreseer.core.scheduler import Scheduler
from foreseer.core.step_hook import StepHook
from foreseer.lengths.hook import RemainingLengthHook
from foreseer.lengths.remaining import HeadTrainConfig, RemainingHead, RemainingHeadConfig
from foreseer.training.lengths.remaining import (
    censored_tau,
    fit_head,
    load_examples,
    score_head,
)
from foreseer.training.lengths.traces import (
    TraceConfig,
    TracePrompt,
    build_traces,
    load_trace_records,
    load_trace_states,
    restore_trace_states,
)

EDGES = [0, 2, 4, 8, 16, 32, 64]


# -- the distribution ---------------------------------------------------------------------------------
def _reference(edges, probs, at_tokens, generated, cap):
    """Mean and 0.9 quantile of min(R - d, cap) given R > d, by enumerating R on a fine grid (uniform in each
    bucket): an independent computation of what RemainingLength works out piecewise."""
    steps = 2000
    values, weights = [], []
    for (low, high), p in zip(zip(edges, edges[1:]), probs):
        grid = torch.linspace(low, high, steps + 1)[1:] - (high - low) / (2 * steps)
        values.append(grid)
        weights.append(torch.full((steps,), p / steps))
    r, w = torch.cat(values).double(), torch.cat(weights).double()
    d = generated - at_tokens
    alive = r > d
    left = (r[alive] - d).clamp(max=cap)
    weight = w[alive] / w[alive].sum()
    order = left.argsort()
    cumulative = weight[order].cumsum(0)
    quantile = left[order][(cumulative >= 0.9).nonzero()[0, 0]]
    return (left * weight).sum().item(), quantile.item()


@pytest.mark.parametrize("generated,cap", [(3, 1000), (3, 10), (8, 1000), (14, 20), (43, 3)])
def test_remaining_length_mean_and_quantile_match_enumeration(generated, cap):
    probs = [0.1, 0.2, 0.3, 0.15, 0.15, 0.05, 0.05]
    edges = [0, 2, 4, 8, 16, 32, 64, 128]
    estimate = RemainingLength.create(edges, probs, at_tokens=3)
    mean, quantile = _reference(edges, probs, 3, generated, cap)
    assert estimate.mean(generated, cap) == pytest.approx(mean, abs=0.05)
    assert estimate.quantile(0.9, generated, cap) == pytest.approx(quantile, abs=0.1)
    assert estimate.survival(0) == 1.0 and estimate.survival(128) == pytest.approx(0.0, abs=1e-12)


def test_known_length_is_counted_down():
    known = RemainingLength.exactly(10)
    assert [round(known.mean(t, 10 - t), 3) for t in (0, 4, 9)] == [9.5, 5.5, 0.5]
    assert known.quantile(0.9, 4, 100) == pytest.approx(5.9)
    with pytest.raises(ValueError, match="must be >= 1"):
        RemainingLength.exactly(0)


def test_censored_loss_is_the_survival_probability():
    head = RemainingHead(RemainingHeadConfig(hidden_size=4, layer=1, edges=EDGES, hidden_dim=8))
    logits = torch.randn(3, len(EDGES) - 1)
    remaining = torch.tensor([3, 10, 40])
    probs = logits.softmax(-1)
    # P(R > 3): half of bucket (2, 4] and everything above it; P(R > 10): 6/8 of (8, 16] and above.
    expected_censored = -torch.log(torch.stack([probs[0, 1] / 2 + probs[0, 2:].sum(),
                                                probs[1, 3] * 6 / 8 + probs[1, 4:].sum(),
                                                probs[2, 5] * 24 / 32]))
    loss = head.loss(logits, remaining, torch.tensor([True, True, True]))
    assert loss.item() == pytest.approx(expected_censored.mean().item(), rel=1e-5)
    observed = head.loss(logits, remaining, torch.tensor([False, False, False]))
    buckets = torch.tensor([1, 3, 5])  # 3 in (2, 4], 10 in (8, 16], 40 in (32, 64]
    assert observed.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, buckets).item(), rel=1e-5)


def test_censored_tau_counts_only_known_orders():
    # b (ended at 5) is shorter than a (cut at 9); c (cut at 3) cannot be ordered against b.
    assert censored_tau([9, 5, 1], [9, 5, 3], [True, False, True]) == 1.0
    assert censored_tau([1, 5, 9], [9, 5, 3], [True, False, True]) == -1.0


# -- captured layer states and traces ---------------------------------------------------------------------
def test_captured_layer_states_equal_transformers_hidden_states(tiny_llama):
    from transformers import AutoModelForCausalLM

    llm = LLM(tiny_llama, kv_cache_gib=0.01, block_size=4)
    prompt = [5, 17, 33, 8, 99, 120, 7]
    seen = []

    class Watch(StepHook):  # keeps what the runner returned
        capture_layers = (1, 2)

        def after_execute(self, sched, output, execute_seconds):
            seen.append({k: {n: s.clone() for n, s in v.items()} for k, v in output.layer_states.items()})

    llm.engine.add_hook(Watch())
    output = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)[0]
    answer = output.outputs[0].token_ids
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        states = hf(torch.tensor([prompt + answer]), output_hidden_states=True).hidden_states
    assert len(seen) == 5
    for t, step in enumerate(seen):  # step t reads the token that ends prompt + t answer tokens
        (captured,) = step.values()
        row = len(prompt) + t - 1
        torch.testing.assert_close(captured[1], states[1][0, row], rtol=1e-4, atol=1e-4)
        # transformers' last entry is after the final norm; the residual stream is before it
        torch.testing.assert_close(hf.model.norm(captured[2][None])[0], states[2][0, row], rtol=1e-4, atol=1e-4)


MARKERS = (21, 58, 93, 140, 177, 230)


def _planted_prompts(count: int) -> list[TracePrompt]:
    """Prompts whose marker token sets the answer's length: 4 + 6 * k tokens for marker k (the tiny model rarely
    stops on its own first, so the answers run to their max_tokens)."""
    prompts = []
    for i in range(count):
        k = i % len(MARKERS)
        ids = [MARKERS[k]] * 6 + [(11 * i + j) % 300 + 5 for j in range(1 + i % 3)]
        prompts.append(TracePrompt(f"p{i}", ids, 4 + 6 * k))
    return prompts


@pytest.fixture(scope="module")
def planted(tiny_llama, tmp_path_factory):
    """Traces of 150 planted prompts, built in two runs (the second resumes the first)."""
    llm = LLM(tiny_llama, kv_cache_gib=0.02, block_size=4, max_num_batched_tokens=128)
    path = str(tmp_path_factory.mktemp("traces") / "planted.jsonl")
    config = TraceConfig(layers=(1, 2), max_prompts_in_flight=16, shard_prompts=16)
    prompts = _planted_prompts(150)
    first = build_traces(llm, prompts[:30], path, config, use_tqdm=False)
    second = build_traces(llm, prompts, path, config, use_tqdm=False)
    return llm, path, prompts, first, second


def test_trace_builder_resumes_and_records_every_position(planted):
    llm, path, prompts, first, second = planted
    assert first["num_new"] == 30 and second["num_new"] == 120 and second["num_skipped"] == 30
    records = load_trace_records(path)
    assert sorted(r.id for r in records) == sorted(p.id for p in prompts)
    by_id = {p.id: p for p in prompts}
    for record in records:
        prompt = by_id[record.id]
        assert record.prompt_token_ids == prompt.prompt and record.max_tokens == prompt.max_tokens
        # ignore_eos is not set: an answer ends at EOS or, censored, at its max_tokens
        assert record.output_length == prompt.max_tokens if record.censored else record.output_length >= 1
    assert 0 < sum(r.censored for r in records) < len(records)
    states = load_trace_states(path, records[:5], 2)
    assert states.shape == (sum(r.output_length for r in records[:5]), 64)
    # A state equals what a fresh prefill of the prompt and the answer so far gives at its last token.
    from foreseer.lengths.features import prompt_hidden_states

    record = max(records, key=lambda r: r.output_length)
    answer = llm.generate([record.prompt_token_ids], SamplingParams(temperature=0, max_tokens=record.max_tokens),
                          use_tqdm=False)[0].outputs[0].token_ids
    assert len(answer) == record.output_length and record.output_token_ids == answer
    rows = load_trace_states(path, [record], 1)
    fresh = prompt_hidden_states(llm.engine, [record.prompt_token_ids + answer[:t] for t in (0, 3)], layer=1)
    torch.testing.assert_close(rows[[0, 3]].float(), fresh, rtol=2e-2, atol=2e-2)  # stored in fp16


def test_states_are_restored_from_the_records_alone(planted, tmp_path):
    llm, path, _, _, _ = planted
    kept = tmp_path / "kept.jsonl"
    shutil.copy(path, kept)  # the JSONL without its shards
    records = load_trace_records(str(kept))
    summary = restore_trace_states(llm, str(kept), (1, 2), use_tqdm=False)
    assert summary["num_restored"] == summary["num_shards"] == len({r.shard for r in records}) > 1
    for layer in (1, 2):
        torch.testing.assert_close(load_trace_states(str(kept), records, layer).float(),
                                   load_trace_states(path, records, layer).float(), rtol=2e-2, atol=2e-2)
    assert restore_trace_states(llm, str(kept), (1, 2), use_tqdm=False)["num_restored"] == 0
    os.remove(tmp_path / records[0].shard)
    with open(kept) as f:
        lines = [json.loads(line) for line in f]
    lines[0]["output_token_ids"] = []  # written before answers were recorded
    kept.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(ValueError, match="no answer to restore it from"):
        restore_trace_states(llm, str(kept), (1, 2), use_tqdm=False)


def test_head_learns_a_planted_length_signal(planted):
    _, path, prompts, _, _ = planted
    records = load_trace_records(path)
    # Planted ends: every answer "ends" at its max_tokens (the signal); mark them observed, not censored, and
    # score without the cap, which would give the length away.
    records = [dataclasses.replace(r, censored=False, max_tokens=1000) for r in records]
    train = [r for r in records if int(r.id[1:]) < 120]
    val = [r for r in records if int(r.id[1:]) >= 120]  # the same markers, other prompts
    edges = list(range(0, 42, 2))
    head = fit_head(path, train, 1, 64, HeadTrainConfig(epochs=200, batch_size=512), 64, "", edges)
    scores = score_head(head, val, load_examples(path, val, 1), at_tokens=8)
    # Five or six lengths shared by many prompts: ties in the labels keep tau-b below about 0.9 even when exact.
    assert scores.tau_prefill > 0.8 and scores.tau_at > 0.6 and scores.mae_prefill < 4, scores
    untrained = RemainingHead(RemainingHeadConfig(hidden_size=64, layer=1, edges=list(head.config.edges)))
    assert score_head(untrained, val, load_examples(path, val, 1), at_tokens=8).nll > scores.nll


# -- refinement and policies in the engine ------------------------------------------------------------
@pytest.fixture(scope="module")
def random_remaining_head(tmp_path_factory) -> str:
    torch.manual_seed(0)
    head = RemainingHead(RemainingHeadConfig(hidden_size=64, layer=1, edges=EDGES, hidden_dim=16))
    with torch.no_grad():  # predictions that differ between requests and steps
        head.net[-1].weight.normal_(0, 2.0)
    directory = str(tmp_path_factory.mktemp("remaining"))
    head.save(directory)
    return directory


def test_engine_predicts_at_prefill_and_every_refresh(tiny_llama, random_remaining_head):
    llm = LLM(tiny_llama, kv_cache_gib=0.01, block_size=4, length_predictor=random_remaining_head,
              length_refresh_tokens=4)
    hook = next(h for h in llm.engine.hooks if isinstance(h, RemainingLengthHook))
    engine = llm.engine
    prompts = [[5 + i, 40, 41 + i, 77] for i in range(3)]
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=13, ignore_eos=True))
    requests = [engine.parents[str(i)].sequences[0].request for i in range(3)]
    made = {r.request_id: [] for r in requests}
    while engine.has_unfinished_requests():
        engine.step()
        for request in requests:
            estimate = request.length_estimate
            if estimate is not None and (not made[request.request_id] or made[request.request_id][-1] is not estimate):
                made[request.request_id].append(estimate)
    for request in requests:
        assert [e.at_tokens for e in made[request.request_id]] == [0, 4, 8, 12]
    assert hook.num_predictions == 12
    # The prediction at the end of the prefill is the head's on that layer's state there.
    head = RemainingHead.load(random_remaining_head)
    from foreseer.lengths.features import prompt_hidden_states

    states = prompt_hidden_states(engine, prompts, layer=1)
    expected = head.predict(states, torch.zeros(3, dtype=torch.long), torch.tensor([4, 4, 4]))
    for request, estimate in zip(requests, expected):
        assert made[request.request_id][0].probs == pytest.approx(estimate.probs, abs=1e-5)
        assert request.predicted_length == round(estimate.mean(0, 13))


class ScriptedHead(RemainingHead):
    """A head that predicts each answer's true remaining length exactly, from its prompt length: the scripted
    trace through which the engine's refinement is checked."""

    def __init__(self, true_lengths: dict[int, int]) -> None:
        super().__init__(RemainingHeadConfig(hidden_size=64, layer=1, edges=EDGES, hidden_dim=4))
        self.true_lengths = true_lengths

    def predict(self, hidden, generated, prompt_lengths):
        return [RemainingLength.exactly(self.true_lengths[int(n)] - int(t), int(t))
                for t, n in zip(generated.tolist(), prompt_lengths.tolist())]


def test_refinement_counts_down_monotonically_on_a_scripted_trace(tiny_llama):
    llm = LLM(tiny_llama, kv_cache_gib=0.01, block_size=4, scheduling_policy="sjf",
              length_predictor=_dummy_dir(tiny_llama), length_refresh_tokens=3)
    engine = llm.engine
    true = {4: 11, 5: 7, 6: 16}
    hook = next(h for h in engine.hooks if isinstance(h, RemainingLengthHook))
    hook.head = ScriptedHead(true)
    for n, length in true.items():
        engine.add_request(str(n), list(range(9, 9 + n)), SamplingParams(temperature=0, max_tokens=length,
                                                                      ignore_eos=True))
    requests = {n: engine.parents[str(n)].sequences[0].request for n in true}
    trace = {n: [] for n in true}
    while engine.has_unfinished_requests():
        engine.step()
        for n, request in requests.items():
            if request.length_estimate is not None and not request.is_finished:
                trace[n].append((request.num_output_tokens, remaining_tokens(request)))
    for n, points in trace.items():
        values = [v for _, v in points]
        assert values == sorted(values, reverse=True), (n, points)  # never up
        assert all(abs(v - (true[n] - t)) <= 0.5 for t, v in points), (n, points)  # and exact


def _dummy_dir(tiny_llama):
    """A saved head with the tiny model's sizes, for engines whose head a test replaces."""
    directory = os.path.join(os.path.dirname(tiny_llama), "remaining-head-for-scripts")
    if not os.path.isdir(directory):
        RemainingHead(RemainingHeadConfig(hidden_size=64, layer=1, edges=EDGES, hidden_dim=4)).save(directory)
    return directory


_first_tokens = itertools.count(1, 1000)


def _scheduler(policy: str, **config) -> Scheduler:
    config = SchedulerConfig(**{"max_num_batched_tokens": 100, "policy": policy, **config})
    return Scheduler(config, BlockManager(64, 4), get_policy(policy, config), lambda: 0.0)


def _request(rid: str, total: int, max_tokens: int = 60, t: float = 0.0) -> Request:
    first = next(_first_tokens)
    request = Request(rid, list(range(first, first + 4)), SamplingParams(max_tokens=max_tokens), max_tokens, set(),
                      arrival_time=t)
    request.length_estimate = RemainingLength.exactly(total)
    request.predicted_length = total
    return request


def _step(s: Scheduler) -> None:
    out = s.schedule()
    sampled = {i.request.request_id: [7] for i in out.scheduled
               if i.request.num_computed_tokens + i.num_new_tokens == i.request.num_tokens}
    s.update_from_output(out, ModelRunnerOutput(sampled=sampled))


def test_limited_preemption_keeps_a_request_close_to_finishing():
    s = _scheduler("sjf", max_num_seqs=1, sjf_preemption_limit=0.5)
    near = _request("near", 20)
    s.add_request(near)
    for _ in range(12):  # 12 of its 20 tokens: past half of its predicted length
        _step(s)
    s.add_request(_request("short", 3, t=1.0))
    _step(s)
    assert near.status == RequestStatus.RUNNING and near.num_output_tokens == 13

    s = _scheduler("sjf", max_num_seqs=1, sjf_preemption_limit=0.5)
    early = _request("early", 20)
    s.add_request(early)
    for _ in range(5):  # 5 of 20: it may still be paused for a shorter one
        _step(s)
    s.add_request(_request("short", 3, t=1.0))
    _step(s)
    assert early.status == RequestStatus.PREEMPTED and early.num_output_tokens == 5


def test_aging_bounds_the_wait_behind_shorter_requests():
    clock = [0.0]
    config = SchedulerConfig(max_num_batched_tokens=100, policy="sjf", max_num_seqs=1, max_wait_s=5.0)
    s = Scheduler(config, BlockManager(256, 4), get_policy("sjf", config), lambda: clock[0])
    long = _request("long", 50, t=0.0)
    s.add_request(long)
    started = None
    for step in range(40):  # a stream of short requests, each shorter than the long one
        s.add_request(_request(f"short{step}", 2, max_tokens=2, t=clock[0]))
        _step(s)
        if long.num_output_tokens and started is None:
            started = clock[0]
        clock[0] += 1.0
    assert started is not None and started <= config.max_wait_s + 1.0


def test_s3_reserves_an_upper_quantile_of_the_refined_prediction():
    s = _scheduler("s3")
    request = _request("a", 10)
    request.length_estimate = RemainingLength.create(EDGES, [0.0, 0.0, 0.5, 0.5, 0.0, 0.0], at_tokens=0)
    s.add_request(request)
    for _ in range(3):
        _step(s)
    generated = request.num_output_tokens
    expected = generated + request.length_estimate.quantile(s.config.s3_quantile, generated, 60 - generated)
    assert s.policy.reserved_tokens(request) == pytest.approx(expected, abs=1)


def test_oracle_length_hints_reproduce_the_true_lengths(tiny_llama, random_remaining_head):
    prompts = [[5 + i, 40, 41 + i, 77, 9 * i % 300] for i in range(6)]
    params = [SamplingParams(temperature=0, max_tokens=5 + 3 * i) for i in range(6)]
    fcfs = LLM(tiny_llama, kv_cache_gib=0.01, block_size=4, max_num_seqs=2)
    reference = fcfs.generate(prompts, params, use_tqdm=False)
    lengths = [len(o.outputs[0].token_ids) for o in reference]
    oracle = LLM(tiny_llama, kv_cache_gib=0.01, block_size=4, max_num_seqs=2, scheduling_policy="sjf",
                 length_predictor=random_remaining_head)
    outputs = oracle.generate(prompts, params, use_tqdm=False, length_hint=lengths)
    assert [o.predicted_length for o in outputs] == lengths
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in reference]
    # shortest first: with 2 seats, the answers finish in the order of their lengths
    finished = sorted(range(6), key=lambda i: outputs[i].metrics.finished_time)
    assert [lengths[i] for i in finished] == sorted(lengths)
    with pytest.raises(ValueError, match="length_hint must be an integer >= 1"):
        oracle.engine.add_request("bad", prompts[0], params[0], length_hint=0)
    bad = oracle.generate(prompts[:1], params[:1], use_tqdm=False, length_hint=[0])[0]
    assert bad.error and "length_hint" in bad.error


def test_policies_with_the_remaining_head_keep_greedy_outputs(tiny_llama, random_remaining_head):
    prompts = [[(7 * i + j) % 300 + 5 for j in range(6 + (i * 13) % 36)] for i in range(10)]
    params = [SamplingParams(temperature=0, max_tokens=6 + (i * 17) % 37, ignore_eos=True) for i in range(10)]
    expected = [o.outputs[0].token_ids for o in LLM(tiny_llama, kv_cache_gib=0.01, block_size=4).generate(
        prompts, params, use_tqdm=False)]
    llm = LLM(tiny_llama, kv_cache_gib=0.01, block_size=4, max_num_seqs=3, max_num_batched_tokens=32,
              length_predictor=random_remaining_head, length_refresh_tokens=2)
    for policy in ("fcfs", "sjf", "mlfq", "s3"):
        llm.engine.reconfigure_scheduler(policy=policy)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == expected, policy
        assert all(o.predicted_length is not None for o in outputs)
        blocks = llm.engine.block_manager
        assert blocks.num_free_blocks == blocks.num_blocks, policy


def test_reconfigure_needs_a_predictor_for_length_aware_policies(tiny_llama):
    llm = LLM(tiny_llama, kv_cache_gib=0.01, block_size=4)
    with pytest.raises(ValueError, match="needs a length predictor"):
        llm.engine.reconfigure_scheduler(policy="sjf")
    llm.engine.reconfigure_scheduler(max_num_seqs=3)
    assert llm.engine.scheduler.config.max_num_seqs == 3


def test_remaining_head_save_and_load_errors(tmp_path):
    with pytest.raises(ValueError, match="edges must start at 0"):
        RemainingHeadConfig(hidden_size=4, layer=1, edges=[1, 2, 3])
    head = RemainingHead(RemainingHeadConfig(hidden_size=4, layer=1, edges=EDGES, hidden_dim=8))
    head.save(str(tmp_path / "h"))
    assert RemainingHead.load(str(tmp_path / "h"), 4).config == head.config
    with pytest.raises(ValueError, match="for hidden size 4, the model has 8"):
        RemainingHead.load(str(tmp_path / "h"), 8)
    with pytest.raises(ValueError, match="has no remaining_config.json"):
        RemainingHead.load(str(tmp_path))
    config = json.loads((tmp_path / "h" / "remaining_config.json").read_text())
    assert config["layer"] == 1
