"""Attention backends read per-step batch metadata from a forward context, so model code never sees the scheduler."""

from foreseer.attention.backend import AttentionBackend, AttentionMetadata, PrefillSegment
from foreseer.attention.context import forward_context, get_forward_context
from foreseer.attention.selector import get_backend

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "PrefillSegment",
    "forward_context",
    "get_backend",
    "get_forward_context",
]
