"""Response-length prediction: the length dataset, PiA parsing, the predictor interface, the probe, metrics."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest
import torch

from foreseer import LLM, SamplingParams
from foreseer.cli import main
from foreseer.lengths.features import prompt_hidden_states
from foreseer.lengths.predictors import (
    PREDICTORS,
    ConstantPredictor,
    LengthPredictor,
    PiaPredictor,
    ProbePredictor,
    create_predictor,
    instruction_prompt,
    parse_pia_length,
    register,
)
from foreseer.lengths.probe import ProbeConfig, ProbeHead, TrainConfig, default_probe_dir, train_probe
from foreseer.training.lengths.dataset import (
    BuildConfig,
    LengthRecord,
    build,
    load_records,
    record_split,
    sharegpt_questions,
    split_records,
)
from foreseer.training.lengths.evaluate import evaluate, generation_ms_per_answer, kendall_tau, length_metrics

QUESTIONS = [
    ("q0", "hello world, how are you today?"),
    ("q1", "the quick brown fox jumps over the lazy dog."),
    ("q2", "a paged cache keeps blocks of keys and values."),
    ("q3", "answer in one sentence please."),
    ("q4", "continuous batching schedules every step. 0123456789"),
]
TINY_BUILD = BuildConfig(max_tokens=6, max_prompt_tokens=64, max_prompts_in_flight=2)


@pytest.fixture(scope="module")
def tiny_llm(tiny_llama):
    return LLM(tiny_llama, kv_cache_gib=0.01, block_size=4, max_num_batched_tokens=64)


def _record(record_id: str, lengths: list[int], prompt: list[int] | None = None, seconds: float = 1.0):
    return LengthRecord(record_id, "question", prompt or [1, 2, 3], lengths, [0.0] * len(lengths), 512,
                        0, seconds)


# -- dataset ------------------------------------------------------------------------------------------------
def test_build_records_every_sample_and_resumes(tiny_llm, tmp_path):
    path = str(tmp_path / "lengths.jsonl")
    first = build(tiny_llm, QUESTIONS[:3], path, TINY_BUILD, use_tqdm=False)
    assert (first.num_new, first.num_skipped, first.num_records) == (3, 0, 3)
    records = load_records(path)
    assert sorted(r.id for r in records) == ["q0", "q1", "q2"]
    for record in records:
        assert len(record.lengths) == 4 and record.temperatures == [0.0, 0.3, 0.5, 0.7]
        assert all(1 <= n <= 6 for n in record.lengths) and record.max_length == max(record.lengths)
        assert record.num_truncated == sum(n == 6 for n in record.lengths)
        assert record.prompt_token_ids == tiny_llm.apply_chat_template(
            [{"role": "user", "content": dict(QUESTIONS)[record.id]}])
    with open(path, "a") as f:
        f.write('{"id": "q3", "quest')  # a build killed mid-write
    second = build(tiny_llm, QUESTIONS, path, TINY_BUILD, use_tqdm=False)
    assert (second.num_new, second.num_skipped, second.num_records) == (2, 3, 5)
    resumed = {r.id: r for r in load_records(path)}
    assert sorted(resumed) == [q for q, _ in QUESTIONS]
    assert all(resumed[r.id] == r for r in records)  # kept as they were
    # Seeds come from the prompt id: a single run samples what the interrupted one did.
    fresh = {r.id: r.lengths for r in load_records(_built(tiny_llm, QUESTIONS, str(tmp_path / "fresh.jsonl")))}
    assert fresh == {i: r.lengths for i, r in resumed.items()}


def _built(llm, questions, path: str) -> str:
    build(llm, questions, path, TINY_BUILD, use_tqdm=False)
    return path


def test_build_rejects_bad_input(tiny_llm, tmp_path):
    with pytest.raises(ValueError, match="unique"):
        build(tiny_llm, [("a", "x"), ("a", "y")], str(tmp_path / "x.jsonl"), TINY_BUILD)
    with pytest.raises(ValueError, match="temperatures"):
        BuildConfig(temperatures=())
    with pytest.raises(ValueError, match="max_tokens"):
        BuildConfig(max_tokens=0)


def test_load_records_names_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_records(str(path))
    with pytest.raises(ValueError, match="not found"):
        load_records(str(tmp_path / "missing.jsonl"))


def test_split_is_deterministic_by_prompt_id():
    ids = [f"sharegpt-{i}" for i in range(2000)]
    splits = [record_split(i, 0.1) for i in ids]
    assert splits == [record_split(i, 0.1) for i in ids]
    assert 0.07 < splits.count("val") / len(ids) < 0.13
    records = [_record(i, [5]) for i in ids[:200]]
    train, val = split_records(records, 0.1)
    assert len(train) + len(val) == 200 and {r.id for r in val} == {r.id for r in records if
                                                                    record_split(r.id, 0.1) == "val"}
    assert split_records(list(reversed(records)), 0.1)[1] == list(reversed(val))  # file order does not matter
    with pytest.raises(ValueError, match="val_fraction"):
        record_split("x", 1.0)


def test_sharegpt_questions_drop_repeats(tmp_path):
    conversations = [{"conversations": [{"from": "human", "value": text}]} for text in ["a", "b", "a", "c", "b"]]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(conversations))
    assert sharegpt_questions(str(path), 4, skip=1) == [("sharegpt-1", "b"), ("sharegpt-3", "c")]


# -- PiA --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("150", 150),
    ("About 200 tokens.", 200),
    ("My answer will have 42 tokens.", 42),
    ("1,200 tokens", 1200),
    ("1.5k tokens", 1500),
    ("100-150 tokens", 150),  # a range: its upper end, since the label is a maximum
    ("250 to 300", 300),
    ("about 120 words", 160),  # words become tokens
    ("1. First, I will explain. About 300 tokens.", 300),  # list numbering is not a length
    ("150.\n\nThe answer is 150.", 150),
    ("Estimated length: 300", 300),
    ("~250", 250),
])
def test_parse_pia_length_good(text, expected):
    assert parse_pia_length(text) == expected


@pytest.mark.parametrize("text", [
    "", "\n\n", "Sure! Here is my answer.", "many tokens", "Your answer will be a single number of tokens.",
    "The answer to this question is 1.",  # a number, but not a stated length
    "I was released in 2023 and I am 135M parameters.",
])
def test_parse_pia_length_malformed(text):
    assert parse_pia_length(text) is None


@pytest.mark.parametrize("text", ["0", "0 tokens", "-5 tokens", "99999", "1e9", "20k tokens"])
def test_parse_pia_length_absurd(text):
    assert parse_pia_length(text) is None


def test_instruction_prompt_splices_before_the_generation_prompt(tiny_llm):
    tokenizer = tiny_llm.tokenizer
    prompt = tiny_llm.apply_chat_template([{"role": "user", "content": "hello world"}])
    asked = instruction_prompt(tokenizer, prompt, "answer")
    assert tokenizer.decode(asked) == tokenizer.decode(
        tiny_llm.apply_chat_template([{"role": "user", "content": "hello world\n\nanswer"}]))
    with pytest.raises(ValueError, match="generation prompt"):
        instruction_prompt(tokenizer, prompt[:-1], "answer")


@dataclass
class _Completion:
    text: str


@dataclass
class _Output:
    outputs: list[_Completion]


class _ScriptedLLM:
    """Answers every generate call with fixed texts: PiA's parsing and fallback without a model."""

    def __init__(self, tokenizer, texts: list[str]) -> None:
        self.tokenizer = tokenizer
        self.texts = texts
        self.prompts: list[list[int]] = []

    def generate(self, prompts, params, use_tqdm=True):
        self.prompts = prompts
        assert params.temperature == 0
        return [_Output([_Completion(t)]) for t in self.texts]


