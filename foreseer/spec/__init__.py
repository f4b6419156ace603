"""Speculative decoding: draft proposers, verification, and the cost model that says when it pays."""

from foreseer.registry import DRAFT_PROPOSERS as PROPOSERS

__all__ = ["PROPOSERS"]
