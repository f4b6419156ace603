"""Multi-LoRA: PEFT adapters loaded and applied per request in one mixed batch, exact against transformers + peft."""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import shutil

import peft
import pytest
import torch
from conftest import make_tiny_model
from helpers import hf_greedy, make_adapter, random_prompts
from transformers import AutoModelForCausalLM

from foreseer import LLM, LoRARequest, SamplingParams
from foreseer.lora import ops
from foreseer.lora.backends import CpuLoRABackend, TritonLoRABackend

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PARAMS = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@functools.cache
def merged_reference(base: str, adapter: str | None):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval()


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory) -> dict[str, LoRARequest]:
    """X: every projection, rank 8; Y: rsLoRA, rank 4, three projections; Z: rank 16 by "all-linear"."""
    root = tmp_path_factory.mktemp("adapters")
    specs = {
        "x": dict(r=8, lora_alpha=16, target_modules=ALL_MODULES),
        "y": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True),
        "z": dict(r=16, lora_alpha=8, target_modules="all-linear"),
    }
    return {name: LoRARequest(name, i + 1, make_adapter(tiny_llama, str(root / name), seed=i, **spec))
            for i, (name, spec) in enumerate(specs.items())}


@pytest.fixture(scope="module")
def lora_llm(tiny_llama) -> LLM:
    # A small block size and token budget force chunked prefill and many blocks per request.
    return LLM(tiny_llama, kv_cache_gib=0.01, block_size=4, max_num_batched_tokens=24, enable_lora=True,
               max_lora_rank=16)


def _expected(base: str, prompts: list[list[int]], loras: list[LoRARequest | None]) -> list[list[int]]:
    """Each prompt alone on transformers, with its adapter merged into the weights."""
    expected = {}
    for lora in dict.fromkeys(loras):
        model = merged_reference(base, None if lora is None else lora.lora_path)
        indices = [i for i, other in enumerate(loras) if other == lora]
        for i, tokens in zip(indices, hf_greedy(model, [prompts[i] for i in indices], PARAMS.max_tokens)):
            expected[i] = tokens
    return [expected[i] for i in range(len(prompts))]


# -- ops ------------------------------------------------------------------------------------------------------


def _random_stack(in_features: int, out_sizes: list[int], ranks: list[int | None], seed: int = 0):
    """Slots with these ranks (None: no adapter); each adapts a different subset of the shards."""
    g = torch.Generator().manual_seed(seed)
    per_slot = []
    for slot, rank in enumerate(ranks):
        if rank is None:
            per_slot.append(None)
            continue
        present = [(slot + shard) % 3 != 1 or len(out_sizes) == 1 for shard in range(len(out_sizes))]
        per_slot.append([(torch.randn(rank, in_features, generator=g), torch.randn(out, rank, generator=g))
                         if keep else None for out, keep in zip(out_sizes, present)])
    return per_slot, ops.build_stack(per_slot, out_sizes, torch.device("cpu"))


def _loop_reference(y, x, token_slots, per_slot, out_sizes):
    y = y.clone()
    for t, slot in enumerate(token_slots.tolist()):
        if slot < 0 or per_slot[slot] is None:
            continue
        offset = 0
        for pair, out in zip(per_slot[slot], out_sizes):
            if pair is not None:
                a, b = pair
                y[t, offset:offset + out] += (x[t] @ a.t()) @ b.t()
            offset += out
    return y


