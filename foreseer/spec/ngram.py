"""Prompt lookup decoding: draft what followed earlier occurrences of the text's last n-gram."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from foreseer.config import SpeculativeConfig
from foreseer.core.draft_tree import DraftTree
from foreseer.spec.proposer import DraftProposer

if TYPE_CHECKING:  # the request module imports the draft tree from this package
    from foreseer.core.request import Request


class NgramProposer(DraftProposer):
    name = "ngram"

    def __init__(self, config: SpeculativeConfig) -> None:
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max
        self.width = config.tree_width

    def propose(self, requests: list[Request], max_lengths: list[int], hidden_states=None) -> list[DraftTree]:
        return [DraftTree.merge(self.lookup(r.token_ids, m)) if m > 0 else DraftTree()
                for r, m in zip(requests, max_lengths)]

    def lookup(self, token_ids: list[int], max_length: int) -> list[list[int]]:
        """Continuations (up to max_length tokens) of earlier occurrences of the text's last n-gram: longest n
        first (max_n down to min_n), latest occurrence first (recent text predicts best); up to `width`
        different ones, the alternatives of a token tree."""
        tokens = np.asarray(token_ids)
        found: list[list[int]] = []
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            # Windows that end before the last token, so that a match always has a continuation.
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
            for start in np.flatnonzero((windows == tokens[-n:]).all(axis=1))[::-1] + n:
                continuation = _repeat(tokens[start:], max_length)
                if not any(f[:len(continuation)] == continuation for f in found):
                    found.append(continuation)
                    if len(found) == self.width:
                        return found
        return found


def _repeat(tail: np.ndarray, length: int) -> list[int]:
    """The text after a match, repeated up to `length` tokens: where the match is recent, what follows it
    runs into the text's end, and a repeating text repeats with that period."""
    return np.resize(tail, length).tolist()