def test_pia_predictor_parses_clamps_and_falls_back(tiny_llm):
    texts = ["About 120 tokens.", "I cannot tell.", "99999", "800 tokens"]
    llm = _ScriptedLLM(tiny_llm.tokenizer, texts)
    predictor = PiaPredictor(llm, default=200, max_length=512)
    prompts = [tiny_llm.apply_chat_template([{"role": "user", "content": q}]) for _, q in QUESTIONS[:4]]
    assert predictor.predict(prompts) == [120, 200, 200, 512]
    assert predictor.last_texts == texts
    assert all(len(asked) > len(prompt) for asked, prompt in zip(llm.prompts, prompts))
    with pytest.raises(ValueError, match="default"):
        PiaPredictor(llm, default=0)


def test_pia_predictor_on_a_model(tiny_llm):
    prompts = [tiny_llm.apply_chat_template([{"role": "user", "content": q}]) for _, q in QUESTIONS]
    predicted = create_predictor("pia", tiny_llm, default=300).predict(prompts)
    assert len(predicted) == len(prompts) and all(1 <= n <= 512 for n in predicted)


# -- the interface and registry ---------------------------------------------------------------------------------
def test_registry_selects_by_name(tiny_llm):
    assert {"pia", "probe", "constant"} <= set(PREDICTORS)
    assert create_predictor("constant", tiny_llm, value=7).predict([[1], [2, 3]]) == [7, 7]
    with pytest.raises(ValueError, match="unknown length predictor 'oracle'"):
        create_predictor("oracle", tiny_llm)
    with pytest.raises(ValueError, match="already registered"):
        register(ConstantPredictor)
    with pytest.raises(ValueError, match="no probe is shipped"):
        create_predictor("probe", tiny_llm)


