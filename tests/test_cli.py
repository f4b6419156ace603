"""The command line: generate, chat (streaming, interactive) and bench throughput, run as a user would."""

import json
import subprocess
import sys

import pytest

from foreseer import LLM, SamplingParams

ENGINE = ["--kv-cache-gib", "0.01"]


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "foreseer.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama, kv_cache_gib=0.01)


def test_generate_prints_the_engine_output(tiny_llama, llm):
    result = _cli("generate", "--model", tiny_llama, *ENGINE, "--max-tokens", "12", "--raw", "the quick brown fox")
    assert result.returncode == 0, result.stderr
    expected = llm.generate(["the quick brown fox"], SamplingParams(temperature=0, max_tokens=12),
                            use_tqdm=False)[0].outputs[0].text
    assert result.stdout == expected + "\n"


def test_generate_reports_bad_input(tiny_llama):
    result = _cli("generate", "--model", tiny_llama, *ENGINE, "--temperature", "-1", "hello")
    assert result.returncode == 2 and "SamplingParams.temperature" in result.stderr
    result = _cli("generate", "--model", "no-such-model", "hello")
    assert result.returncode == 2 and "never downloads" in result.stderr


def test_chat_streams_replies_and_keeps_history(tiny_llama, llm):
    result = _cli("chat", "--model", tiny_llama, *ENGINE, "--max-tokens", "10", stdin="hello\nhow are you\n")
    assert result.returncode == 0, result.stderr
    params = SamplingParams(temperature=0, max_tokens=10)
    first = llm.chat([{"role": "user", "content": "hello"}], params, use_tqdm=False)[0].outputs[0].text
    second = llm.chat([{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                       {"role": "user", "content": "how are you"}], params, use_tqdm=False)[0].outputs[0].text
    assert f"> {first}\n> {second}\n" in result.stdout


def test_bench_throughput_compares_with_hf(tiny_llama, tmp_path):
    dataset = tmp_path / "sharegpt.json"
    questions = ["what is a fox?", "count to five", "say hello to the world", "how are you today?"]
    dataset.write_text(json.dumps([
        {"id": str(i), "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "ok"}]}
        for i, q in enumerate(questions)]))
    out = tmp_path / "result.json"
    result = _cli("bench", "throughput", "--model", tiny_llama, *ENGINE, "--dataset", str(dataset),
                  "--num-prompts", "4", "--max-tokens", "16", "--compare", "hf", "float32", "--hf-batch-size", "2",
                  "--output-json", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["foreseer"]["num_requests"] == report["hf"]["num_requests"] == 4
    assert report["identical_outputs"] == 4  # same weights, greedy: same tokens
    assert report["foreseer"]["output_tokens"] == report["hf"]["output_tokens"]
    assert report["speedup_vs_hf"] > 0 and report["compute_limit"]["limit_tokens_per_s"] > 0
    assert "foreseer/hf" in result.stdout
    # The same engine with its weights expanded to float32: the same tokens.
    assert report["float32"]["identical_outputs"] == 4 and report["float32"]["speedup"] > 0


def test_bench_decode_reports_each_figure(tiny_llama, tmp_path):
    """Without llama.cpp (a safetensors model): decode against float32 weights, limits, overhead, attention, RSS."""
    out = tmp_path / "decode.json"
    result = _cli("bench", "decode", "--model", tiny_llama, "--contexts", "16", "40", "--new-tokens", "6",
                  "--repeats", "1", "--attention-contexts", "256", "--no-llamacpp", "--output-json", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert [row["context"] for row in report["decode"]] == [16, 40]
    for row in report["decode"]:
        assert row["foreseer_tokens_per_s"] > 0 and row["vs_float32"] > 0
        assert 0 < row["bandwidth_share"] < 1 and 0 < row["fma_peak_share"] < 1
    assert report["machine"]["fp32_fma_peak_gflops"] > report["machine"]["torch_mm_gflops"] > 0
    overhead = report["step_overhead"]
    for mode in ("fused_layer_ops", "pytorch_layer_ops"):
        assert 0 < overhead[mode]["kernels_ms"] < overhead[mode]["step_ms"]
    assert report["attention"][0]["context_len"] == 256 and report["attention"][0]["speedup"] > 0
    assert report["rss_mb"]["foreseer"] > 100
    assert "decode after 16 tokens" in result.stdout
