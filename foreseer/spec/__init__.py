"""Speculative decoding: draft proposers, verification, and the cost model that says when it pays."""

from foreseer.spec.draft_model import DraftModelProposer, LayerSkipProposer
from foreseer.spec.medusa_proposer import MedusaProposer
from foreseer.spec.ngram import NgramProposer
from foreseer.spec.proposer import DraftProposer

PROPOSERS: dict[str, type[DraftProposer]] = {
    p.name: p for p in (NgramProposer, DraftModelProposer, MedusaProposer, LayerSkipProposer)
}

__all__ = ["PROPOSERS", "DraftModelProposer", "DraftProposer", "LayerSkipProposer", "MedusaProposer", "NgramProposer"]
