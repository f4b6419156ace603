"""Reference computations with Hugging Face transformers."""

from __future__ import annotations

import torch


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int | None = None) -> list[list[int]]:
    """Greedy continuation of each prompt, one at a time (no padding), stopping at EOS if given."""
    results = []
    for prompt in prompts:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_token_id,
                pad_token_id=0, min_new_tokens=0,
            )
        results.append(out[0, len(prompt):].tolist())
    return results
