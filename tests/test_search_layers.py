"""spec search-layers: layer redundancy against transformers, candidate sets, and a whole search on a tiny model."""

import json

import pytest
import torch

from foreseer import LLM, SamplingParams
from foreseer.cli import main
from foreseer.training.search_layers import candidate_sets, layer_redundancy


@pytest.fixture(scope="module")
def four_layer_llama(tmp_path_factory) -> str:
    from conftest import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("four_layers")), seed=4, num_hidden_layers=4,
                           tie_word_embeddings=True)


def test_layer_redundancy_matches_transformers_hidden_states(four_layer_llama):
    from transformers import AutoModelForCausalLM

    llm = LLM(four_layer_llama, kv_cache_gib=0.01)
    prompts = [list(range(5, 30)), list(range(40, 52))]
    redundancy = layer_redundancy(llm, prompts)
    hf = AutoModelForCausalLM.from_pretrained(four_layer_llama, dtype=torch.float32).eval()
    sums, count = torch.zeros(3), 0
    for prompt in prompts:
        with torch.no_grad():
            states = hf(torch.tensor([prompt]), output_hidden_states=True).hidden_states
        # hidden_states[i] is layer i's input; the last entry is after the final norm, so layers 0..2 only.
        for i in range(3):
            sums[i] += torch.cosine_similarity(states[i][0], states[i + 1][0], dim=-1).sum()
        count += len(prompt)
    assert redundancy[:3] == pytest.approx((sums / count).tolist(), abs=1e-4)
    assert len(redundancy) == 4


def test_candidate_sets_keep_the_first_and_last_layers():
    redundancy = [0.99, 0.5, 0.9, 0.7, 0.8, 0.6, 0.95, 0.99]
    assert candidate_sets(redundancy, [0.25, 0.5, 0.9]) == [[2, 6], [2, 3, 4, 6], [1, 2, 3, 4, 5, 6]]
    assert candidate_sets(redundancy, [0.1, 0.01]) == [[6]]  # at least one layer, no repeated sets


def test_search_layers_saves_the_fastest_exact_set(four_layer_llama, tmp_path):
    dataset = tmp_path / "sharegpt.json"
    dataset.write_text(json.dumps([{"conversations": [{"from": "human", "value": f"question {i} about a fox"}]}
                                   for i in range(4)]))
    output = tmp_path / "skip.json"
    status = main(["spec", "search-layers", "--model", four_layer_llama, "--dataset", str(dataset),
                   "--num-prompts", "2", "--skip-prompts", "1", "--max-tokens", "12", "--kv-cache-gib", "0.01",
                   "--skip-fractions", "0.25", "0.5", "--output", str(output)])
    assert status == 0
    saved = json.loads(output.read_text())
    candidates = saved["search"]["candidates"]
    assert [len(c["skip_layers"]) for c in candidates] == [1, 2]
    assert saved["skip_layers"] == max(candidates, key=lambda c: c["speedup"])["skip_layers"]
    assert all(0 not in c["skip_layers"] and 3 not in c["skip_layers"] for c in candidates)
    # The chosen set drives layer_skip and stays exact.
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    plain = LLM(four_layer_llama, kv_cache_gib=0.01).generate([list(range(5, 30))], params, use_tqdm=False)
    spec = LLM(four_layer_llama, kv_cache_gib=0.01,
               speculative_config={"method": "layer_skip", "skip_layers": saved["skip_layers"]})
    assert spec.generate([list(range(5, 30))], params, use_tqdm=False)[0].outputs[0].token_ids == \
        plain[0].outputs[0].token_ids
