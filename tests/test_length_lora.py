"""The lora length predictor: the model itself with a LoRA adapter trained to state its answer's length (Zheng et
al., 2023), trained with transformers + peft and served by the engine beside user requests."""

from __future__ import annotations

import dataclasses
import json
import os
from types import SimpleNamespace

import peft
import pytest
import torch
from helpers import hf_greedy
from transformers import AutoModelForCausalLM

from foreseer import LLM, LoRARequest, SamplingParams
from foreseer.cli import main
from foreseer.lengths.predictors import (
    LoraPredictor,
    PiaPredictor,
    create_predictor,
    instruction_prompt,
    parse_pia_length,
)
from foreseer.training.finetune import ADAPTER_FILES
from foreseer.training.lengths.dataset import LengthRecord
from foreseer.training.lengths.lora import (
    LENGTH_QUESTION,
    TRAINING_FILE,
    LoraTrainConfig,
    default_adapter_dir,
    read_training_record,
    train_length_lora,
    training_examples,
)

QUESTIONS = ["hello world, how are you today?", "the quick brown fox jumps over the lazy dog.",
             "a paged cache keeps blocks of keys and values.", "answer in one sentence please.",
             "continuous batching schedules every step. 0123456789"]
LABELS = [12, 40, 300, 512, 7]
# Enough for the tiny model to learn its five labels exactly (about 1 s).
TINY_TRAINING = LoraTrainConfig(epochs=60, lr=2e-2, batch_size=5, dropout=0.0, base_model="tiny-llama")


@pytest.fixture(scope="module")
def lora_llm(tiny_llama) -> LLM:
    return LLM(tiny_llama, kv_cache_gib=0.01, block_size=4, max_num_batched_tokens=64, enable_lora=True)


