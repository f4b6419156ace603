"""Speculative decoding: draft proposers, verification, and the cost model that says when it pays."""

from foreseer.spec.ngram import NgramProposer
from foreseer.spec.proposer import DraftProposer

PROPOSERS: dict[str, type[DraftProposer]] = {NgramProposer.name: NgramProposer}

__all__ = ["PROPOSERS", "DraftProposer", "NgramProposer"]
