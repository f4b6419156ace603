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
from transformers import AutoModelForCausalLM

from foreseer import LLM, LoRARequest, SamplingParams
from foreseer.cli import main
from foreseer.lengths.predictors import (
    LENGTH_CLASS_EDGES,
    LoraPredictor,
    class_lengths,
    class_token_ids,
    create_predictor,
    instruction_prompt,
    length_class,
    length_class_question,
)
from foreseer.outputs import Logprob
from foreseer.training.finetune import ADAPTER_FILES
from foreseer.training.lengths.dataset import LengthRecord
from foreseer.training.lengths.lora import (
    TRAINING_FILE,
    LengthLabel,
    LoraTrainConfig,
    class_loss,
    default_adapter_dir,
    labels_of,
    read_training_record,
    train_length_lora,
    training_examples,
)
from foreseer.training.lengths.traces import TraceRecord

QUESTIONS = ["hello world, how are you today?", "the quick brown fox jumps over the lazy dog.",
             "a paged cache keeps blocks of keys and values.", "answer in one sentence please.",
             "continuous batching schedules every step. 0123456789"]
LENGTHS = [12, 40, 300, 700, 7]
CENSORED = [False, False, False, True, False]  # the fourth stopped at its max_tokens: 700 or more
CLASSES = [0, 1, 4, 5, 0]  # length_class of each: A (up to 32), B (up to 64), E (up to 512), F (up to 1024)
# Enough for the tiny model to learn its labels (about 1 s).
TINY_TRAINING = LoraTrainConfig(epochs=60, lr=2e-2, batch_size=5, dropout=0.0, base_model="tiny-llama")


@pytest.fixture(scope="module")
def lora_llm(tiny_llama) -> LLM:
    return LLM(tiny_llama, kv_cache_gib=0.01, block_size=4, max_num_batched_tokens=64, enable_lora=True)


@pytest.fixture(scope="module")
def labels(lora_llm) -> list[LengthLabel]:
    prompts = [lora_llm.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    return [LengthLabel(p, n, c) for p, n, c in zip(prompts, LENGTHS, CENSORED)]


@pytest.fixture(scope="module")
def adapter(tiny_llama, lora_llm, labels, tmp_path_factory) -> tuple[str, dict]:
    directory = str(tmp_path_factory.mktemp("length_lora"))
    with open(os.path.join(directory, "README.md"), "w") as f:
        f.write("kept\n")
    hf_model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    summary = train_length_lora(hf_model, lora_llm.tokenizer, labels, directory, TINY_TRAINING, log=None)
    return directory, summary


def _hf_class_probabilities(tiny_llama, directory, tokenizer, prompts) -> torch.Tensor:
    """The letters' probabilities from transformers with the adapter merged into the weights, normalized."""
    merged = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                            directory).merge_and_unload().eval()
    letters = class_token_ids(tokenizer)
    rows = []
    with torch.no_grad():
        for prompt in prompts:
            ask = instruction_prompt(tokenizer, prompt, length_class_question())
            probabilities = merged(torch.tensor([ask])).logits[0, -1].softmax(-1)[letters]
            rows.append(probabilities / probabilities.sum())
    return torch.stack(rows)


def test_training_writes_a_peft_adapter_the_engine_serves(adapter, lora_llm, labels):
    directory, summary = adapter
    assert set(os.listdir(directory)) == {*ADAPTER_FILES, TRAINING_FILE, "README.md"}
    assert open(os.path.join(directory, "README.md")).read() == "kept\n"  # PEFT's model card not written
    config = json.load(open(os.path.join(directory, "adapter_config.json")))
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (8, 16, ["q_proj", "v_proj"])
    assert config["base_model_name_or_path"] == "tiny-llama"
    assert read_training_record(directory) == summary
    assert summary["num_examples"] == 5 and summary["steps"] == 60 and summary["censored"] == 1
    assert summary["examples_by_lowest_class"] == [2, 1, 0, 0, 1, 1, 0]
    assert summary["epoch_losses"][-1] < summary["epoch_losses"][0] / 5
    adapter_weights = lora_llm.engine.load_lora(LoRARequest("length", 7, directory))
    assert adapter_weights.rank == 8 and adapter_weights.target_modules == ["q_proj", "v_proj"]
    # The engine, serving the adapter, puts most of each prompt's mass on the classes it was fitted to.
    predictor = create_predictor("lora", lora_llm, weights_dir=directory)
    predicted = predictor.predict([label.prompt_token_ids for label in labels])
    probabilities = torch.stack(predictor.last_probabilities)
    for row, (first, censored) in enumerate(zip(CLASSES, CENSORED)):
        assert (probabilities[row, first:].sum() if censored else probabilities[row, first]) > 0.8
    expected = [round(float(p @ torch.tensor(class_lengths()))) for p in probabilities]
    assert predicted == expected and max(predicted[0], predicted[4]) < predicted[1] < predicted[2] < predicted[3]