@pytest.fixture(scope="module")
def records(lora_llm) -> list[LengthRecord]:
    prompts = [lora_llm.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    return [LengthRecord(f"q{i}", q, p, [n, n // 2], [0.0, 0.7], 512, 0, 1.0)
            for i, (q, p, n) in enumerate(zip(QUESTIONS, prompts, LABELS))]


@pytest.fixture(scope="module")
def adapter(tiny_llama, lora_llm, records, tmp_path_factory) -> tuple[str, dict]:
    directory = str(tmp_path_factory.mktemp("length_lora"))
    with open(os.path.join(directory, "README.md"), "w") as f:
        f.write("kept\n")
    hf_model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    summary = train_length_lora(hf_model, lora_llm.tokenizer, records, directory, TINY_TRAINING, log=None)
    return directory, summary


def test_training_writes_a_peft_adapter_the_engine_serves(adapter, lora_llm, records):
    directory, summary = adapter
    assert set(os.listdir(directory)) == {*ADAPTER_FILES, TRAINING_FILE, "README.md"}
    assert open(os.path.join(directory, "README.md")).read() == "kept\n"  # PEFT's model card not written
    config = json.load(open(os.path.join(directory, "adapter_config.json")))
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (8, 16, ["q_proj", "v_proj"])
    assert config["base_model_name_or_path"] == "tiny-llama"
    assert read_training_record(directory) == summary
    assert summary["num_examples"] == 5 and summary["steps"] == 60
    assert summary["epoch_losses"][-1] < summary["epoch_losses"][0] / 5
    adapter_weights = lora_llm.engine.load_lora(LoRARequest("length", 7, directory))
    assert adapter_weights.rank == 8 and adapter_weights.target_modules == ["q_proj", "v_proj"]
    # The engine, serving the adapter, states the training labels it was fitted to.
    predictor = create_predictor("lora", lora_llm, weights_dir=directory)
    assert predictor.predict([r.prompt_token_ids for r in records]) == LABELS


def test_training_examples_ask_the_length_question(lora_llm, records):
    (prompt, answer), = training_examples(lora_llm.tokenizer, records[:1])
    assert prompt == instruction_prompt(lora_llm.tokenizer, records[0].prompt_token_ids, LENGTH_QUESTION)
    assert lora_llm.tokenizer.decode(answer) == "12<|im_end|>"


def test_predictions_parse_the_engines_greedy_answer_with_the_adapter(adapter, tiny_llama, lora_llm, records):
    directory, _ = adapter
    predictor = LoraPredictor(lora_llm, directory, default=100, max_length=256, max_tokens=6)
    prompts = [r.prompt_token_ids for r in records]
    predicted = predictor.predict(prompts)
    asks = [instruction_prompt(lora_llm.tokenizer, p, LENGTH_QUESTION) for p in prompts]
    outputs = lora_llm.generate(asks, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False,
                                lora_request=LoRARequest("same adapter", 3, directory))
    texts = [o.outputs[0].text for o in outputs]
    assert predictor.last_texts == texts
    assert predicted == [100 if parse_pia_length(t) is None else min(parse_pia_length(t), 256) for t in texts]
    assert predicted == [12, 40, 256, 256, 7]  # capped at max_length
    # The same answers from transformers with the adapter merged into the weights.
    merged = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                            directory).merge_and_unload().eval()
    assert hf_greedy(merged, asks, 6) == [list(o.outputs[0].token_ids) for o in outputs]


def test_unparseable_answers_fall_back_to_the_default(adapter, lora_llm, monkeypatch):
    predictor = LoraPredictor(lora_llm, adapter[0], default=333)
    seen = {}

    def fake_generate(prompts, params, use_tqdm=True, lora_request=None):
        seen.update(lora_request=lora_request, max_tokens=params.max_tokens, temperature=params.temperature)
        texts = ["no idea", "", "9000000", "600 tokens", "about 45"]
        return [SimpleNamespace(outputs=[SimpleNamespace(text=t)]) for t in texts[:len(prompts)]]

    monkeypatch.setattr(lora_llm, "generate", fake_generate)
    prompt = lora_llm.apply_chat_template([{"role": "user", "content": "hello"}])
    assert predictor.predict([prompt] * 5) == [333, 333, 333, 512, 45]
    assert seen == {"lora_request": predictor.lora_request, "max_tokens": 8, "temperature": 0}


def test_needs_enable_lora_and_a_valid_adapter(tiny_llama, lora_llm, adapter, tmp_path):
    plain = LLM(tiny_llama, kv_cache_gib=0.01, block_size=4)
    with pytest.raises(ValueError, match=r"needs LLM\(\.\.\., enable_lora=True\)"):
        create_predictor("lora", plain, weights_dir=adapter[0])
    with pytest.raises(ValueError, match=r"needs LLM\(\.\.\., enable_lora=True\)"):
        create_predictor("lora", plain)
    with pytest.raises(ValueError, match="no length adapter is shipped"):
        create_predictor("lora", lora_llm)  # a model without a shipped adapter, and no weights_dir
    with pytest.raises(ValueError, match="does not exist"):
        create_predictor("lora", lora_llm, weights_dir=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="default must be in"):
        create_predictor("lora", lora_llm, weights_dir=adapter[0], default=0)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        LoraTrainConfig(epochs=0)
    assert issubclass(LoraPredictor, PiaPredictor)


def test_cli_train_and_eval(tiny_llama, records, tmp_path):
    data, out_dir = str(tmp_path / "lengths.jsonl"), str(tmp_path / "adapter")
    with open(data, "w") as f:
        for i in range(2):
            for r in records:
                f.write(json.dumps(dataclasses.asdict(dataclasses.replace(r, id=f"{r.id}-{i}"))) + "\n")
    engine = ["--model", tiny_llama, "--kv-cache-gib", "0.01", "--block-size", "4", "--val-fraction", "0.3"]
    assert main(["lengths", "train", "--predictor", "lora", "--data", data, "--output-dir", out_dir,
                 "--lora-epochs", "2", "--lora-rank", "4", "--lora-batch-size", "4", "--limit", "5", *engine]) == 0
    record = read_training_record(out_dir)
    assert record["command"].startswith("foreseer lengths ")  # sys.argv: pytest's here
    assert record["dataset"]["records"] == 10 and record["dataset"]["trained_on"] == 5 and record["steps"] == 4
    assert record["train"]["rank"] == 4 and 0 <= record["val_metrics"]["within_100"] <= 1
    assert json.load(open(os.path.join(out_dir, "adapter_config.json")))["base_model_name_or_path"] == tiny_llama
    out = str(tmp_path / "eval.json")
    # No --enable-lora: eval turns it on for this predictor.
    assert main(["lengths", "eval", "--predictor", "lora", "--data", data, "--weights-dir", out_dir,
                 "--output-json", out, *engine]) == 0
    report = json.load(open(out))
    assert report["predictor"] == "lora" and report["metrics"]["num"] == record["val_metrics"]["num"]
    assert report["metrics"] == record["val_metrics"]  # the same engine, greedy
    assert report["extra"]["adapter_dir"] == out_dir and 0 <= report["extra"]["fallback_share"] <= 1


# -- the shipped adapter on the real model ----------------------------------------------------------------------
@pytest.mark.slow
def test_shipped_adapter_on_the_real_model(real_llm):
    directory = default_adapter_dir("smollm2-135m-instruct")
    record = read_training_record(directory)
    assert record["dataset"]["records"] > 0 and record["command"] and record["val_metrics"]["num"] > 0
    assert os.path.isfile(os.path.join(directory, "README.md"))
    llm = LLM("smollm2-135m-instruct", kv_cache_gib=0.5, enable_lora=True)
    predictor = create_predictor("lora", llm)
    questions = ["Say hi.", "What is 2 + 2?", "Write a detailed essay about the history of the Roman Empire.",
                 "Write a Python function that sorts a list, and explain how it works step by step."]
    prompts = [llm.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    predicted = predictor.predict(prompts)
    assert len(predicted) == 4 and all(isinstance(n, int) and 1 <= n <= 512 for n in predicted)
    assert predicted == predictor.predict(prompts)  # deterministic
    assert sum(parse_pia_length(t) is not None for t in predictor.last_texts) >= 3  # it states numbers
    # User requests are untouched, alone or batched with the predictor's questions under the adapter.
    params = SamplingParams(temperature=0, max_tokens=24)
    plain = [o.outputs[0].text for o in real_llm.generate(prompts, params, use_tqdm=False)]
    assert [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)] == plain
    asks = [instruction_prompt(llm.tokenizer, p, LENGTH_QUESTION) for p in prompts]
    mixed = llm.generate(prompts + asks, params, use_tqdm=False,
                         lora_request=[None] * len(prompts) + [predictor.lora_request] * len(asks))
    assert [o.outputs[0].text for o in mixed[:len(prompts)]] == plain