@pytest.mark.parametrize("out_sizes", [[24], [32, 16, 16]])
def test_bgmv_and_sgmv_match_a_per_token_loop(out_sizes):
    per_slot, stack = _random_stack(20, out_sizes, [4, None, 16, 2, 8])
    torch.manual_seed(0)
    x = torch.randn(13, 20)
    y = torch.randn(13, sum(out_sizes))
    token_slots = torch.tensor([0, 2, -1, 3, 0, 1, 2, 2, -1, 4, 3, 4, 0])
    expected = _loop_reference(y, x, token_slots, per_slot, out_sizes)
    got = y.clone()
    ops.bgmv(got, x, token_slots, stack)
    # Deltas of about 20 summed in another order than the loop's: float32 rounding of about 1e-5.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    # Segments: rows 0-3 slot 2, 4-5 none, 6-11 slot 0, 12 slot 4.
    starts, lengths, slots = [0, 4, 6, 12], [4, 2, 6, 1], [2, -1, 0, 4]
    segment_slots = torch.tensor(sum(([s] * n for s, n in zip(slots, lengths)), []))
    got = y.clone()
    ops.sgmv(got, x, starts, lengths, slots, stack)
    torch.testing.assert_close(got, _loop_reference(y, x, segment_slots, per_slot, out_sizes), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("out_sizes", [[24], [32, 16, 16]])
def test_cpu_kernels_match_a_per_token_loop(out_sizes):
    """The C++ backend (the engine's CPU path): groups of a few rows (hand-written) and of many (BLAS), contiguous
    or scattered, adapters of several ranks, some shards not adapted, rows without an adapter."""
    backend = CpuLoRABackend()
    per_slot, stack = _random_stack(20, out_sizes, [4, None, 16, 2, 8])
    torch.manual_seed(1)
    x = torch.randn(40, 20)
    y = torch.randn(40, sum(out_sizes))
    token_slots = torch.tensor([0, 2, -1, 3, 0, 1, 2, 2, -1, 3, 3, 1, 0]  # scattered
                               + [2] * 12 + [-1] * 3 + [4] * 9 + [0] * 3)  # long runs: slot 4 contiguous
    expected = _loop_reference(y, x, token_slots, per_slot, out_sizes)
    got = y.clone()
    groups = ops.token_groups(token_slots)
    sizes = {g.slot: len(range(40)[g.rows]) if isinstance(g.rows, slice) else len(g.rows) for g in groups}
    assert sizes == {0: 6, 1: 2, 2: 15, 3: 3, 4: 9} and isinstance(groups[-1].rows, slice)
    backend.add(got, x, backend.prepare(groups, x.device), stack)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_stack_keeps_each_adapter_at_its_own_rank():
    _, stack = _random_stack(20, [32, 16, 16], [4, 16, 2])
    # Each slot adapts two of the three shards, at its own rank: no padding to the largest.
    assert [s.a_t.shape[1] for s in stack.slots] == [2 * 4, 2 * 16, 2 * 2]
    assert stack.packed.a.shape[0] == 2 * (4 + 16 + 2)  # the kernels' buffer packs them as they are


def _triton_ops(monkeypatch):
    """triton_ops on this machine: compiled on a GPU, else in Triton's interpreter (set before its first import)."""
    pytest.importorskip("triton", reason="triton is not installed")
    if torch.cuda.is_available():
        return importlib.import_module("foreseer.lora.triton_ops"), torch.device("cuda")
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    module = importlib.import_module("foreseer.lora.triton_ops")
    if not isinstance(module._shrink_kernel, InterpretedFunction):
        pytest.skip("foreseer.lora.triton_ops was imported without TRITON_INTERPRET=1 and there is no GPU")
    return module, torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_triton_kernels_match_ops(monkeypatch, dtype):
    triton_ops, device = _triton_ops(monkeypatch)
    out_sizes = [40, 24, 24]
    per_slot, _ = _random_stack(36, out_sizes, [4, None, 16, 8, 20])
    per_slot = [None if s is None else [None if p is None else (p[0].to(dtype) / 4, p[1].to(dtype) / 4) for p in s]
                for s in per_slot]
    stack = ops.build_stack(per_slot, out_sizes, device)
    x = torch.randn(19, 36).to(dtype=dtype, device=device)
    y = torch.randn(19, sum(out_sizes)).to(dtype=dtype, device=device)
    token_slots = torch.tensor([0, 2, -1, 3, 0, 1, 2, 2, -1, 4, 3, 4, 0, 2, 2, 2, 2, 2, 4])
    for groups in (ops.token_groups(token_slots),  # BGMV: scattered rows per adapter
                   ops.segment_groups([0, 3, 9], [3, 6, 10], [4, -1, 2])):  # SGMV: contiguous segments
        expected, got = y.clone(), y.clone()
        ops.add_lora(expected, x, groups, stack)
        groups = [ops.RowGroup(g.slot, g.rows if isinstance(g.rows, slice) else g.rows.to(device)) for g in groups]
        triton_ops.add_lora(got, x, triton_ops.KernelGroups.build(groups, device), stack)
        tolerance = {} if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(got, expected, **tolerance)


# -- the engine -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine_args", [{}, {"max_loras": 1, "speculative_config": {"method": "ngram"}}],
                         ids=["plain", "one_idle_adapter_and_ngram_drafts"])