def test_the_engines_class_probabilities_match_transformers(adapter, tiny_llama, lora_llm, labels):
    directory, _ = adapter
    predictor = LoraPredictor(lora_llm, directory)
    prompts = [label.prompt_token_ids for label in labels]
    engine = torch.stack(predictor.class_probabilities(prompts))
    reference = _hf_class_probabilities(tiny_llama, directory, lora_llm.tokenizer, prompts)
    # The engine reads the letters among its top 20 tokens (a letter outside them counts as 0): over those
    # letters, the two distributions agree; the letters it missed are the reference's least likely.
    seen = engine > 0
    assert seen.sum() > len(prompts) and (reference.argmax(1) == engine.argmax(1)).all()
    within = torch.where(seen, reference, 0)
    torch.testing.assert_close(engine, within / within.sum(1, keepdim=True), atol=1e-4, rtol=1e-3)
    assert (torch.where(seen, 0, reference).amax(1) <= torch.where(seen, reference, 1).amin(1)).all()


def test_training_examples_and_the_censored_likelihood(tiny_llama, lora_llm, labels):
    examples = training_examples(lora_llm.tokenizer, labels)
    letters = class_token_ids(lora_llm.tokenizer)
    assert [allowed for _, allowed in examples] == [[letters[0]], [letters[1]], [letters[4]], letters[5:],
                                                    [letters[0]]]
    assert examples[0][0] == instruction_prompt(lora_llm.tokenizer, labels[0].prompt_token_ids,
                                                length_class_question())
    assert lora_llm.tokenizer.decode(letters) == "ABCDEFG"
    # The batched, padded loss is the mean over examples of -log P(allowed letters), each run alone.
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        alone = [-model(torch.tensor([prompt])).logits[0, -1].log_softmax(-1)[allowed].logsumexp(0)
                 for prompt, allowed in examples]
        torch.testing.assert_close(class_loss(model, examples, pad_id=0), torch.stack(alone).mean())


def test_labels_of_traces_and_of_length_records(labels):
    trace = TraceRecord("t", [1, 2], 30, 30, True, "s.safetensors", 0, 1.0, list(range(30)))
    length = LengthRecord("q", "question", [3], [512, 100], [0.0, 0.7], 512, 1, 1.0)
    short = LengthRecord("r", "question", [4], [90, 100], [0.0, 0.7], 512, 0, 1.0)
    assert labels_of([trace, length, short]) == [LengthLabel([1, 2], 30, True), LengthLabel([3], 512, True),
                                                 LengthLabel([4], 100, False)]
    assert [length_class(n) for n in (1, 32, 33, 1024, 1025)] == [0, 0, 1, 5, 6]
    assert "A (up to 32 tokens)" in length_class_question() and "G (more)" in length_class_question()


def test_no_letter_among_the_top_tokens_falls_back_to_the_default(adapter, lora_llm, monkeypatch):
    predictor = LoraPredictor(lora_llm, adapter[0], default=333)
    letters = predictor.letter_ids
    seen = {}

    def generate(prompts, params, use_tqdm=True, lora_request=None):
        seen.update(lora_request=lora_request, max_tokens=params.max_tokens, logprobs=params.logprobs)
        tops = [{letters[2]: Logprob(0.0, 1)}, {letters[0] + 1000: Logprob(0.0, 1)}]
        return [SimpleNamespace(outputs=[SimpleNamespace(logprobs=[top])]) for top in tops]

    monkeypatch.setattr(lora_llm, "generate", generate)
    prompt = lora_llm.apply_chat_template([{"role": "user", "content": "hello"}])
    assert predictor.predict([prompt] * 2) == [round(class_lengths()[2]), 333]
    assert seen == {"lora_request": predictor.lora_request, "max_tokens": 1, "logprobs": LoraPredictor.NUM_LOGPROBS}


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


