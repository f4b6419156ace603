"""Step-cost profiling: how long the model takes for a step of n decode rows, and per cached token it reads,
measured at start-up; speculation prices its drafts with it."""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from foreseer.attention import AttentionBackend, AttentionMetadata, forward_context

logger = logging.getLogger(__name__)

LONG_CONTEXT, LONG_CONTEXT_ROWS = 512, 8  # the long-context step that prices attention per cached token


@dataclass
class StepCostModel:
    token_counts: list[int]  # increasing
    seconds: list[float]  # measured step time at each count (decode rows over a short context)
    # Attention's share: time per cached token that a decode row reads (a verified draft token is such a row)
    seconds_per_context_token: float = 0.0

    def __post_init__(self) -> None:
        if len(self.token_counts) < 2 or self.token_counts != sorted(set(self.token_counts)):
            raise ValueError("a step cost model needs two or more increasing token counts")

    def cost(self, num_tokens: int, context_tokens: int = 0) -> float:
        """Piecewise-linear in the measured points, extended linearly beyond the last two, plus the attention
        reads of `context_tokens` cached tokens (summed over the decode rows)."""
        xs, ys = self.token_counts, self.seconds
        i = min(max(bisect.bisect_left(xs, num_tokens), 1), len(xs) - 1)
        slope = (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1])
        return max(ys[i - 1] + slope * (num_tokens - xs[i - 1]), 1e-9) + self.seconds_per_context_token * context_tokens


@torch.inference_mode()
def measure_step_costs(
    model: nn.Module, backend: AttentionBackend, block_size: int, num_blocks: int, device: torch.device,
    token_counts: Sequence[int], repeats: int = 5, compute_logits: Callable | None = None,
    forward: Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor] | None = None,
) -> StepCostModel:
    """Time a step of n one-token decodes (forward and logits) for each n, on a cache nobody uses yet, and
    the same decodes of LONG_CONTEXT_ROWS rows over a long context, for attention's cost per cached token.

    The steps are timed in turns, `repeats` rounds after a warm-up round (kernel loading, allocations), and
    each keeps its fastest time: on a shared machine a burst of load then slows one round, not one step.
    `forward(input_ids, positions, metadata)` runs the step as serving does (default: the model's modules).
    """
    compute_logits = compute_logits or model.compute_logits

    def modules(input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        with forward_context(backend, metadata):
            return model(input_ids, positions)

    forward = forward or modules
    counts = [n for n in token_counts if -(-n // block_size) <= num_blocks]
    rows = min(LONG_CONTEXT_ROWS, counts[-1])
    context = min(LONG_CONTEXT, num_blocks // rows * block_size)
    steps = {n: _decode_metadata(n, 1, block_size, device) for n in counts}
    if context > 4 * block_size:
        for k_cache, v_cache in (layer.kv_cache for layer in model.attention_layers()):
            # Zeros, not whatever the fresh memory holds: denormals would slow the timing down.
            k_cache[:rows * context // block_size].zero_()
            v_cache[:rows * context // block_size].zero_()
        steps["long"] = _decode_metadata(rows, context, block_size, device)
    best = dict.fromkeys(steps, float("inf"))
    for round_index in range(repeats + 1):
        for key, metadata in steps.items():
            begin = time.perf_counter()
            hidden = forward(torch.zeros_like(metadata.decode_seq_lens), metadata.decode_seq_lens - 1, metadata)
            compute_logits(hidden)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_index:
                best[key] = min(best[key], time.perf_counter() - begin)
    seconds = [best[n] for n in counts]
    cost = StepCostModel(counts, seconds)
    if "long" in best:
        short_context = sum(min(i, block_size - 1) + 1 for i in range(rows))  # what the short steps read
        extra = best["long"] - cost.cost(rows)
        cost.seconds_per_context_token = max(extra, 0.0) / (rows * context - short_context)
    logger.info("step cost: %s; %.2f us per context token", ", ".join(
        f"{n} tok {t * 1e3:.1f} ms" for n, t in zip(counts, seconds)), cost.seconds_per_context_token * 1e6)
    return cost


def _decode_metadata(num_rows: int, context: int, block_size: int, device: torch.device) -> AttentionMetadata:
    """Decode rows for timing: with context 1, row i is the i-th slot of the cache with i % block_size tokens
    before it; else each row has `context` tokens in its own run of blocks."""
    if context == 1:
        slots = torch.arange(num_rows, device=device)
        return AttentionMetadata(
            slot_mapping=slots, num_decode_tokens=num_rows, decode_block_tables=(slots // block_size)[:, None],
            decode_seq_lens=slots % block_size + 1, max_decode_seq_len=min(num_rows, block_size), prefills=[],
            block_size=block_size,
        )
    blocks_per_row = context // block_size
    tables = torch.arange(num_rows * blocks_per_row, device=device).view(num_rows, blocks_per_row)
    return AttentionMetadata(
        slot_mapping=tables[:, -1] * block_size + block_size - 1, num_decode_tokens=num_rows,
        decode_block_tables=tables, decode_seq_lens=torch.full((num_rows,), blocks_per_row * block_size,
                                                               device=device),
        max_decode_seq_len=blocks_per_row * block_size, prefills=[], block_size=block_size,
    )
