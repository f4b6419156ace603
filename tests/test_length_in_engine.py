"""The engine's length probe: every output carries the probe's prediction from its own prefill, unchanged text."""

import pytest
import torch

from foreseer import LLM, SamplingParams
from foreseer.lengths.features import prompt_hidden_states
from foreseer.lengths.probe import ProbeConfig, ProbeHead


@pytest.fixture()
def random_probe(tmp_path) -> str:
    torch.manual_seed(0)
    head = ProbeHead(ProbeConfig(hidden_size=64, kind="regression", hidden_dim=16, max_length=512))
    with torch.no_grad():  # spread the outputs over the range so that different prompts get different lengths
        head.net[-1].weight.normal_(0, 0.5)
        head.net[-1].bias.fill_(0.5)
    head.save(str(tmp_path))
    return str(tmp_path)


def test_outputs_carry_the_probes_prediction_and_the_same_text(tiny_llama, random_probe):
    prompts = [list(range(5 + i, 20 + 5 * i)) for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = LLM(tiny_llama, kv_cache_gib=0.01, block_size=4, max_num_batched_tokens=32)
    expected = plain.generate(prompts, params, use_tqdm=False)
    llm = LLM(tiny_llama, kv_cache_gib=0.01, block_size=4, max_num_batched_tokens=32, length_predictor=random_probe)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    assert all(o.predicted_length is None for o in expected)
    # The reference: the same head on hidden states from a separate prefill of each prompt.
    head = ProbeHead.load(random_probe, 64)
    reference = head.predict(prompt_hidden_states(plain.engine, prompts), torch.tensor([len(p) for p in prompts]))
    assert [o.predicted_length for o in outputs] == reference
    assert len(set(reference)) > 1


def test_length_predictor_errors(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="no probe is shipped"):
        LLM(tiny_llama, kv_cache_gib=0.01, length_predictor="probe")
    with pytest.raises(ValueError, match="no remaining-length head is shipped"):
        LLM(tiny_llama, kv_cache_gib=0.01, length_predictor="remaining")
    with pytest.raises(ValueError, match="directory with remaining_config.json or probe_config.json"):
        LLM(tiny_llama, kv_cache_gib=0.01, length_predictor=str(tmp_path))
    ProbeHead(ProbeConfig(hidden_size=32)).save(str(tmp_path))
    with pytest.raises(ValueError, match="hidden size"):
        LLM(tiny_llama, kv_cache_gib=0.01, length_predictor=str(tmp_path))
