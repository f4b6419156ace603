"""Prompt features for length prediction: the model's own hidden state at the last prompt token (the final one,
or one decoder layer's output).

This is the state the engine computes anyway at the end of a prefill (its lm_head reads it to sample the first
token), so a probe on it costs a few small matmuls at serving time. Here it is computed outside the scheduler,
with Foreseer's model and paged KV cache: KV blocks are borrowed from the engine's block manager for one
forward pass and given back; their full blocks stay in the prefix cache for the prompts' generation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
    runner = engine.runner

    def last_rows(indices: list[int], segments: list[Segment]) -> list[torch.Tensor]:
        if layer is None:
            return list(runner.forward_segments(runner.model, segments).float().cpu())
        ends = torch.tensor([len(s.token_ids) for s in segments], device=runner.device).cumsum(0) - 1
        return list(runner.layer_outputs(segments, [layer])[layer][ends].float().cpu())

    return torch.stack(_prefill_in_batches(engine, prompts, max_batch_tokens, last_rows))


@torch.inference_mode()
def answer_layer_states(engine, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                        layers: Sequence[int], max_batch_tokens: int | None = None) -> list[torch.Tensor]:
    """Per answer, [len(answer), len(layers), hidden] float32 on the CPU: the layers' outputs at the token that
    produced each answer token (row 0: the prompt's last token), from one prefill of the prompt and the answer
    without its last token. These are the states the engine computed while it generated the answer, up to the
    summation order (a prefill's against decode steps')."""
    if len(prompts) != len(answers) or not all(answers):
        raise ValueError("answer_layer_states needs one non-empty answer per prompt")
    runner = engine.runner

    def answer_rows(indices: list[int], segments: list[Segment]) -> list[torch.Tensor]:
        outputs = runner.layer_outputs(segments, layers)
        stacked = torch.stack([outputs[layer] for layer in layers], dim=1).float().cpu()  # [tokens, layers, hidden]
        pieces = stacked.split([len(s.token_ids) for s in segments])
        return [piece[len(piece) - len(answers[i]):] for i, piece in zip(indices, pieces)]

    sequences = [[*prompt, *answer[:-1]] for prompt, answer in zip(prompts, answers)]
    return _prefill_in_batches(engine, sequences, max_batch_tokens, answer_rows)


def _prefill_in_batches(engine, prompts: Sequence[Sequence[int]], max_batch_tokens: int | None,
                        forward: Callable[[list[int], list[Segment]], list[torch.Tensor]]) -> list[torch.Tensor]:
    """forward(indices, segments) per batch of prompts up to the token budget, each prompt's KV in borrowed blocks;
    returns its results in the prompts' order."""
    _check_prompts(engine, prompts)
    budget = max_batch_tokens or engine.config.scheduler.max_num_batched_tokens
    if budget < 1:
        raise ValueError(f"max_batch_tokens must be >= 1, got {budget!r}")
    results: list[torch.Tensor | None] = [None] * len(prompts)
    batch: list[int] = []
    num_tokens = 0
    for index, prompt in enumerate([*prompts, None]):
        if batch and (prompt is None or num_tokens + len(prompt) > budget):
            for i, result in zip(batch, _prefill(engine, [prompts[i] for i in batch], batch, forward)):
                results[i] = result
            batch, num_tokens = [], 0
        if prompt is not None:
            batch.append(index)
            num_tokens += len(prompt)
    return results


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


def _prefill(engine, prompts: list[Sequence[int]], indices: list[int],
             forward: Callable[[list[int], list[Segment]], list[torch.Tensor]]) -> list[torch.Tensor]:
    blocks = engine.block_manager
    holders = [Request(f"lengths-features-{i}", list(p), SamplingParams(max_tokens=1), 1, set())
               for i, p in enumerate(prompts)]
    try:
        for holder in holders:
            if not blocks.allocate_slots(holder, holder.num_tokens):
                raise ValueError("the KV cache has too few free blocks for these prompts; give a larger kv_cache_gib, "
                                 "a smaller max_batch_tokens, or call when the engine is idle")
        order = sorted(range(len(holders)), key=lambda i: holders[i].num_tokens > 1)  # one-token prompts first
        results = forward([indices[i] for i in order], [Segment(holders[i].token_ids, 0, holders[i].block_table)
                                                        for i in order])
        # The prompts' KV is in the cache now: their full blocks join the prefix cache, so that generating
        # for the same prompts soon after reuses this prefill instead of computing it again.
        for holder in holders:
            holder.num_computed_tokens = holder.num_tokens
            blocks.cache_computed_blocks(holder)
        by_prompt: list[torch.Tensor | None] = [None] * len(holders)
        for i, result in zip(order, results):
            by_prompt[i] = result
        return by_prompt
    finally:
        for holder in holders:
            blocks.free(holder)
