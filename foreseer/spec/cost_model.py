"""When speculation pays: step time against tokens per step, measured at start-up, decides draft lengths.

A step that computes n tokens takes T(n). Verifying drafts adds tokens to the step; the j-th draft token of
a request with per-token acceptance a is worth a**j tokens in expectation (the j - 1 before it must be
accepted too). Draft tokens are taken best first for as long as expected tokens per second grows, so a
request drafts more when its acceptance is high, and a batch large enough for T(n) to grow linearly
(compute-bound) stops speculating, where verification would cost more than it saves.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass
class StepCostModel:
    token_counts: list[int]  # increasing
    seconds: list[float]  # measured step time at each count

    def __post_init__(self) -> None:
        if len(self.token_counts) < 2 or self.token_counts != sorted(set(self.token_counts)):
            raise ValueError("a step cost model needs two or more increasing token counts")

    def cost(self, num_tokens: int) -> float:
        """Piecewise-linear in the measured points, extended linearly beyond the last two."""
        xs, ys = self.token_counts, self.seconds
        i = min(max(bisect.bisect_left(xs, num_tokens), 1), len(xs) - 1)
        slope = (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1])
        return max(ys[i - 1] + slope * (num_tokens - xs[i - 1]), 1e-9)


def choose_draft_lengths(
    acceptance: list[float], max_lengths: list[int], num_base_tokens: int, cost: StepCostModel
) -> list[int]:
    """How many draft tokens to verify per request this step (a prefix of each proposed draft).

    acceptance: each request's estimated per-token acceptance; max_lengths: the tokens it has drafted;
    num_base_tokens: the tokens the step computes anyway (one per decoding request, plus prefill).
    """
    candidates = sorted(
        ((acceptance[i] ** j, j, i) for i, m in enumerate(max_lengths) for j in range(1, m + 1)),
        key=lambda c: (-c[0], c[1]),
    )
    expected = float(num_base_tokens)
    best_count, best_rate = 0, expected / cost.cost(num_base_tokens)
    for count, (gain, _, _) in enumerate(candidates, start=1):
        expected += gain
        rate = expected / cost.cost(num_base_tokens + count)
        if rate > best_rate:
            best_count, best_rate = count, rate
    lengths = [0] * len(max_lengths)
    for _, _, i in candidates[:best_count]:
        lengths[i] += 1
    return lengths
