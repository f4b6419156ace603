"""Prompt features for length prediction: the model's own hidden state at the last prompt token (the final one,
or one decoder layer's output).

This is the state the engine computes anyway at the end of a prefill (its lm_head reads it to sample the first
token), so a probe on it costs a few small matmuls at serving time. Here it is computed outside the scheduler,
with Foreseer's model and paged KV cache: KV blocks are borrowed from the engine's block manager for one
forward pass and given back; their full blocks stay in the prefix cache for the prompts' generation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from foreseer.core.request import Request
from foreseer.sampling_params import SamplingParams
from foreseer.worker.inputs import Segment


@torch.inference_mode()
def prompt_hidden_states(engine, prompts: Sequence[Sequence[int]], max_batch_tokens: int | None = None,
                         layer: int | None = None) -> torch.Tensor:
    """[len(prompts), hidden] float32 on the CPU: the final (post-norm) hidden state of each prompt's last token,
    or with `layer`, that decoder layer's output there.

    Prompts are prefilled together, up to `max_batch_tokens` tokens per forward pass (default: the engine's
    step budget; a longer prompt runs alone).
    """
    _check_prompts(engine, prompts)
    budget = max_batch_tokens or engine.config.scheduler.max_num_batched_tokens
    if budget < 1:
        raise ValueError(f"max_batch_tokens must be >= 1, got {budget!r}")
    out = torch.empty(len(prompts), engine.model_config.hidden_size, dtype=torch.float32)
    batch: list[int] = []
    num_tokens = 0
    for index, prompt in enumerate(prompts):
        if batch and num_tokens + len(prompt) > budget:
            out[batch] = _prefill_last_hidden(engine, [prompts[i] for i in batch], layer)
            batch, num_tokens = [], 0
        batch.append(index)
        num_tokens += len(prompt)
    if batch:
        out[batch] = _prefill_last_hidden(engine, [prompts[i] for i in batch], layer)
    return out


def _check_prompts(engine, prompts: Sequence[Sequence[int]]) -> None:
    vocab = engine.model_config.vocab_size
    capacity = engine.block_manager.num_blocks * engine.block_manager.block_size
    for index, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {index} is empty")
        if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt {index} has token ids outside [0, {vocab})")
        if len(prompt) > min(engine.max_model_len, capacity):
            raise ValueError(f"prompt {index} has {len(prompt)} tokens, more than the context or the KV cache holds")


def _prefill_last_hidden(engine, prompts: list[Sequence[int]], layer: int | None) -> torch.Tensor:
    runner, blocks = engine.runner, engine.block_manager
    holders = [Request(f"lengths-features-{i}", list(p), SamplingParams(max_tokens=1), 1, set())
               for i, p in enumerate(prompts)]
    try:
        for holder in holders:
            if not blocks.allocate_slots(holder, holder.num_tokens):
                raise ValueError("the KV cache has too few free blocks for these prompts; give a larger kv_cache_gib, "
                                 "a smaller max_batch_tokens, or call when the engine is idle")
        order = sorted(range(len(holders)), key=lambda i: holders[i].num_tokens > 1)  # one-token prompts first
        segments = [Segment(holders[i].token_ids, 0, holders[i].block_table) for i in order]
        last = runner.forward_segments(runner.model, segments, layer=layer).float().cpu()
        # The prompts' KV is in the cache now: their full blocks join the prefix cache, so that generating
        # for the same prompts soon after reuses this prefill instead of computing it again.
        for holder in holders:
            holder.num_computed_tokens = holder.num_tokens
            blocks.cache_computed_blocks(holder)
        return last[torch.tensor(order).argsort()]
    finally:
        for holder in holders:
            blocks.free(holder)
