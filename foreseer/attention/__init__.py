"""Attention backends read per-step batch metadata from a forward context, so model code never sees the scheduler."""

from foreseer.attention.backend import AttentionBackend, AttentionMetadata, PrefillSegment, get_backend
from foreseer.attention.context import forward_context, get_forward_context

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "PrefillSegment",
    "forward_context",
    "get_backend",
    "get_forward_context",
]
