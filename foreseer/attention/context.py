from collections.abc import Iterator
from contextlib import contextmanager

from foreseer.attention.backend import AttentionBackend, AttentionMetadata

_current: tuple[AttentionBackend, AttentionMetadata] | None = None


@contextmanager
def forward_context(backend: AttentionBackend, metadata: AttentionMetadata) -> Iterator[None]:
    """Make the step's attention metadata visible to every attention layer during one forward pass."""
    global _current
    previous, _current = _current, (backend, metadata)
    try:
        yield
    finally:
        _current = previous


def get_forward_context() -> tuple[AttentionBackend, AttentionMetadata]:
    if _current is None:
        raise RuntimeError("attention called outside a forward_context")
    return _current
