"""bench spec: baseline and every speculative method on the same prompts, by batch size, as JSON and a plot."""

import json

from foreseer.cli import main
from foreseer.spec import PROPOSERS

TEXT = ("the quick brown fox jumps over the lazy dog. a paged cache keeps blocks of keys and values. "
        "continuous batching schedules every step. hello world, how are you today? ")


def test_bench_spec_reports_speedup_acceptance_and_identical_outputs(tiny_llama, tmp_path):
    dataset = tmp_path / "sharegpt.json"
    questions = ["what is a fox?", "count to five", "say hello to the world"]
    dataset.write_text(json.dumps([
        # Answers long enough to be rewritten or summarized; repeated text gives prompt lookup matches.
        {"id": str(i), "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": TEXT[i:] * 4}]}
        for i, q in enumerate(questions)]))
    out, plot = tmp_path / "spec.json", tmp_path / "spec.png"
    status = main(["bench", "spec", "--model", tiny_llama, "--kv-cache-gib", "0.01", "--dataset", str(dataset),
                   "--batch-sizes", "1", "2", "--num-prompts", "3", "--batch-1-prompts", "2", "--max-tokens", "12",
                   "--max-prompt-tokens", "96", "--repeats", "2", "--output-json", str(out), "--plot", str(plot)])
    assert status == 0
    assert plot.read_bytes().startswith(b"\x89PNG")
    report = json.loads(out.read_text())
    # Every method runs, or is skipped with the reason where this model cannot run it (no Medusa heads ship for it).
    assert "ngram" in report["methods"] and report["prompt_sets"] == ["grounded", "chat"] and report["repeats"] == 2
    assert sorted(report["methods"] + list(report["skipped_methods"])) == sorted(PROPOSERS)
    assert [(r["prompt_set"], r["batch_size"], r["num_prompts"]) for r in report["results"]] == [
        ("grounded", 1, 2), ("grounded", 2, 3), ("chat", 1, 2), ("chat", 2, 3)]
    for row in report["results"]:
        assert row["baseline"]["output_tokens_per_s"] > 0
        # The control: an identical engine without speculation, the same answers.
        assert row["control"]["identical_outputs"] == row["num_prompts"] and row["control"]["speedup"] > 0
        for result in row["methods"].values():
            assert result["identical_outputs"] == row["num_prompts"] and result["mismatched_prompts"] == []
            assert result["output_tokens"] == row["baseline"]["output_tokens"]
            assert result["speedup"] > 0
            for key in ("num_draft_tokens", "num_accepted_tokens", "num_verifications", "acceptance_rate",
                        "mean_accepted_length", "drafted_per_position", "accepted_per_position",
                        "acceptance_per_position"):
                assert key in result
            assert sum(result["drafted_per_position"]) == result["num_draft_tokens"]
            assert sum(result["accepted_per_position"]) == result["num_accepted_tokens"]
            if result["num_verifications"]:
                assert 1 <= result["mean_accepted_length"] <= 1 + report["num_speculative_tokens"]
    # Whether any draft is worth its verification is the engine's choice from timings it measures: on this tiny
    # model it is close, and a clean CI run drafted nothing. Drafting and its exactness are tested in
    # test_spec_decode.py.