def test_registered_predictor_is_usable_by_name(tiny_llm):
    class PromptLength(LengthPredictor):
        name = "prompt-length"

        @classmethod
        def create(cls, llm, **options):
            return cls()

        def predict(self, prompts):
            return [len(p) for p in prompts]

    register(PromptLength)
    try:
        assert create_predictor("prompt-length", tiny_llm).predict([[1, 2], [3]]) == [2, 1]
    finally:
        del PREDICTORS["prompt-length"]


# -- hidden states and the probe ------------------------------------------------------------------------------
def test_prompt_hidden_states_match_transformers(tiny_llama, tiny_llm):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    prompts = [tiny_llm.apply_chat_template([{"role": "user", "content": q}]) for _, q in QUESTIONS]
    prompts.append(prompts[0][:5])
    free = tiny_llm.engine.block_manager.num_free_blocks
    ours = prompt_hidden_states(tiny_llm.engine, prompts, max_batch_tokens=40)  # several forward passes
    assert tiny_llm.engine.block_manager.num_free_blocks == free  # borrowed blocks are given back
    assert ours.shape == (len(prompts), 64) and ours.dtype == torch.float32
    with torch.no_grad():
        for row, prompt in zip(ours, prompts):
            expected = hf(torch.tensor([prompt]), output_hidden_states=True).hidden_states[-1][0, -1]
            torch.testing.assert_close(row, expected, rtol=1e-4, atol=1e-4)
    # The engine still generates as before.
    greedy = tiny_llm.generate(prompts[:2], use_tqdm=False)
    assert all(o.error is None for o in greedy)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        prompt_hidden_states(tiny_llm.engine, [[1, 2], []])
    with pytest.raises(ValueError, match="outside"):
        prompt_hidden_states(tiny_llm.engine, [[10**6]])


