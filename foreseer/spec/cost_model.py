"""When speculation pays: step time against tokens per step, measured at start-up, decides draft lengths.

A step that computes n tokens takes T(n). Verifying drafts adds tokens to the step; the j-th draft token of
a request with per-token acceptance a is worth a**j tokens in expectation (the j - 1 before it must be
accepted too). Draft tokens are taken best first for as long as expected tokens per second grows, so a
request drafts more when its acceptance is high, and a batch large enough for T(n) to grow linearly
(compute-bound) stops speculating, where verification would cost more than it saves.
"""

from __future__ import annotations

from dataclasses import dataclass

from foreseer.core.draft_tree import DraftTree
from foreseer.worker.profiling import StepCostModel

# Drafting must promise at least this much more throughput than not drafting: the step-cost measurements drift
# by a few percent on a busy machine, and a predicted gain within that error turned into measured slowdowns.
MIN_PREDICTED_GAIN = 0.05
CALIBRATION_DECAY = 0.95  # the weight a calibration keeps on what it measured before the latest step (by default)


@dataclass
class Calibration:
    """Measured over predicted seconds, on recent steps of one kind: exponential averages of both, so that one
    slow step moves it little. Start-up timings run each step alone on a quiet cache; in service a draft model and
    the target evict each other's weights from the CPU's caches, and drafting has work of its own (measured here:
    int8 draft steps 1.5-2x their start-up time at batch 1, verification steps 1.3x)."""

    decay: float = CALIBRATION_DECAY
    measured: float = 0.0
    predicted: float = 0.0

    def add(self, measured: float, predicted: float) -> None:
        self.measured = self.decay * self.measured + measured
        self.predicted = self.decay * self.predicted + predicted

    @property
    def ratio(self) -> float:
        return self.measured / self.predicted if self.predicted > 0 else 1.0


@dataclass
class StepScales:
    """What the speculator has measured of predicted step costs: the target's decode steps (with drafts to verify or
    without) and a draft model's steps, each a factor on the cost model's prediction; and the seconds a proposer
    with no draft model to price spends per draft level (each Medusa head runs the lm_head, for one)."""

    target: float = 1.0
    draft: float = 1.0
    draft_overhead: float = 0.0


def choose_draft_nodes(
    acceptance: list[float], trees: list[DraftTree], num_base_tokens: int, cost: StepCostModel,
    contexts: list[int] | None = None, base_context: int = 0,
) -> list[DraftTree]:
    """Which proposed draft nodes to verify this step, per request (each result is a subtree of its draft).

    acceptance: each request's estimated per-token acceptance; num_base_tokens: the tokens the step computes
    anyway (one per decoding request, plus prefill), whose decode rows read `base_context` cached tokens;
    contexts: each request's length, which each of its draft nodes reads again. A node is worth the chance that
    it gets accepted: its parent's, times acceptance, times the chance that each sibling before it was rejected.
    """
    contexts = contexts or [0] * len(trees)
    candidates = []  # (expected tokens, node, request)
    for r, (rate, tree) in enumerate(zip(acceptance, trees)):
        worth: list[float] = []
        rank = {}
        for node, parent in enumerate(tree.parents):
            rank[parent] = rank.get(parent, -1) + 1
            worth.append((1.0 if parent < 0 else worth[parent]) * rate * (1.0 - rate) ** rank[parent])
            candidates.append((worth[node], node, r))
    # Most expected tokens per second of verification first: a node costs a token of the step plus a reread of
    # its request's context. A child is never worth more than its parent, costs the same and comes after it,
    # so each pick is a subtree.
    per_token = cost.cost(num_base_tokens + 1) - cost.cost(num_base_tokens) + 1e-12
    candidates.sort(key=lambda c: (-c[0] / (per_token + cost.seconds_per_context_token * contexts[c[2]]), c[1]))
    expected, context = float(num_base_tokens), base_context
    best_count, best_rate = 0, expected / cost.cost(num_base_tokens, context)
    for count, (gain, _, r) in enumerate(candidates, start=1):
        expected += gain
        context += contexts[r]
        rate = expected / cost.cost(num_base_tokens + count, context)
        if rate > best_rate:
            best_count, best_rate = count, rate
    chosen: list[list[int]] = [[] for _ in trees]
    for _, node, r in candidates[:best_count]:
        chosen[r].append(node)
    return [tree.subtree(nodes) for tree, nodes in zip(trees, chosen)]


def choose_draft_depth(
    acceptance: list[float], max_depths: list[int], num_base_tokens: int, cost: StepCostModel,
    draft_cost: StepCostModel | None = None, contexts: list[int] | None = None, base_context: int = 0,
    setup_seconds: float = 0.0, scales: StepScales | None = None,
) -> int:
    """How many tokens deep to draft this step (0: not at all), before any drafting is done.

    Drafting k deep costs k steps of the draft model over the drafting requests (`draft_cost`; None for
    proposers whose drafts are nearly free) besides verifying up to k tokens per request, each reading its
    request's context (`contexts`) again, and `setup_seconds` once (a draft model catching up with new
    tokens, as the caller amortizes it); it is worth sum(a**j, j = 1..k) expected tokens per request. `scales`
    corrects each kind of cost by what was measured of it. The depth with the most expected tokens per second
    wins, if it beats not drafting by MIN_PREDICTED_GAIN.
    """
    contexts = contexts or [0] * len(max_depths)
    scales = scales or StepScales()
    drafting = [i for i, m in enumerate(max_depths) if m > 0]
    expected, drafted, context = float(num_base_tokens), 0, base_context
    plain_seconds = scales.target * cost.cost(num_base_tokens, context)
    best_depth, best_rate = 0, expected / plain_seconds * (1 + MIN_PREDICTED_GAIN)
    for depth in range(1, max(max_depths, default=0) + 1):
        deep_enough = [i for i in drafting if max_depths[i] >= depth]
        expected += sum(acceptance[i] ** depth for i in deep_enough)
        drafted += len(deep_enough)
        context += sum(contexts[i] for i in deep_enough)
        seconds = scales.target * cost.cost(num_base_tokens + drafted, context) + depth * scales.draft_overhead
        if draft_cost is not None:
            seconds += scales.draft * (depth * draft_cost.cost(len(drafting), sum(contexts[i] for i in drafting))
                                       + setup_seconds)
        if expected / seconds > best_rate:
            best_depth, best_rate = depth, expected / seconds
    return best_depth
