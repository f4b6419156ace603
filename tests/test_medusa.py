"""Medusa heads: exactness of untrained heads, save/load, errors, a tiny training run, and the shipped heads."""

import argparse
import json
import os

import pytest
import torch

from foreseer.spec.medusa import CONFIG_FILE, WEIGHTS_FILE, MedusaConfig, MedusaHeads, shipped_heads_dir
from foreseer.training import train_medusa
from foreseer.training.train_medusa import (
    IGNORE,
    TrainMedusaArgs,
    add_arguments,
    build_head_data,
    evaluate,
    head_targets,
    load_backbone,
    run,
)

QUESTIONS = ["the quick brown fox", "hello world, how are you today?", "a paged cache keeps blocks",
             "continuous batching schedules every step", "answer in one sentence please", "0123456789",
             "the lazy dog", "keys and values"]


def _random_heads(num_heads: int = 3, hidden_size: int = 16, seed: int = 0) -> MedusaHeads:
    heads = MedusaHeads(MedusaConfig(num_heads=num_heads, hidden_size=hidden_size, base_model="tiny",
                                     training={"note": "random"}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        heads.weight.copy_(torch.randn(heads.weight.shape, generator=generator))
        heads.bias.copy_(torch.randn(heads.bias.shape, generator=generator))
    return heads


@torch.no_grad()
def test_untrained_heads_reproduce_base_logits():
    from foreseer.models.config import ModelConfig
    from foreseer.models.llama import LlamaForCausalLM

    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=300, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      max_position_embeddings=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    hidden = torch.randn(7, 32)
    heads = MedusaHeads(MedusaConfig(num_heads=4, hidden_size=32))
    out = heads(hidden)
    assert out.shape == (4, 7, 32)
    base = model.compute_logits(hidden)
    for i in range(4):
        torch.testing.assert_close(model.compute_logits(out[i]), base, rtol=0, atol=0)


def test_forward_matches_per_head_formula():
    heads = _random_heads()
    hidden = torch.randn(5, 16)
    out = heads(hidden)
    for i in range(3):
        expected = hidden + torch.nn.functional.silu(hidden @ heads.weight[i].t() + heads.bias[i])
        torch.testing.assert_close(out[i], expected)
    # The first k heads alone (a shallow draft runs no more heads than it uses).
    torch.testing.assert_close(heads(hidden, 2), out[:2])


def test_save_load_round_trip(tmp_path):
    heads = _random_heads()
    heads.save(str(tmp_path))
    with open(tmp_path / CONFIG_FILE) as f:
        saved = json.load(f)
    assert saved == {"num_heads": 3, "hidden_size": 16, "base_model": "tiny", "training": {"note": "random"}}
    loaded = MedusaHeads.load(str(tmp_path), hidden_size=16, dtype=torch.float32)
    assert loaded.config == heads.config
    # Stored as fp16: equal to the fp16-rounded originals.
    torch.testing.assert_close(loaded.weight, heads.weight.half().float(), rtol=0, atol=0)
    torch.testing.assert_close(loaded.bias, heads.bias.half().float(), rtol=0, atol=0)
    assert not loaded.training
    assert os.stat(tmp_path / WEIGHTS_FILE).st_mode & 0o044 == 0o044  # readable by all once installed
    half = MedusaHeads.load(str(tmp_path), hidden_size=16, dtype=torch.float16)
    assert half.weight.dtype == torch.float16


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="has no medusa_config.json"):
        MedusaHeads.load(str(tmp_path / "missing"), hidden_size=16)
    _random_heads().save(str(tmp_path))
    with pytest.raises(ValueError, match="hidden size 16, but the model has hidden size 576"):
        MedusaHeads.load(str(tmp_path), hidden_size=576)
    os.remove(tmp_path / WEIGHTS_FILE)
    with pytest.raises(ValueError, match="has no medusa_heads.safetensors"):
        MedusaHeads.load(str(tmp_path), hidden_size=16)
    _random_heads(num_heads=2).save(str(tmp_path / "two"))
    with open(tmp_path / "two" / CONFIG_FILE, "w") as f:
        json.dump({"num_heads": 3, "hidden_size": 16}, f)
    with pytest.raises(ValueError, match="expected"):
        MedusaHeads.load(str(tmp_path / "two"), hidden_size=16)
    with pytest.raises(ValueError, match="num_heads >= 1"):
        MedusaHeads(MedusaConfig(num_heads=0, hidden_size=16))


def test_shipped_heads_dir():
    directory = shipped_heads_dir("smollm2-135m-instruct")
    assert directory is not None and os.path.isfile(os.path.join(directory, WEIGHTS_FILE))
    assert shipped_heads_dir("SmolLM2-135M-Instruct") == directory
    assert shipped_heads_dir("some-other-model") is None


def test_head_targets():
    targets = head_targets([10, 11, 12, 13], num_heads=2)
    assert targets.tolist() == [[11, 12], [12, 13], [13, IGNORE], [IGNORE, IGNORE]]


def test_tiny_training_lowers_the_loss(tiny_llama, tmp_path):
    dataset = tmp_path / "sharegpt.json"
    dataset.write_text(json.dumps([{"conversations": [{"from": "human", "value": q}]} for q in QUESTIONS]))
    args = TrainMedusaArgs(model=tiny_llama, dataset=str(dataset), num_prompts=8, skip_prompts=0, eval_prompts=2,
                           max_tokens=32, num_heads=2, epochs=8, lr=1e-2, batch_size=64, kv_cache_gib=0.01,
                           output_dir=str(tmp_path / "heads"), output_json=str(tmp_path / "report.json"))
    report = run(args)
    assert report["dataset"]["prompts"] == 8 and report["dataset"]["train_prompts"] == 6
    assert report["eval"]["base_top1"] == 1.0  # transformers' hidden states give the engine's greedy tokens
    losses = [epoch["train_loss"] for epoch in report["epochs"]]
    assert losses[-1] < 0.8 * losses[0]
    assert report["eval"]["loss"] < report["eval_untrained"]["loss"]
    heads = MedusaHeads.load(str(tmp_path / "heads"), hidden_size=64)
    assert heads.num_heads == 2 and heads.config.training["dataset"]["train_prompts"] == 6
    assert json.loads((tmp_path / "report.json").read_text())["eval"] == report["eval"]


def test_main_takes_the_cli_namespace(monkeypatch):
    # As `foreseer spec train-medusa` will call it: the namespace also holds the sub-command under "command".
    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    add_arguments(parser)
    seen = []
    monkeypatch.setattr(train_medusa, "run", seen.append)
    assert train_medusa.main(parser.parse_args(["spec", "--num-prompts", "50", "--epochs", "2"])) == 0
    assert seen[0].num_prompts == 50 and seen[0].epochs == 2 and seen[0].num_heads == 4
    assert seen[0].command  # the command line, recorded in the heads' config


def test_hidden_states_are_the_lm_head_input(tiny_llama):
    hf = load_backbone(tiny_llama)
    prompt, answer = [1, 5, 9, 30], [40, 41, 42]
    data = build_head_data(hf, [(prompt, answer)], num_heads=1)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + answer])).logits[0]
    torch.testing.assert_close(data.hidden @ hf.lm_head.weight.t(), logits[len(prompt) - 1:-2])
    assert data.next_tokens.tolist() == [40, 41] and data.targets.tolist() == [[41], [42]]


