"""The OpenAI-compatible HTTP server (`foreseer serve`)."""

from foreseer.server.app import create_app

__all__ = ["create_app"]
