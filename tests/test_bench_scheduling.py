"""`foreseer bench seqsched` (the sequence scheduling ablation) and `foreseer bench serve --policies` end to end
on a tiny model: every schedule's answers equal continuous batching's, and the reports hold every figure."""

import json
import subprocess
import sys

import pytest
import torch

from foreseer.lengths.probe import ProbeConfig, ProbeHead

ENGINE = ["--kv-cache-gib", "0.01", "--block-size", "4", "--max-num-batched-tokens", "64"]
QUESTIONS = ["what is a fox?", "count to five", "say hello to the world", "how are you today?", "the lazy dog",
             "continuous batching schedules every step", "hello", "a paged cache keeps blocks"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "foreseer.cli", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture()
def dataset(tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([
        {"id": str(i), "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "ok"}]}
        for i, q in enumerate(QUESTIONS)]))
    return str(path)


@pytest.fixture()
def buckets_probe(tmp_path) -> str:
    torch.manual_seed(0)
    head = ProbeHead(ProbeConfig(hidden_size=64, kind="buckets", hidden_dim=16, num_buckets=4, max_length=32))
    with torch.no_grad():
        head.net[-1].weight.normal_(0, 2.0)
    directory = str(tmp_path / "probe")
    head.save(directory)
    return directory


def test_bench_seqsched_runs_every_schedule_with_the_same_answers(tiny_llama, dataset, buckets_probe, tmp_path):
    out = tmp_path / "seqsched.json"
    options = json.dumps({"weights_dir": buckets_probe, "quantile": 0.9})
    result = _cli("bench", "seqsched", "--model", tiny_llama, *ENGINE, "--dataset", dataset, "--num-prompts", "8",
                  "--max-tokens", "24", "--group-size", "5", "--bin-width", "8", "--predictor", "probe",
                  "--predictor-options", options,
                  "--padded", "--length-predictor", buckets_probe, "--output-json", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert list(rows) == ["continuous", "static", "sort_bin", "sort_bin_fcr", "sort_bin_vbs", "seqsched",
                          "seqsched_oracle", "continuous_sjf"]
    useful = rows["continuous"]["useful_tokens"]
    for name, row in rows.items():
        assert row["identical_to_continuous"] == 8, name
        assert row["useful_tokens"] == useful, name
        assert row["samples_per_s"] > 0 and row["speedup_vs_static"] > 0
        assert 0 < row["useful_share"] <= 1
    assert rows["static"]["speedup_vs_static"] == 1.0
    assert rows["seqsched_oracle"]["num_recomputed"] == 0  # true lengths never cut an answer short
    assert rows["seqsched_oracle"]["share_of_oracle_gain"] == pytest.approx(1.0)
    assert rows["static"]["share_of_oracle_gain"] == 0.0
    assert rows["continuous"]["useful_share"] == 1.0
    assert "sequence scheduling (all)" in result.stdout


@pytest.fixture()
def remaining_head(tmp_path) -> str:
    from foreseer.lengths.remaining import RemainingHead, RemainingHeadConfig

    torch.manual_seed(0)
    head = RemainingHead(RemainingHeadConfig(hidden_size=64, layer=1, edges=[0, 2, 4, 8, 16, 32], hidden_dim=16))
    with torch.no_grad():
        head.net[-1].weight.normal_(0, 2.0)
    directory = str(tmp_path / "remaining")
    head.save(directory)
    return directory


def test_bench_seqsched_with_the_remaining_head_and_answer_lengths(tiny_llama, dataset, remaining_head, tmp_path):
    """The remaining-length head bins by its 0.9 quantile and re-bins FCR failures by a refined prediction; every
    prompt asks for its dataset answer's length."""
    out = tmp_path / "seqsched.json"
    options = json.dumps({"weights_dir": remaining_head, "quantile": 0.9})
    result = _cli("bench", "seqsched", "--model", tiny_llama, *ENGINE, "--dataset", dataset, "--num-prompts", "8",
                  "--max-tokens", "24", "--max-tokens-from-answers", "--group-size", "8", "--bin-width", "4",
                  "--predictor-options", options, "--rows", "static", "seqsched", "seqsched_oracle",
                  "--output-json", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["predictor"] == "remaining" and report["max_tokens_from_answers"]
    for name, row in report["rows"].items():
        assert row["identical_to_continuous"] == 8, name
    assert report["mean_max_tokens"] < 24  # "ok" answers are short


def test_bench_policies_on_a_burst(tiny_llama, dataset, remaining_head, tmp_path):
    out = tmp_path / "burst.json"
    result = _cli("bench", "policies", "--model", tiny_llama, *ENGINE, "--dataset", dataset, "--num-prompts", "8",
                  "--max-tokens-cap", "24", "--seats", "2", "4", "--length-predictor", remaining_head,
                  "--output-json", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert list(report["rows"]) == [f"{p}@{n}" for n in (2, 4) for p in ("fcfs", "sjf", "sjf-oracle", "mlfq", "s3")]
    for name, row in report["rows"].items():
        assert row["same_answers"] == 8, name
        assert row["p99_latency_s"] >= row["p50_latency_s"] > 0 and row["longest_wait_s"] >= row["mean_ttft_s"]
        assert row["p99_vs_fcfs"] > 0
    for seats in (2, 4):
        assert report["rows"][f"sjf-oracle@{seats}"]["share_of_oracle_gain"] in (None, pytest.approx(1.0))
    assert report["rows"]["sjf@2"]["predictor_share"] > 0
    assert "sjf-oracle" in result.stdout


def test_bench_serve_starts_a_server_per_policy(tiny_llama, dataset, tmp_path):
    out, plot = tmp_path / "policies.json", tmp_path / "policies.png"
    result = _cli("bench", "serve", "--dataset", dataset, "--num-prompts", "6", "--max-tokens", "8",
                  "--policies", "fcfs", "priority", "--request-rates", "20", "inf",
                  "--server-args", f"--model {tiny_llama} --kv-cache-gib 0.01 --max-num-seqs 2",
                  "--output-json", str(out), "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert [(r["policy"], r["request_rate"]) for r in report["results"]] == [
        ("fcfs", 20.0), ("fcfs", "inf"), ("priority", 20.0), ("priority", "inf")]
    for row in report["results"]:
        assert row["completed"] == 6 and row["failed"] == 0
        assert row["ttft_ms"]["max"] >= row["ttft_ms"]["p99"] >= row["ttft_ms"]["p50"] > 0
        assert row["e2e_latency_ms"]["p99"] >= row["e2e_latency_ms"]["p50"]
    assert plot.stat().st_size > 1000
    assert "max wait" in result.stdout


def test_output_lengths_from_the_dataset_answers(tiny_llama, tmp_path):
    """--output-len-from-dataset: each request asks for its dataset answer's length in tokens, capped at
    --max-tokens (vLLM's ShareGPT serving workload); conversations without an answer are skipped."""
    from foreseer.bench.serve import ServeBenchArgs, request_lengths
    from foreseer.models.loader import load_tokenizer, resolve_model

    answers = ["ok", "the quick brown fox", "a long answer " * 20]
    conversations = [{"conversations": [{"from": "human", "value": "no answer here"}]}] + [
        {"conversations": [{"from": "human", "value": f"question {i}"}, {"from": "gpt", "value": a}]}
        for i, a in enumerate(answers)]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(conversations))
    args = ServeBenchArgs(dataset=str(path), num_prompts=3, max_tokens=12, output_len_from_dataset=True,
                          tokenizer=tiny_llama)
    questions, lengths = request_lengths(args)
    tokenizer = load_tokenizer(resolve_model(tiny_llama))
    counts = [len(tokenizer.encode(a, add_special_tokens=False)) for a in answers]
    assert questions == ["question 0", "question 1", "question 2"]
    assert lengths == [min(12, c) for c in counts] and lengths[-1] == 12 and lengths[0] < 12
    fixed = request_lengths(ServeBenchArgs(dataset=str(path), num_prompts=3, max_tokens=12))
    assert fixed == (["no answer here", "question 0", "question 1"], [12, 12, 12])