@pytest.mark.slow
def test_shipped_heads_beat_chance_on_the_models_own_answers(real_llm, hf_real_model):
    from foreseer import SamplingParams

    hf, _ = hf_real_model
    heads = MedusaHeads.load(shipped_heads_dir("smollm2-135m-instruct"), hidden_size=576)
    assert heads.config.base_model == "smollm2-135m-instruct"
    # Questions of our own: not ShareGPT prompts, so not training data.
    questions = ["Explain how a bicycle works.", "Write a short story about a lighthouse keeper."]
    prompts = [real_llm.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    outputs = real_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=96), use_tqdm=False)
    examples = [(p, list(o.outputs[0].token_ids)) for p, o in zip(prompts, outputs)]
    data = build_head_data(hf, examples, heads.num_heads)
    lm_head = hf.get_output_embeddings().weight.detach()
    trained = evaluate(heads, lm_head, data)
    untrained = evaluate(MedusaHeads(MedusaConfig(num_heads=heads.num_heads, hidden_size=576)), lm_head, data)
    assert trained["base_top1"] > 0.95
    print(f"shipped heads on two answers: top-1 {trained['top1']}, top-5 {trained['top5']}; "
          f"untrained top-1 {untrained['top1']}")
    # Chance is 1/49152; the untrained head (the lm_head itself, one token off) gets about 1%. On 4946
    # held-out positions, head 0 was right 25.6% of the time (top-5: 47.6%).
    assert trained["top1"][0] > 0.12 and trained["top1"][0] > untrained["top1"][0] + 0.08
    assert trained["top5"][0] > trained["top1"][0]