def test_mixed_adapter_batch_matches_merged_peft(tiny_llama, adapters, engine_args):
    """Adapters X, Y, Z and none in one batch, with staggered lengths and chunked prefill: each request's greedy
    output equals transformers with its adapter merged, run alone. Also with more adapters in use than max_loras,
    and with drafts verified under each request's adapter."""
    llm = LLM(tiny_llama, kv_cache_gib=0.01, block_size=4, max_num_batched_tokens=24, enable_lora=True,
              **engine_args)
    lengths = [3, 17, 40, 9, 26, 1, 33, 12]
    loras = [adapters["x"], adapters["y"], None, adapters["z"], adapters["x"], adapters["y"], adapters["z"], None]
    # Each prompt twice over: n-grams to draft from.
    prompts = [p * 2 for p in random_prompts(llm.engine.model_config.vocab_size, lengths)]
    expected = _expected(tiny_llama, prompts, loras)
    outputs = llm.generate(prompts, PARAMS, use_tqdm=False, lora_request=loras)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    if "speculative_config" in engine_args:
        # Drafts were verified under the requests' adapters (how many are accepted, and whether the engine drafts
        # again after a rejection, follows its measured timings: a clean CI run accepted none of 3).
        assert llm.engine.spec_stats.num_verifications > 0


def test_triton_kernels_in_the_engine(tiny_llama, adapters, monkeypatch):
    """The model's projections through the kernels (the GPU path; interpreted here): still exact."""
    _triton_ops(monkeypatch)
    llm = LLM(tiny_llama, kv_cache_gib=0.01, block_size=4, max_num_batched_tokens=24, enable_lora=True)
    llm.engine.lora.backend = TritonLoRABackend()
    prompts = random_prompts(llm.engine.model_config.vocab_size, [7, 19, 4], seed=5)
    loras = [adapters["x"], adapters["z"], None]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
    assert [o.outputs[0].token_ids for o in outputs] == [e[:4] for e in _expected(tiny_llama, prompts, loras)]


def test_adapters_change_the_output(tiny_llama, adapters, lora_llm):
    prompt = random_prompts(lora_llm.engine.model_config.vocab_size, [20], seed=3)[0]
    loras = [None, adapters["x"], adapters["y"], adapters["z"]]
    outputs = lora_llm.generate([prompt] * 4, PARAMS, use_tqdm=False, lora_request=loras)
    assert len({tuple(o.outputs[0].token_ids) for o in outputs}) == 4


def test_gqa_qwen2_with_biases(tiny_qwen2, tmp_path):
    lora = LoRARequest("q", 1, make_adapter(tiny_qwen2, str(tmp_path / "q"), seed=5, r=8, lora_alpha=32,
                                            target_modules=["k_proj", "o_proj", "gate_proj"], use_rslora=True))
    llm = LLM(tiny_qwen2, kv_cache_gib=0.01, block_size=4, max_num_batched_tokens=24, enable_lora=True)
    prompts = random_prompts(llm.engine.model_config.vocab_size, [5, 30, 14], seed=1)
    loras = [lora, None, lora]
    outputs = llm.generate(prompts, PARAMS, use_tqdm=False, lora_request=loras)
    assert [o.outputs[0].token_ids for o in outputs] == _expected(tiny_qwen2, prompts, loras)


