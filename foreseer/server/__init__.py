"""The OpenAI-compatible HTTP server (`foreseer serve`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from foreseer.server.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str):
    # The app is loaded on first use: run-batch uses the server's request and response code without FastAPI.
    if name == "create_app":
        from foreseer.server.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
