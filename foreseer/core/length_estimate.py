"""A predicted distribution over how many tokens a request has left to generate, as the scheduler reads it.

The predictor (foreseer/lengths/remaining.py) gives probabilities over buckets of remaining length, each
bucket's mass spread uniformly over its range, so the survival function P(R > x) is piecewise linear. Between
two predictions the scheduler conditions the last one on what happened since: a request that generated d more
tokens and did not stop has R > d left of it, so its remaining length is R - d given R > d. Every figure is
also capped at what max_tokens leaves: the answer cannot run past it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RemainingLength:
    edges: tuple[float, ...]  # bucket b holds remaining lengths in (edges[b], edges[b + 1]]; edges[0] = 0
    probs: tuple[float, ...]  # of each bucket, summing to 1
    at_tokens: int  # tokens the request had generated when this was predicted
    _survival: tuple[float, ...] = field(init=False, repr=False, compare=False)  # P(R > edges[b])

    def __post_init__(self) -> None:
        if len(self.edges) != len(self.probs) + 1 or self.edges[0] != 0:
            raise ValueError("a remaining-length distribution needs len(probs) + 1 edges starting at 0")
        survival = [1.0]
        for p in self.probs:
            survival.append(max(survival[-1] - p, 0.0))
        object.__setattr__(self, "_survival", tuple(survival))

    @classmethod
    def create(cls, edges: Sequence[float], probs: Sequence[float], at_tokens: int) -> RemainingLength:
        total = sum(probs)
        return cls(tuple(float(e) for e in edges), tuple(float(p) / total for p in probs), at_tokens)

    @classmethod
    def exactly(cls, length: int, at_tokens: int = 0) -> RemainingLength:
        """A length known in advance (a client's hint, an oracle): all mass in (length - 1, length]."""
        if length < 1:
            raise ValueError(f"a known remaining length must be >= 1, got {length!r}")
        edges = (0.0, float(length)) if length == 1 else (0.0, length - 1.0, float(length))
        return cls.create(edges, (1.0,) if length == 1 else (0.0, 1.0), at_tokens)

    def survival(self, x: float) -> float:
        """P(R > x), R the remaining length when predicted."""
        edges, survival = self.edges, self._survival
        if x <= 0:
            return 1.0
        for b in range(len(self.probs)):
            if x <= edges[b + 1]:
                return survival[b] - self.probs[b] * (x - edges[b]) / (edges[b + 1] - edges[b])
        return 0.0

    def _integral(self, start: float, end: float) -> float:
        """The integral of P(R > x) over [start, end] (exact: it is piecewise linear)."""
        points = [start] + [e for e in self.edges if start < e < end] + [end]
        return sum((b - a) * (self.survival(a) + self.survival(b)) / 2 for a, b in zip(points, points[1:]))

    def mean(self, generated: int, cap: float) -> float:
        """Expected tokens left, now that `generated` tokens are, at most `cap` (what max_tokens leaves)."""
        elapsed, cap = max(generated - self.at_tokens, 0), max(cap, 0)
        alive = self.survival(elapsed)
        if alive <= 1e-9:  # it outlived every bucket: nothing predicted is left of it
            return min(1.0, cap)
        return self._integral(elapsed, elapsed + cap) / alive

    def quantile(self, q: float, generated: int, cap: float) -> float:
        """The remaining length that this share q of the conditioned distribution stays within, at most `cap`."""
        if not 0 < q < 1:
            raise ValueError(f"quantile must be in (0, 1), got {q!r}")
        elapsed, cap = max(generated - self.at_tokens, 0), max(cap, 0)
        alive = self.survival(elapsed)
        if alive <= 1e-9:
            return min(1.0, cap)
        target = (1 - q) * alive  # the smallest x > elapsed with P(R > x) <= target
        points = [elapsed] + [e for e in self.edges if e > elapsed]
        for a, b in zip(points, points[1:]):
            low, high = self.survival(a), self.survival(b)
            if high <= target:
                x = b if low == high else a + (b - a) * (low - target) / (low - high)
                return min(x - elapsed, cap)
        return cap
