"""Timing several ways of doing the same work on a shared, noisy machine."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def fastest_in_turns(ways: dict[str, Callable[[], T]], repeats: int, seconds: Callable[[T], float]) -> dict[str, T]:
    """Run every way `repeats` times, in turns (each round starting one way later), and keep each way's fastest run,
    as timeit does: a burst of load from a neighbour then slows one run of one way, not the comparison, and every
    ratio compares runs of the same minutes. `seconds` reads a run's time from its result."""
    names = list(ways)
    best: dict[str, T] = {}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            result = ways[name]()
            if name not in best or seconds(result) < seconds(best[name]):
                best[name] = result
    return best
