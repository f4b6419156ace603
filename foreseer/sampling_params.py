"""Per-request sampling parameters, in the shape of vLLM's SamplingParams."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# A temperature below this samples greedily (vLLM's rule): the logits divided by it would overflow float32 (1e-320
# is 0 there), and the distribution it leaves is its argmax anyway.
GREEDY_TEMPERATURE = 1e-5
# A top_k at least this keeps every token of any vocabulary, as 0 does (and would overflow an int64 tensor).
TOP_K_UNLIMITED = 2**31
SEED_RANGE = (-(2**63), 2**63)  # a torch.Generator takes [-2**63, 2**64): seed + i, for the i-th of n choices, fits


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 (or below GREEDY_TEMPERATURE) means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 disables
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the model's context
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per generated token
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    use_speculation: bool = True  # False: this request opts out of the engine's speculative decoding
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check(_is_integer(self.n) and self.n >= 1, "n", f"must be an integer >= 1, got {self.n!r}")
        _check(_is_finite(self.temperature) and self.temperature >= 0, "temperature",
               f"must be a finite number >= 0, got {self.temperature!r}")
        _check(_is_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        _check(_is_integer(self.top_k) and self.top_k >= -1, "top_k",
               f"must be an integer >= 1, or 0 or -1 to disable, got {self.top_k!r}")
        _check(_is_finite(self.min_p) and 0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p!r}")
        _check(self.seed is None or (_is_integer(self.seed) and SEED_RANGE[0] <= self.seed < SEED_RANGE[1]), "seed",
               f"must be an integer in [-2**63, 2**63), got {self.seed!r}")
        _check(self.max_tokens is None or (_is_integer(self.max_tokens) and self.max_tokens >= 1), "max_tokens",
               f"must be an integer >= 1, got {self.max_tokens!r}")
        _check(self.logprobs is None or (_is_integer(self.logprobs) and self.logprobs >= 0), "logprobs",
               f"must be an integer >= 0, got {self.logprobs!r}")
        _check(self.stop is None or isinstance(self.stop, str | list | tuple), "stop",
               f"must be a string or a list of strings, got {type(self.stop).__name__}")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        _check(all(isinstance(s, str) and s for s in stops), "stop", "must be non-empty strings")
        self.stop_strings = stops
        _check(self.stop_token_ids is None or isinstance(self.stop_token_ids, list | tuple), "stop_token_ids",
               f"must be a list of token ids, got {type(self.stop_token_ids).__name__}")
        ids = list(self.stop_token_ids or [])
        _check(all(_is_integer(t) and t >= 0 for t in ids), "stop_token_ids", "must be non-negative integers")
        self.stop_token_ids = ids
        # As floats: a large int temperature would overflow the int64 tensor the sampler builds from them.
        self.temperature, self.top_p, self.min_p = float(self.temperature), float(self.top_p), float(self.min_p)
        if self.top_k == -1 or self.top_k >= TOP_K_UNLIMITED:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: object) -> bool:
    """A number that float32 and float64 arithmetic can take: not NaN, infinite, or an int too large for a float."""
    try:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(float(value))
    except OverflowError:
        return False


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name} {message}")
