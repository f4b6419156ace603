"""Prompt lookup decoding: draft the continuation of the first earlier occurrence of the text's last n-gram."""

from __future__ import annotations

import numpy as np

from foreseer.config import SpeculativeConfig
from foreseer.engine.request import Request
from foreseer.spec.proposer import DraftProposer


class NgramProposer(DraftProposer):
    name = "ngram"

    def __init__(self, config: SpeculativeConfig) -> None:
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max

    def propose(self, requests: list[Request], max_lengths: list[int]) -> list[list[int]]:
        return [self.lookup(r.token_ids, m) if m > 0 else [] for r, m in zip(requests, max_lengths)]

    def lookup(self, token_ids: list[int], max_length: int) -> list[int]:
        """The longest suffix n-gram (max_n down to min_n) seen earlier; what followed its first occurrence
        (the longest continuation there is), up to max_length."""
        tokens = np.asarray(token_ids)
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            # Windows that end before the last token, so that a match always has a continuation.
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
            matches = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if len(matches):
                start = matches[0] + n
                return tokens[start:start + max_length].tolist()
        return []