def test_prefix_cache_is_not_shared_across_adapters(tiny_llama, adapters, lora_llm):
    prompt = random_prompts(lora_llm.engine.model_config.vocab_size, [22], seed=7)[0]
    x, y = adapters["x"], adapters["y"]
    expected = _expected(tiny_llama, [prompt] * 3, [x, y, None])
    lora_llm.reset_prefix_cache()
    first = lora_llm.generate([prompt], PARAMS, use_tqdm=False, lora_request=x)[0]
    assert first.outputs[0].token_ids == expected[0]
    # The same prompt under Y and the base model finds none of X's cached blocks, and computes its own output.
    others = lora_llm.generate([prompt, prompt], PARAMS, use_tqdm=False, lora_request=[y, None])
    assert [o.metrics.num_cached_tokens for o in others] == [0, 0]
    assert [o.outputs[0].token_ids for o in others] == expected[1:]
    # Under X again it does reuse them.
    again = lora_llm.generate([prompt], PARAMS, use_tqdm=False, lora_request=x)[0]
    assert again.metrics.num_cached_tokens > 0
    assert again.outputs[0].token_ids == expected[0]
    assert len({x.cache_salt, y.cache_salt, None}) == 3


def test_requests_set_adapter_and_cache_salt(adapters, lora_llm):
    engine = lora_llm.engine
    engine.add_request("salted", [5, 6, 7], PARAMS, lora_request=adapters["x"])
    engine.add_request("plain", [5, 6, 7], PARAMS)
    salted, plain = (engine.parents[i].sequences[0].request for i in ("salted", "plain"))
    assert salted.lora_request == adapters["x"] and salted.cache_salt == adapters["x"].cache_salt
    assert plain.lora_request is None and plain.cache_salt is None
    for request_id in ("salted", "plain"):
        engine.abort_request(request_id)


def test_bin_checkpoint_loads_like_safetensors(adapters, lora_llm, tmp_path):
    from safetensors.torch import load_file

    from foreseer.lora.adapter import base_targets, load_adapter

    source = adapters["y"].lora_path
    copy_dir = tmp_path / "bin"
    os.makedirs(copy_dir)
    torch.save(load_file(os.path.join(source, "adapter_model.safetensors")), copy_dir / "adapter_model.bin")
    shutil.copy(os.path.join(source, "adapter_config.json"), copy_dir)
    model = lora_llm.engine.runner.model
    args = (base_targets(model), len(model.model.layers), 16, torch.float32)
    original, copy = load_adapter(source, *args), load_adapter(str(copy_dir), *args)
    assert (copy.rank, copy.scaling, copy.target_modules) == (4, 8 / 2, ["q_proj", "v_proj", "down_proj"])  # rsLoRA
    assert copy.weights.keys() == original.weights.keys()
    for key, shards in original.weights.items():
        for pair, other in zip(shards, copy.weights[key]):
            assert (pair is None) == (other is None)
            if pair is not None:
                assert all(torch.equal(t, u) for t, u in zip(pair, other))


def test_idle_adapters_are_evicted_least_recently_used_first(tiny_llama, adapters):
    llm = LLM(tiny_llama, kv_cache_gib=0.01, enable_lora=True, max_loras=2)
    manager = llm.engine.lora
    x, y, z = adapters["x"], adapters["y"], adapters["z"]
    llm.engine.add_request("busy", [5, 6, 7], PARAMS, lora_request=x)  # X is in use until it finishes
    manager.load(y)
    manager.load(z)  # evicts Y, the least recently used idle one
    assert manager.loaded_ids == [x.lora_int_id, z.lora_int_id]
    manager.load(y)  # every other adapter busy or recent: Z goes, X stays
    assert manager.loaded_ids == [x.lora_int_id, y.lora_int_id]
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    manager.load(z)  # X is idle now, but ran after Y was loaded: Y, least recently used, goes
    assert manager.loaded_ids == [x.lora_int_id, z.lora_int_id]