def _synthetic(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states whose first dimension decides the length, up to some noise."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, 16, generator=generator)
    labels = (260 + 200 * hidden[:, 0].clamp(-1, 1)).long() + torch.randint(-20, 20, (n,), generator=generator)
    return hidden, torch.randint(10, 300, (n,), generator=generator), labels


@pytest.mark.parametrize("kind", ["regression", "buckets"])
def test_probe_learns_and_round_trips(kind, tmp_path):
    hidden, prompt_lengths, labels = _synthetic(300)
    config = ProbeConfig(hidden_size=16, kind=kind, hidden_dim=32, base_model="tiny", training={"note": "test"})
    head = train_probe(config, hidden, prompt_lengths, labels, TrainConfig(epochs=150, lr=1e-2))
    test_hidden, test_lengths, test_labels = _synthetic(100, seed=1)
    predicted = head.predict(test_hidden, test_lengths)
    assert length_metrics(predicted, test_labels.tolist()).within_100 > 0.9
    assert all(1 <= p <= 512 for p in predicted)
    head.save(str(tmp_path / "probe"))
    loaded = ProbeHead.load(str(tmp_path / "probe"), hidden_size=16)
    assert loaded.config == head.config
    assert loaded.predict(test_hidden, test_lengths) == predicted
    with pytest.raises(ValueError, match="hidden size 16"):
        ProbeHead.load(str(tmp_path / "probe"), hidden_size=64)
    with pytest.raises(ValueError, match="has no probe_config.json"):
        ProbeHead.load(str(tmp_path))
    with pytest.raises(ValueError, match=r"must be \[N, 16\]"):
        loaded.predict(torch.zeros(2, 8), torch.ones(2))


def test_bucket_prediction_is_the_most_likely_window():
    probs = torch.zeros(3, 16)
    probs[0, 0] = 1  # all mass on lengths 1..32
    probs[1, 15] = 1  # all mass on 481..512
    probs[2, [2, 12]] = torch.tensor([0.3, 0.7])  # two modes: the likelier one wins
    head = ProbeHead(ProbeConfig(hidden_size=4, kind="buckets", hidden_dim=0))
    head.net[0].weight.data.zero_()
    for row, expected in zip(probs, [(1, 32), (481, 512), (385, 416)]):
        head.net[0].bias.data.copy_(row.clamp(min=1e-9).log())
        (prediction,) = head.predict(torch.zeros(1, 4), torch.ones(1))
        assert expected[0] <= prediction <= expected[1]


def test_probe_config_rejects_bad_values():
    with pytest.raises(ValueError, match="kind"):
        ProbeConfig(hidden_size=4, kind="quantiles")
    with pytest.raises(ValueError, match="hidden_dim"):
        ProbeConfig(hidden_size=4, hidden_dim=-1)
    with pytest.raises(ValueError, match="at least 2 examples"):
        train_probe(ProbeConfig(hidden_size=4), torch.zeros(1, 4), torch.ones(1), torch.ones(1))


def test_probe_predictor_on_a_model(tiny_llm, tmp_path):
    head = ProbeHead(ProbeConfig(hidden_size=64, kind="regression", hidden_dim=0))
    head.save(str(tmp_path))
    predictor = create_predictor("probe", tiny_llm, weights_dir=str(tmp_path))
    prompts = [tiny_llm.apply_chat_template([{"role": "user", "content": q}]) for _, q in QUESTIONS]
    predicted = predictor.predict(prompts)
    assert predicted == predictor.predict_from_hidden(prompt_hidden_states(tiny_llm.engine, prompts),
                                                      [len(p) for p in prompts])
    with pytest.raises(ValueError, match="hidden size 8"):
        ProbePredictor(tiny_llm, ProbeHead(ProbeConfig(hidden_size=8)))


# -- metrics ------------------------------------------------------------------------------------------------------
def test_metrics_against_hand_computed_values():
    metrics = length_metrics([100, 200, 300, 400], [150, 200, 500, 390])
    assert (metrics.num, metrics.mae, metrics.within_50, metrics.within_100) == (4, 65.0, 0.75, 0.75)
    assert metrics.kendall_tau == pytest.approx(4 / 6)  # 5 concordant pairs, 1 discordant
    assert kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / 6**0.5)  # tau-b with a tie (scipy: 0.8165)
    assert kendall_tau([3, 2, 1], [1, 2, 3]) == pytest.approx(-1.0)
    assert kendall_tau([5, 5, 5], [1, 2, 3]) == 0.0
    with pytest.raises(ValueError, match="as many predictions"):
        length_metrics([1, 2], [1])


def test_evaluate_reports_overhead_share():
    records = [_record("a", [10, 30], seconds=2.0), _record("b", [100, 50], seconds=6.0)]
    assert generation_ms_per_answer(records) == pytest.approx(2000.0)  # 8 s for 4 answers
    report = evaluate(ConstantPredictor(40), records)
    assert report.metrics.mae == pytest.approx((10 + 60) / 2)
    assert report.generation_ms == pytest.approx(2000.0)
    assert report.overhead_share == pytest.approx(report.overhead_ms / 2000.0)
    assert report.items == [{"id": "a", "label": 30, "prediction": 40}, {"id": "b", "label": 100, "prediction": 40}]
    with pytest.raises(ValueError, match="no records"):
        evaluate(ConstantPredictor(40), [])


