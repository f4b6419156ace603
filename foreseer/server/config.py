"""The server's own settings (its flags are generated from these fields): who may call it, and what one request may
ask of it. Past each limit a request gets a 4xx that names the limit; nothing past one reaches the engine."""

from __future__ import annotations

from dataclasses import dataclass

from foreseer.engine.async_engine import MAX_WAITING_REQUESTS, STEP_TIMEOUT_S


@dataclass
class ServerConfig:
    served_model_name: str | None = None  # the model name clients send (default: --model)
    api_key: str | None = None  # require 'Authorization: Bearer <key>' on /v1 endpoints
    # with --api-key, /metrics needs the key too (by default it is open, for scrapers)
    protect_metrics: bool = False
    # sequences that may wait for the engine; beyond, requests get 503 with Retry-After
    max_waiting_requests: int = MAX_WAITING_REQUESTS
    max_body_bytes: int = 8 * 2**20  # a request body larger than this gets a 413 before it is read whole
    max_header_bytes: int = 16 * 2**10  # requests whose headers take more bytes than this in all get a 431
    max_header_count: int = 64  # requests with more headers than this get a 431
    max_prompts: int = 64  # prompts in one completions request; more get a 400
    max_messages: int = 1024  # messages in one chat request; more get a 400
    max_n: int = 128  # choices per request (n); more get a 400
    max_logprobs: int = 20  # top logprobs per token (logprobs, top_logprobs); more get a 400, as OpenAI's
    # while a stream waits (queued, or for a slow token), an SSE comment line this often keeps proxies and clients
    # from closing it as idle (0: none)
    sse_keepalive_s: float = 15.0
    request_timeout_s: float = 600.0  # a request unfinished after this many seconds is aborted with a 408 (0: never)
    # an engine step running longer reports the engine hung (/health, the log)
    step_timeout_s: float = STEP_TIMEOUT_S

    def __post_init__(self) -> None:
        for name in ("max_waiting_requests", "max_body_bytes", "max_header_bytes", "max_header_count", "max_prompts",
                     "max_messages", "max_n", "max_logprobs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.request_timeout_s >= 0:
            raise ValueError(f"request_timeout_s must be >= 0 (0: no limit), got {self.request_timeout_s!r}")
        if not self.sse_keepalive_s >= 0:
            raise ValueError(f"sse_keepalive_s must be >= 0 (0: no keep-alive), got {self.sse_keepalive_s!r}")
        if not self.step_timeout_s > 0:
            raise ValueError(f"step_timeout_s must be > 0, got {self.step_timeout_s!r}")
        if self.protect_metrics and self.api_key is None:
            raise ValueError("--protect-metrics needs --api-key")
