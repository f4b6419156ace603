"""bench lora: multi-LoRA throughput over N adapters against the base model and the naive merge-one-at-a-time way;
the naive way's merge is exact and its unmerge restores the weights bit for bit."""

import json
from collections import Counter

import peft
import torch
from transformers import AutoModelForCausalLM

from foreseer import LLM
from foreseer.bench.lora import (
    assign_adapters,
    merge_adapter,
    read_adapter,
    unmerge_adapter,
    weights_fingerprint,
    write_random_adapter,
)
from foreseer.cli import main
from foreseer.layers.quantized_linear import QuantizedLinear

QUESTIONS = ["what is a fox?", "count to five", "say hello to the world", "how are you today?",
             "what does a paged cache keep?", "why is the dog lazy?"]


def test_bench_lora_cli_reports_every_cell_and_matches_the_naive_way(tiny_llama, tmp_path):
    dataset = tmp_path / "sharegpt.json"
    dataset.write_text(json.dumps([{"id": str(i), "conversations": [{"from": "human", "value": q}]}
                                   for i, q in enumerate(QUESTIONS)]))
    out, plot = tmp_path / "lora.json", tmp_path / "lora.png"
    status = main(["bench", "lora", "--model", tiny_llama, "--kv-cache-gib", "0.01", "--dataset", str(dataset),
                   "--num-adapters", "1", "3", "--num-prompts", "6", "--max-tokens", "8",
                   "--max-prompt-tokens", "64", "--repeats", "2", "--output-json", str(out), "--plot", str(plot)])
    assert status == 0
    assert plot.read_bytes().startswith(b"\x89PNG")
    report = json.loads(out.read_text())
    assert report["repeats"] == 2
    assert report["adapters"]["shipped"] == []  # none ship for this model: random adapters only
    assert (report["max_loras"], report["max_lora_rank"]) == (8, 64)
    assert report["base"]["output_tokens"] == 6 * 8
    cells = {(r["num_adapters"], r["popularity"]): r for r in report["results"]}
    assert set(cells) == {(1, "uniform"), (1, "zipf"), (3, "uniform"), (3, "zipf")}
    for (num, _), row in cells.items():
        assert 1 <= row["distinct_adapters"] <= num
        for run in ("base", "lora", "naive"):  # each cell times all three ways itself
            assert row[run]["output_tokens"] == 6 * 8 and row[run]["output_tokens_per_s"] > 0
        assert row["ratio_to_base"] == row["lora"]["output_tokens_per_s"] / row["base"]["output_tokens_per_s"]
        assert row["naive"]["merges"] == row["distinct_adapters"]
        # The cell's adapters were read into host memory before the clock started: none was read while timed.
        assert row["lora"]["sync_loads"] == row["lora"]["prefetch_loads"] == 0 and row["lora"]["adapter_read_s"] > 0
        for ratio in ("ratio_to_base", "ratio_to_n1", "ratio_to_naive"):
            assert row[ratio] > 0
        # Batched LoRA gives, request for request, the greedy tokens of the adapter merged into the weights.
        assert row["identical_to_naive"] == 6 and row["mismatched_prompts"] == []
    assert cells[1, "uniform"]["ratio_to_n1"] == 1.0
    assert report["weights_restored"] is True
    goals = report["goals"]
    assert goals["n512_vs_n1"]["value"] is None and goals["vs_naive_at_64"]["value"] is None  # not run
    assert goals["overhead_vs_base"]["value"] is not None


def test_merge_is_peft_merge_and_unmerge_restores_bit_for_bit(tiny_llama, tmp_path):
    llm = LLM(tiny_llama, kv_cache_gib=0.01)
    model = llm.engine.runner.model
    path = write_random_adapter(str(tmp_path / "random"), model, rank=16, seed=3, scale=0.5,
                                target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    original_qkv = model.model.layers[1].self_attn.qkv_proj.dequantize()  # the bfloat16 weights, kept as stored
    fingerprint = weights_fingerprint(model)
    saved = merge_adapter(model, read_adapter(model, path))

    hf = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                        path).merge_and_unload()
    layer = model.model.layers[1]
    theirs = hf.model.layers[1]
    q, kv = model.shard_sizes("qkv_proj")[:2]
    qkv = layer.self_attn.qkv_proj.weight
    inter = model.config.intermediate_size
    pairs = [(qkv[:q], theirs.self_attn.q_proj.weight), (qkv[q:q + kv], theirs.self_attn.k_proj.weight),
             (qkv[q + kv:], theirs.self_attn.v_proj.weight),
             (layer.self_attn.o_proj.weight, theirs.self_attn.o_proj.weight),
             (layer.mlp.gate_up_proj.weight[:inter], theirs.mlp.gate_proj.weight),
             (layer.mlp.gate_up_proj.weight[inter:], theirs.mlp.up_proj.weight),
             (layer.mlp.down_proj.weight, theirs.mlp.down_proj.weight)]
    for ours, peft_merged in pairs:
        torch.testing.assert_close(ours, peft_merged, rtol=1e-5, atol=1e-6)
    assert not torch.equal(qkv[:q], original_qkv[:q])  # it did change
    assert torch.equal(qkv[q:q + kv], original_qkv[q:q + kv])  # k: no LoRA

    unmerge_adapter(model, saved)
    assert weights_fingerprint(model) == fingerprint
    assert isinstance(model.model.layers[1].self_attn.qkv_proj, QuantizedLinear)  # stored format again
    assert all(torch.equal(p, original[name]) for name, p in model.named_parameters())


def test_adapter_popularity():
    uniform = Counter(assign_adapters(4000, 8, "uniform", 1.0, seed=0))
    zipf = Counter(assign_adapters(4000, 8, "zipf", 1.0, seed=0))
    assert set(uniform) == set(zipf) == set(range(8))
    assert max(uniform.values()) < 1.3 * min(uniform.values())
    assert [k for k, _ in zipf.most_common(3)] == [0, 1, 2] and zipf[0] > 5 * zipf[7]
    assert assign_adapters(50, 8, "zipf", 1.0, seed=0) == assign_adapters(50, 8, "zipf", 1.0, seed=0)