# -- the command line ---------------------------------------------------------------------------------------------
def test_cli_build_train_eval(tiny_llama, tmp_path):
    conversations = [{"conversations": [{"from": "human", "value": f"{q} {i}"}]} for i, (_, q) in
                     enumerate(QUESTIONS * 2)]
    dataset = tmp_path / "sharegpt.json"
    dataset.write_text(json.dumps(conversations))
    data, probe_dir = str(tmp_path / "lengths.jsonl"), str(tmp_path / "probe")
    engine = ["--model", tiny_llama, "--kv-cache-gib", "0.01", "--block-size", "4", "--val-fraction", "0.3"]
    assert main(["lengths", "build", "--output", data, "--dataset", str(dataset), "--num-prompts", "10",
                 "--skip-prompts", "0", "--max-tokens", "5", "--max-prompt-tokens", "64", *engine]) == 0
    assert len(load_records(data)) == 10
    assert main(["lengths", "train", "--predictor", "probe", "--data", data, "--output-dir", probe_dir, "--epochs", "5",
                 "--hidden-dim", "8", *engine]) == 0
    config = json.load(open(os.path.join(probe_dir, "probe_config.json")))
    assert config["training"]["command"].startswith("foreseer lengths ")
    assert config["training"]["dataset"]["records"] == 10 and config["hidden_dim"] == 8
    for name in ("probe", "pia", "constant"):
        out = str(tmp_path / f"{name}.json")
        extra = ["--weights-dir", probe_dir] if name == "probe" else []
        command = ["lengths", "eval", "--predictor", name, "--data", data, "--output-json", out, *extra, *engine]
        assert main(command) == 0
        report = json.load(open(out))
        assert report["predictor"] == name and 0 <= report["metrics"]["within_100"] <= 1
        assert report["overhead_ms"] > 0 and len(report["items"]) == report["metrics"]["num"]
    assert main(["lengths", "eval", "--predictor", "oracle", "--data", data, *engine]) == 2


# -- the shipped probe on the real model ----------------------------------------------------------------------------
@pytest.mark.slow
def test_shipped_probe_on_the_real_model(real_llm):
    config = json.load(open(os.path.join(default_probe_dir("smollm2-135m-instruct"), "probe_config.json")))
    assert config["training"]["dataset"]["records"] > 0 and config["training"]["command"]
    predictor = create_predictor("probe", real_llm)
    questions = ["Say hi.", "What is 2 + 2?", "Write a detailed essay about the history of the Roman Empire.",
                 "Write a Python function that sorts a list, and explain how it works step by step."]
    prompts = [real_llm.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    predicted = predictor.predict(prompts)
    assert len(predicted) == 4 and all(1 <= n <= 512 for n in predicted)
    assert predicted == predictor.predict(prompts)  # deterministic


def test_shipped_remaining_head_on_the_real_model(real_llm):
    from foreseer.lengths.remaining import CONFIG_FILE, default_head_dir

    config = json.load(open(os.path.join(default_head_dir("smollm2-135m-instruct"), CONFIG_FILE)))
    assert config["training"]["dataset"]["train_prompts"] > 0 and config["training"]["command"]
    assert 1 <= config["layer"] <= 30
    predictor = create_predictor("remaining", real_llm, quantile=0.5)
    questions = ["Say hi.", "Write a detailed essay about the history of the Roman Empire, century by century."]
    prompts = [real_llm.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    short, essay = predictor.predict(prompts)
    assert 1 <= short < essay  # the head orders an obvious pair
    answer = real_llm.generate(prompts[1:], SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0]
    (refined,) = predictor.refine(prompts[1:], [answer.outputs[0].token_ids])
    assert refined > 32  # the whole answer, predicted again after 32 of its tokens
