"""The command line: generate, chat (streaming, interactive) and bench throughput, run as a user would."""

import argparse
import dataclasses
import json
import subprocess
import sys

import pytest

from foreseer import LLM, SamplingParams
from foreseer.cli import build_parser
from foreseer.commands import field_comments, from_args
from foreseer.config import CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig

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
    result = _cli("serve", "--model", tiny_llama, "--protect-metrics")
    assert result.returncode == 2 and "--protect-metrics needs --api-key" in result.stderr


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
    assert list(overhead) == ["fused_decoder", "modules_cpp_layer_ops", "modules_pytorch_layer_ops"]
    for mode in overhead:
        assert 0 < overhead[mode]["kernels_ms"] < overhead[mode]["step_ms"]
    assert overhead["modules_pytorch_layer_ops"]["overhead_vs_fused_decoder"] > 0
    assert report["attention"][0]["context_len"] == 256 and report["attention"][0]["speedup"] > 0
    assert report["rss_mb"]["foreseer"] > 100
    assert "decode after 16 tokens" in result.stdout


def _actions(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, action) of every action of the parser and of its sub-commands, recursively."""
    for action in parser._actions:
        yield path, action
        if isinstance(action, argparse._SubParsersAction):
            yield from ((path, choice) for choice in action._choices_actions)
            for name, sub in action.choices.items():
                yield from _actions(sub, (*path, name))


def test_every_flag_and_command_has_help():
    missing = [f"foreseer {' '.join(path)}: {'/'.join(action.option_strings) or action.dest}"
               for path, action in _actions(build_parser())
               if not isinstance(action, argparse._HelpAction) and not action.help]
    assert not missing, "no help text:\n" + "\n".join(missing)


def test_engine_flags_default_to_the_config_and_keep_their_spellings():
    args = build_parser().parse_args(["generate", "hi"])
    engine = {f.name for f in dataclasses.fields(EngineConfig)} - {"cache", "scheduler", "lora"}
    engine |= {f.name for c in (CacheConfig, SchedulerConfig, LoRAConfig) for f in dataclasses.fields(c)}
    assert EngineConfig.from_kwargs(**{name: getattr(args, name) for name in engine}) == EngineConfig()
    args = build_parser().parse_args([
        "generate", "hi", "--scheduling-policy", "sjf", "--no-prefix-caching", "--enable-lora", "--max-cpu-loras", "20",
        "--lora-memory", "unified", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}',
        "--kv-cache-gib", "0.5", "--max-num-seqs", "8", "--block-size", "32", "--weight-format", "float32",
        "--mlfq-levels", "3", "--max-wait-s", "2", "--seed", "7", "--length-predictor", "probe"])
    config = EngineConfig.from_kwargs(**{name: getattr(args, name) for name in engine})
    assert (config.scheduler.policy, config.scheduler.max_num_seqs, config.scheduler.mlfq_levels,
            config.scheduler.max_wait_s) == ("sjf", 8, 3, 2.0)
    assert (config.cache.enable_prefix_caching, config.cache.kv_cache_gib, config.cache.block_size) == (False, 0.5, 32)
    assert (config.lora.enable_lora, config.lora.max_cpu_loras, config.lora.lora_memory) == (True, 20, "unified")
    assert config.speculative_config.num_speculative_tokens == 3
    assert (config.weight_format, config.seed, config.length_predictor) == ("float32", 7, "probe")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "hi", "--scheduling-policy", "no-such-policy"])


def test_bench_flags_fill_their_arguments_dataclass():
    from foreseer.bench.decode import DecodeBenchArgs
    from foreseer.bench.lora import LoRABenchArgs

    args = build_parser().parse_args(["bench", "decode", "--contexts", "16", "40", "--no-llamacpp"])
    assert from_args(DecodeBenchArgs, args) == DecodeBenchArgs(contexts=(16, 40), llamacpp=False)
    args = build_parser().parse_args(["bench", "lora", "--popularity", "zipf", "--dataset", "d.json"])
    assert from_args(LoRABenchArgs, args) == LoRABenchArgs(dataset="d.json", popularities=["zipf"])
    assert (args.max_lora_rank, args.max_loras) == (64, 8)  # the benchmark's engine defaults


def test_field_comments_above_and_beside_a_field():
    @dataclasses.dataclass
    class Options:
        plain: int = 0
        beside: int = 1  # the comment beside
        # the comment above,
        # on two lines
        above: str = "x"

    assert field_comments(Options) == {"beside": "the comment beside", "above": "the comment above, on two lines"}


def test_commands_import_only_when_run():
    """`foreseer.cli` imports no benchmark or training module until a command needs it, and then only its own."""
    code = ("import sys; import foreseer.cli as cli; loaded = lambda: sorted(m for m in sys.modules if "
            "m.startswith(('foreseer.bench', 'foreseer.training'))); print(loaded()); "
            "cli.build_parser(['generate', 'hi']); print(loaded()); "
            "cli.build_parser(['bench', 'decode']); print(loaded())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    first, after_generate, after_decode = (eval(line) for line in result.stdout.splitlines())
    assert first == after_generate == []
    assert "foreseer.bench.decode" in after_decode
    assert not [m for m in after_decode if m.startswith("foreseer.training")]
