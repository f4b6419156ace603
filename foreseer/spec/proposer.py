"""The draft proposer interface: every speculative method drafts tokens for running requests."""

from __future__ import annotations

from abc import ABC, abstractmethod

from foreseer.engine.request import Request


class DraftProposer(ABC):
    """Drafts up to `max_lengths[i]` tokens to follow each request's tokens so far (fewer, or none, is fine)."""

    name: str

    @abstractmethod
    def propose(self, requests: list[Request], max_lengths: list[int]) -> list[list[int]]:
        """One draft (a chain of token ids) per request."""