def test_cli_train_and_eval(tiny_llama, labels, tmp_path):
    traces, lengths, out_dir = tmp_path / "traces.jsonl", tmp_path / "lengths.jsonl", str(tmp_path / "adapter")
    with open(traces, "w") as f:  # training reads the prompts and lengths alone, not the shards of states
        for i in range(40):
            label = labels[i % len(labels)]
            record = TraceRecord(f"t{i}", label.prompt_token_ids, min(label.length, 100), 100, label.censored,
                                 "unused.safetensors", 0, 1.0)
            f.write(json.dumps(dataclasses.asdict(record)) + "\n")
    engine = ["--model", tiny_llama, "--kv-cache-gib", "0.01", "--block-size", "4", "--val-fraction", "0.3"]
    assert main(["lengths", "train", "--predictor", "lora", "--data", str(traces), "--output-dir", out_dir,
                 "--lora-epochs", "2", "--lora-rank", "4", "--lora-batch-size", "4", "--limit", "5", *engine]) == 0
    record = read_training_record(out_dir)
    assert record["command"].startswith("foreseer lengths ")  # sys.argv: pytest's here
    dataset = record["dataset"]
    assert dataset["trained_on"] == 5 and dataset["train_prompts"] + dataset["val_prompts"] == 40
    assert record["steps"] == 4 and record["train"]["rank"] == 4
    scores = record["val_scores"]
    assert scores["num_prompts"] == dataset["val_prompts"] and -1 <= scores["tau_prefill"] <= 1
    assert json.load(open(os.path.join(out_dir, "adapter_config.json")))["base_model_name_or_path"] == tiny_llama
    with open(lengths, "w") as f:  # the paper's dataset (`lengths build`) scores it too
        for i in range(2):
            for j, label in enumerate(labels):
                length = LengthRecord(f"q{j}-{i}", QUESTIONS[j], label.prompt_token_ids, [label.length], [0.0], 512,
                                      int(label.censored), 1.0)
                f.write(json.dumps(dataclasses.asdict(length)) + "\n")
    out = str(tmp_path / "eval.json")
    # No --enable-lora: eval turns it on for this predictor.
    assert main(["lengths", "eval", "--predictor", "lora", "--data", str(lengths), "--weights-dir", out_dir,
                 "--output-json", out, *engine]) == 0
    report = json.load(open(out))
    assert report["predictor"] == "lora" and report["metrics"]["num"] > 0
    assert report["extra"]["adapter_dir"] == out_dir and report["extra"]["fallback_share"] == 0


# -- the shipped adapter on the real model ----------------------------------------------------------------------
@pytest.mark.slow
def test_shipped_adapter_on_the_real_model(real_llm):
    directory = default_adapter_dir("smollm2-135m-instruct")
    record = read_training_record(directory)
    assert record["dataset"]["trained_on"] > 0 and record["command"] and record["val_scores"]["num_prompts"] > 0
    assert record["class_edges"] == list(LENGTH_CLASS_EDGES)  # the classes the predictor asks for
    assert os.path.isfile(os.path.join(directory, "README.md"))
    llm = LLM("smollm2-135m-instruct", kv_cache_gib=0.5, enable_lora=True)
    predictor = create_predictor("lora", llm)
    questions = ["Say hi.", "What is 2 + 2?", "Write a detailed essay about the history of the Roman Empire.",
                 "Write a Python function that sorts a list, and explain how it works step by step."]
    prompts = [llm.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    predicted = predictor.predict(prompts)
    assert all(p is not None for p in predictor.last_probabilities)  # it answers with class letters
    assert len(set(predicted)) == 4 and all(isinstance(n, int) and 1 <= n <= 4096 for n in predicted)
    assert predicted[2] == max(predicted)  # the essay; short questions are not told apart well (see its README)
    assert predicted == predictor.predict(prompts)  # deterministic
    # User requests are untouched, alone or batched with the predictor's questions under the adapter.
    params = SamplingParams(temperature=0, max_tokens=24)
    plain = [o.outputs[0].text for o in real_llm.generate(prompts, params, use_tqdm=False)]
    assert [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)] == plain
    asks = [instruction_prompt(llm.tokenizer, p, length_class_question()) for p in prompts]
    mixed = llm.generate(prompts + asks, params, use_tqdm=False,
                         lora_request=[None] * len(prompts) + [predictor.lora_request] * len(asks))
    assert [o.outputs[0].text for o in mixed[:len(prompts)]] == plain
