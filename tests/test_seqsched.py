"""Offline batching strategies: static batches and sequence scheduling (sorting, binning, FCR, VBS) generate
exactly what plain generation does, in the caller's order."""

import math

import pytest
import torch

from foreseer import LLM, SamplingParams
from foreseer.lengths.batching import SequenceScheduling, StaticBatching
from foreseer.lengths.predictors import ConstantPredictor, KnownLengthPredictor, ProbePredictor
from foreseer.lengths.probe import ProbeConfig, ProbeHead

ENGINE = dict(block_size=4, max_num_batched_tokens=64)


def _workload():
    prompts = [list(range(3 + i, 9 + 3 * (i % 4) + i)) for i in range(10)]
    lengths = [5, 30, 12, 3, 22, 17, 8, 26, 1, 14]  # each answer's true length (ignore_eos: its max_tokens)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    return prompts, lengths, params


@pytest.fixture(scope="module")
def tiny_engine(tiny_llama):
    return LLM(tiny_llama, kv_cache_gib=0.002, **ENGINE)


@pytest.fixture(scope="module")
def reference(tiny_engine):
    prompts, _, params = _workload()
    return [o.outputs[0].token_ids for o in tiny_engine.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    head = ProbeHead(ProbeConfig(hidden_size=64, kind="regression", hidden_dim=16, max_length=40))
    with torch.no_grad():  # spread the outputs so that prompts fall into different bins
        head.net[-1].weight.normal_(0, 0.5)
        head.net[-1].bias.fill_(0.5)
    directory = str(tmp_path_factory.mktemp("probe"))
    head.save(directory)
    return directory


def test_every_schedule_gives_plain_generations_text_in_the_callers_order(tiny_engine, reference, probe_dir):
    prompts, _, params = _workload()
    probe = ProbePredictor(tiny_engine, ProbeHead.load(probe_dir, 64))
    strategies = [
        "continuous", "static", StaticBatching(batch_size=3), SequenceScheduling(probe),
        SequenceScheduling(probe, group_size=4, bin_width=8, fcr=False, vbs=False, batch_size=2),
        SequenceScheduling(probe, group_size=6, bin_width=5, fcr=True, vbs=False, batch_size=3),
        SequenceScheduling(ConstantPredictor(10), bin_width=4),
    ]
    for strategy in strategies:
        outputs = tiny_engine.generate(prompts, params, use_tqdm=False, batching=strategy)
        assert [o.prompt_token_ids for o in outputs] == prompts, strategy
        assert [o.outputs[0].token_ids for o in outputs] == reference, strategy
    assert len(set(probe.predict(prompts))) > 2  # the probe really spread the queries over bins


def test_seqsched_by_name_uses_the_shipped_head_and_reports_bad_names(tiny_engine):
    prompts, _, params = _workload()
    with pytest.raises(ValueError, match="unknown batching 'padded'"):
        tiny_engine.generate(prompts, params, batching="padded")
    with pytest.raises(ValueError, match="no remaining-length head is shipped"):  # the tiny model has none
        tiny_engine.generate(prompts, params, use_tqdm=False, batching="seqsched")


def _edge(length: int, width: int) -> int:
    return max(math.ceil(length / width), 1) * width


def test_fcr_recomputes_exactly_the_queries_cut_off_at_their_batchs_edge(tiny_engine, reference):
    prompts, lengths, params = _workload()
    predicted = [6, 12, 8, 2, 30, 9, 9, 28, 4, 10]  # some under, some over the truth
    width, size = 5, 4
    strategy = SequenceScheduling(KnownLengthPredictor({tuple(p): n for p, n in zip(prompts, predicted)}),
                                  bin_width=width, fcr=True, vbs=False, batch_size=size)
    outputs = tiny_engine.generate(prompts, params, use_tqdm=False, batching=strategy)
    assert [o.outputs[0].token_ids for o in outputs] == reference
    # Batches of 4 in predicted order, each limited to its longest member's bin edge; a member is cut where its
    # answer is longer than that.
    order = sorted(range(len(prompts)), key=lambda i: predicted[i])
    limit = {}
    for start in range(0, len(order), size):
        batch = order[start:start + size]
        limit.update((i, _edge(predicted[batch[-1]], width)) for i in batch)
    cut = {outputs[i].request_id for i in range(len(prompts)) if lengths[i] > limit[i]}
    assert set(strategy.stats.recomputed) == cut and len(cut) == 3
    assert strategy.stats.batch_limits[:3] == [10, 15, 26]  # the last batch: its longest max_tokens, under 30
    assert strategy.stats.useful_tokens == sum(lengths)
    # The cut-off attempts decoded their batch's edge first, then everything again.
    wasted = sum(limit[i] for i in range(len(prompts)) if lengths[i] > limit[i])
    assert strategy.stats.generated_tokens == sum(lengths) + wasted
    # The recomputation runs at the full limits.
    assert strategy.stats.batch_limits[-1] == max(lengths[i] for i in range(len(prompts)) if lengths[i] > limit[i])


def test_vbs_fills_the_kv_cache_at_each_batchs_limit_and_never_overflows(tiny_llama, reference):
    prompts, lengths, params = _workload()
    small = LLM(tiny_llama, kv_cache_gib=0.00012, **ENGINE)  # about 60 blocks: not all ten queries at once
    blocks = small.engine.block_manager
    truth = KnownLengthPredictor({tuple(p): n for p, n in zip(prompts, lengths)})  # the oracle: no failures
    strategy = SequenceScheduling(truth, bin_width=10, fcr=True, vbs=True)
    outputs = small.generate(prompts, params, use_tqdm=False, batching=strategy)
    assert [o.outputs[0].token_ids for o in outputs] == reference
    assert strategy.stats.num_recomputed == 0
    assert all(o.metrics.num_preemptions == 0 for o in outputs)  # every batch fit in the KV cache

    def need(members: list[int], limit: int) -> int:
        return sum(blocks.blocks_needed(len(prompts[i]) + limit) for i in members)

    # Batches come in predicted order at their longest member's bin edge (here under it: its max_tokens, which the
    # oracle predicts); each is as large as the cache allows.
    by_length = sorted(range(len(prompts)), key=lambda i: lengths[i])
    start = 0
    for size, limit in zip(strategy.stats.batch_sizes, strategy.stats.batch_limits):
        members = by_length[start:start + size]
        assert limit == min(_edge(lengths[members[-1]], 10), lengths[members[-1]])
        assert need(members, limit) <= blocks.num_blocks
        if start + size < len(prompts):  # the batch stopped only because the next query would not fit
            following = by_length[start + size]
            assert need(members + [following], lengths[following]) > blocks.num_blocks
        start += size
    assert start == len(prompts)
    assert strategy.stats.batch_sizes[0] > strategy.stats.batch_sizes[-1]  # short answers get larger batches


def test_a_bins_last_queries_share_a_batch_with_the_next_bin(tiny_engine, reference):
    """A few queries left over from a bin join the next bin's batch (at its edge) rather than make their own."""
    prompts, lengths, params = _workload()
    predicted = [1, 1, 1, 11, 11, 11, 21, 21, 21, 21]  # three bins of 10 tokens, of 3, 3 and 4 queries
    strategy = SequenceScheduling(KnownLengthPredictor({tuple(p): n for p, n in zip(prompts, predicted)}),
                                  bin_width=10, fcr=False, vbs=False, batch_size=4)
    outputs = tiny_engine.generate(prompts, params, use_tqdm=False, batching=strategy)
    assert [o.outputs[0].token_ids for o in outputs] == reference
    assert strategy.stats.batch_sizes == [4, 4, 2]  # not [3, 3, 4]


def test_static_batches_run_in_arrival_order_with_padding_accounted(tiny_engine, reference):
    prompts, lengths, params = _workload()
    strategy = StaticBatching(batch_size=4)
    outputs = tiny_engine.generate(prompts, params, use_tqdm=False, batching=strategy)
    assert [o.outputs[0].token_ids for o in outputs] == reference
    assert strategy.stats.batch_sizes == [4, 4, 2]
    padded = 4 * max(lengths[:4]) + 4 * max(lengths[4:8]) + 2 * max(lengths[8:])
    assert strategy.stats.padded_tokens == padded
    assert strategy.stats.useful_share == pytest.approx(sum(lengths) / padded)
    # Batches do not overlap: each starts after the previous one's last member finished.
    finish = [o.metrics.finished_time for o in outputs]
    start = [o.metrics.first_scheduled_time for o in outputs]
    assert min(start[4:8]) >= max(finish[:4]) and min(start[8:]) >= max(finish[4:8])


def test_padded_batches_decode_until_their_last_member_ends_and_cut_outputs_exactly(tiny_engine):
    prompts, lengths, _ = _workload()
    plain = tiny_engine.generate(prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                                 use_tqdm=False)
    # Each prompt stops at a token its answer reaches at a different point (a stop token acts as its EOS).
    stops = [[o.outputs[0].token_ids[n - 1]] for o, n in zip(plain, lengths)]
    params = [SamplingParams(temperature=0, max_tokens=30, stop_token_ids=s, logprobs=2) for s in stops]
    expected = tiny_engine.generate(prompts, params, use_tqdm=False)
    ended = [len(o.outputs[0].token_ids) for o in expected]
    assert len(set(ended)) > 3 and all(o.outputs[0].finish_reason == "stop" for o in expected)
    for strategy in (StaticBatching(batch_size=4, padded=True),
                     SequenceScheduling(KnownLengthPredictor({tuple(p): n for p, n in zip(prompts, ended)}),
                                        bin_width=8, fcr=True, vbs=False, batch_size=3, padded=True)):
        outputs = tiny_engine.generate(prompts, params, use_tqdm=False, batching=strategy)
        for got, want in zip(outputs, expected):
            a, b = got.outputs[0], want.outputs[0]
            assert (a.token_ids, a.text, a.finish_reason, a.stop_reason) == (b.token_ids, b.text, b.finish_reason,
                                                                              b.stop_reason)
            assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob)
            assert len(a.logprobs) == len(b.logprobs)
        # Padding was decoded: every member of a batch ran as long as its longest member.
        assert strategy.stats.generated_tokens >= strategy.stats.padded_tokens - len(prompts)
        assert strategy.stats.useful_tokens == sum(ended) < strategy.stats.generated_tokens
    static = StaticBatching(batch_size=4, padded=True)
    tiny_engine.generate(prompts, params, use_tqdm=False, batching=static)
    assert static.stats.padded_tokens == sum(len(chunk) * max(chunk) for chunk in (ended[:4], ended[4:8], ended[8:]))