# -- errors ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_adapters(tiny_llama, tmp_path_factory, adapters) -> dict[str, tuple[str, str]]:
    """name -> (adapter directory, what the error must say)."""
    root = tmp_path_factory.mktemp("bad_adapters")
    os.makedirs(root / "no_config")
    other_base = make_tiny_model(str(root / "other_base"), hidden_size=32, intermediate_size=64)
    biased = root / "biased"
    make_adapter(tiny_llama, str(biased), seed=0, r=4, target_modules=["q_proj"])
    with open(biased / "adapter_config.json") as f:
        config = json.load(f)
    with open(biased / "adapter_config.json", "w") as f:
        json.dump({**config, "bias": "all"}, f)
    return {
        "missing": (str(root / "missing"), "does not exist"),
        "no_config": (str(root / "no_config"), "no adapter_config.json"),
        "lm_head": (make_adapter(tiny_llama, str(root / "lm_head"), seed=0, r=4, target_modules=["q_proj", "lm_head"]),
                    "unsupported modules ['lm_head']"),
        "dora": (make_adapter(tiny_llama, str(root / "dora"), seed=0, r=4, target_modules=["q_proj"], use_dora=True),
                 "DoRA"),
        "rank": (make_adapter(tiny_llama, str(root / "rank"), seed=0, r=32, target_modules=["v_proj"]),
                 "rank 32, above max_lora_rank 16"),
        "other_base": (make_adapter(other_base, str(root / "other_base_lora"), seed=0, r=4, target_modules=["q_proj"]),
                       "does not fit the base model"),
        "bias": (str(biased), "bias='all'"),
    }


@pytest.mark.parametrize("name", ["missing", "no_config", "lm_head", "dora", "rank", "other_base", "bias"])
def test_bad_adapter_is_refused_and_others_complete(tiny_llama, adapters, lora_llm, bad_adapters, name):
    path, message = bad_adapters[name]
    bad = LoRARequest(name, 100, path)
    with pytest.raises(ValueError, match=re.escape(message)):
        lora_llm.engine.add_request("bad", [5, 6, 7], PARAMS, lora_request=bad)
    assert not lora_llm.engine.has_unfinished_requests()
    prompts = random_prompts(lora_llm.engine.model_config.vocab_size, [6, 11, 4], seed=2)
    loras = [adapters["x"], bad, None]
    outputs = lora_llm.generate(prompts, PARAMS, use_tqdm=False, lora_request=loras)
    assert message in outputs[1].error and outputs[1].outputs[0].finish_reason == "error"
    expected = _expected(tiny_llama, [prompts[0], prompts[2]], [loras[0], None])
    assert [outputs[0].outputs[0].token_ids, outputs[2].outputs[0].token_ids] == expected


def test_lora_request_needs_enable_lora(tiny_llama, adapters):
    llm = LLM(tiny_llama, kv_cache_gib=0.01)
    with pytest.raises(ValueError, match="enable_lora=True"):
        llm.engine.add_request("r", [5, 6, 7], PARAMS, lora_request=adapters["x"])
    outputs = llm.generate([[5, 6, 7], [8, 9]], PARAMS, use_tqdm=False, lora_request=[adapters["x"], None])
    assert "enable_lora=True" in outputs[0].error
    assert len(outputs[1].outputs[0].token_ids) == PARAMS.max_tokens


def test_lora_request_validation():
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("a", 0, "/tmp/a")
    with pytest.raises(ValueError, match="max_lora_rank"):
        LLM("unused", enable_lora=True, max_lora_rank=0)
