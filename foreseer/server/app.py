"""The OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics, and
vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter.

Every request that cannot be served gets a 4xx with OpenAI's error body `{"error": {message, type, param,
code}}`; a full waiting queue gets a 503 with Retry-After. A client that goes away has its requests aborted.

LoRA adapters (with --enable-lora) are served by name: the `model` field names the base model (its served name)
or an adapter given at start-up (--lora-modules) or loaded since. /v1/models lists the adapters with their
`parent`. Unloading an adapter that unfinished requests use is refused with 409 (they keep it); finish or abort
them first.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import itertools
import re
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

import foreseer
from foreseer.engine.async_engine import (
    AsyncLLMEngine,
    EngineNotRunningError,
    EngineOverloadedError,
    RequestFailedError,
    RequestGroup,
)
from foreseer.lora import LoRARequest
from foreseer.lora.manager import LoRAInUseError
from foreseer.outputs import CompletionOutput, RequestOutput
from foreseer.sampling_params import SamplingParams
from foreseer.server.config import ServerConfig
from foreseer.server.metrics import ResponseCounter, ServerMetrics
from foreseer.server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatStreamChoice,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    UnloadLoRAAdapterRequest,
    UsageInfo,
    conversation,
)
from foreseer.server.serving import (
    APIError,
    ResponseBuilder,
    chat_sampling_params,
    check_request,
    completion_sampling_params,
    engine_rejection,
    invalid_body,
    render_chat,
    usage,
)

RETRY_AFTER_S = 1
TOKENIZER_THREADS = 4
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/load_lora_adapter",
             "/v1/unload_lora_adapter", "/tokenize", "/detokenize", "/version", "/health", "/metrics")


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body.model_dump(), status_code=error.status, headers=error.headers)


def create_app(engine: AsyncLLMEngine, config: ServerConfig | None = None,
               lora_modules: Mapping[str, str] | None = None) -> FastAPI:
    """The app owns the engine loop: it starts with the app and stops after the last connection closed.

    `lora_modules` (adapter name -> directory) are read and checked here, before the engine starts: a bad one
    raises ValueError naming it. With an api_key, the /v1 endpoints need it, and /metrics too if protect_metrics
    (by default it stays open, for scrapers); /health is always open. Requests past the config's limits get 4xx
    responses that name them."""
    config = config or ServerConfig()
    server = _Server(engine, config, lora_modules or {})

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await engine.stop()
        server.tokenizing.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="Foreseer", lifespan=lifespan)
    app.post("/v1/completions", response_model=None)(server.completions)
    app.post("/v1/chat/completions", response_model=None)(server.chat_completions)
    app.get("/v1/models")(server.models)
    app.post("/v1/load_lora_adapter", response_model=None)(server.load_lora_adapter)
    app.post("/v1/unload_lora_adapter", response_model=None)(server.unload_lora_adapter)
    app.post("/tokenize")(server.tokenize)
    app.post("/detokenize")(server.detokenize)
    app.get("/version")(server.version)
    app.get("/health")(server.health)
    app.get("/metrics")(server.metrics_text)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(EngineOverloadedError, _overloaded)
    app.add_exception_handler(EngineNotRunningError, _engine_not_running)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    app.add_exception_handler(RequestFailedError, _request_failed)
    if config.api_key is not None:
        app.add_middleware(_RequireAPIKey, api_key=config.api_key,
                           protected=("/v1", "/metrics") if config.protect_metrics else ("/v1",))
    app.add_middleware(_LimitBody, max_bytes=config.max_body_bytes)
    app.add_middleware(_LimitHeaders, max_bytes=config.max_header_bytes, max_count=config.max_header_count)
    app.add_middleware(ResponseCounter, metrics=server.metrics)  # outermost: counts 401s, 413s and 431s too
    return app


@dataclass
class _ChoiceProgress:
    """What a stream already sent for one choice."""

    text: int = 0  # characters
    tokens: int = 0
    text_offset: int = 0  # of the next token, for completions' logprobs
    finished: bool = False


class _Server:
    def __init__(self, engine: AsyncLLMEngine, config: ServerConfig, lora_modules: Mapping[str, str]) -> None:
        self.engine = engine
        self.config = config
        self.model_name = model_name = config.served_model_name or engine.engine.config.model
        self.created = int(time.time())
        # The engine thread uses the engine's tokenizer; the event loop gets its own copy (for decoding). Prompts
        # are tokenized in worker threads, a copy each: a megabyte of text takes seconds, which on the engine
        # thread or the event loop would stall every other request (the tokenizer lets the GIL go meanwhile).
        self.tokenizer = copy.deepcopy(engine.engine.tokenizer)
        self.tokenizing = concurrent.futures.ThreadPoolExecutor(TOKENIZER_THREADS, "foreseer-tokenize")
        self._worker_tokenizers = threading.local()
        self.responses = ResponseBuilder(self.tokenizer)
        self.metrics = ServerMetrics(engine, ENDPOINTS)
        self.loras: dict[str, LoRARequest] = {}  # served adapters by name
        self._lora_ids = itertools.count(1)  # never reused: an id names one directory for the server's life
        self._lora_busy: set[str] = set()  # names being loaded or unloaded
        self.lora_enabled = engine.engine.config.lora.enable_lora
        if lora_modules and not self.lora_enabled:
            raise ValueError("LoRA modules were given, but LoRA is not enabled (--enable-lora)")
        for name, path in lora_modules.items():
            if name == model_name:
                raise ValueError(f"LoRA module name {name!r} is the base model's served name; choose another")
            lora_request = LoRARequest(name, next(self._lora_ids), path)
            engine.engine.load_lora(lora_request)  # before the engine thread starts: reads and checks it
            self.loras[name] = lora_request

    # -- endpoints ------------------------------------------------------------------------------------
    async def completions(self, body: CompletionRequest, raw: Request) -> Response:
        lora_request = self._check_request(body)
        params = completion_sampling_params(body)
        request_id = _request_id("cmpl", raw)
        prompts = [p if isinstance(p, list) else await self._off_loop(lambda tokenizer, p=p: tokenizer.encode(p))
                   for p in body.prompts()]
        group = await self._submit(request_id, prompts, params, "prompt", "max_tokens", lora_request, body)
        created = int(time.time())
        if body.stream:
            return self._event_stream(self._completion_events(group, body, request_id, created), group)
        outputs = await self._collect(group, raw)
        if outputs is None:
            return _client_gone()
        return _json(self.responses.completion_response(body, request_id, created, outputs))

    async def chat_completions(self, body: ChatCompletionRequest, raw: Request) -> Response:
        lora_request = self._check_request(body)
        params, num_top, max_tokens_param = chat_sampling_params(body)
        prompt = await self._off_loop(lambda tokenizer: render_chat(tokenizer, body.conversation(), True))
        request_id = _request_id("chatcmpl", raw)
        group = await self._submit(request_id, [prompt], params, "messages", max_tokens_param, lora_request, body)
        created = int(time.time())
        if body.stream:
            return self._event_stream(self._chat_events(group, body, request_id, created, num_top), group)
        outputs = await self._collect(group, raw)
        if outputs is None:
            return _client_gone()
        return _json(self.responses.chat_response(body, request_id, created, outputs[0], num_top))

    async def models(self) -> ModelList:
        max_model_len = self.engine.engine.max_model_len
        base = ModelCard(id=self.model_name, created=self.created, root=self.engine.engine.config.model,
                         max_model_len=max_model_len)
        adapters = [ModelCard(id=name, created=self.created, root=lora.lora_path, parent=self.model_name,
                              max_model_len=max_model_len) for name, lora in self.loras.items()]
        return ModelList(data=[base, *adapters])

    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        """vLLM's: the token ids /v1/completions (prompt) or /v1/chat/completions (messages) would run."""
        self._served(body.model)
        if body.messages is None:
            tokens = await self._off_loop(lambda tokenizer: tokenizer.encode(body.prompt))
        else:
            tokens = await self._off_loop(lambda tokenizer: render_chat(
                tokenizer, conversation(body.messages), body.add_generation_prompt))
        return TokenizeResponse(count=len(tokens), max_model_len=self.engine.engine.max_model_len, tokens=tokens)

    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self._served(body.model)
        vocab = self.engine.engine.model_config.vocab_size
        if not all(0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"tokens must be token ids in [0, {vocab})", "tokens")
        return DetokenizeResponse(prompt=await self._off_loop(lambda tokenizer: tokenizer.decode(body.tokens)))

    async def version(self) -> dict[str, str]:
        return {"version": foreseer.__version__}

    async def load_lora_adapter(self, body: LoadLoRAAdapterRequest) -> Response:
        """vLLM's: read and check the adapter (in the background: steps go on), then serve it by name."""
        name = body.lora_name
        self._check_lora_enabled()
        if name == self.model_name:
            raise APIError(400, f"the name {name!r} is the base model's; choose another", "lora_name",
                           code="invalid_value")
        if name in self.loras:
            raise APIError(400, f"The lora adapter '{name}' has already been loaded.", "lora_name",
                           code="lora_already_loaded")
        self._claim_lora_name(name)
        try:
            lora_request = LoRARequest(name, next(self._lora_ids), body.lora_path)
            try:
                future = await self.engine.call(lambda engine: engine.fetch_lora(lora_request))
                await asyncio.wrap_future(future)
                await self.engine.call(lambda engine: engine.load_lora(lora_request))  # into the host cache
            except ValueError as error:
                raise APIError(400, str(error), "lora_path", code="invalid_lora_adapter") from error
            self.loras[name] = lora_request
        finally:
            self._lora_busy.discard(name)
        return Response(f"Success: LoRA adapter '{name}' added successfully.", media_type="text/plain")

    async def unload_lora_adapter(self, body: UnloadLoRAAdapterRequest) -> Response:
        """vLLM's: stop serving the adapter and free it in every tier; 409 while unfinished requests use it."""
        name = body.lora_name
        self._check_lora_enabled()
        if name not in self.loras:
            raise APIError(404, f"The lora adapter '{name}' cannot be found.", "lora_name", code="lora_not_found")
        self._claim_lora_name(name)
        # Unlisted first, so that no request names it while the engine unloads it.
        lora_request = self.loras.pop(name)
        try:
            await self.engine.call(lambda engine: engine.unload_lora(lora_request.lora_int_id))
        except LoRAInUseError as error:
            self.loras[name] = lora_request
            raise APIError(409, f"The lora adapter '{name}' is in use by unfinished requests; finish or abort "
                           f"them first ({error})", "lora_name", code="lora_in_use") from error
        except BaseException:
            self.loras[name] = lora_request
            raise
        finally:
            self._lora_busy.discard(name)
        return Response(f"Success: LoRA adapter '{name}' removed successfully.", media_type="text/plain")

    def _check_lora_enabled(self) -> None:
        if not self.lora_enabled:
            raise APIError(400, "LoRA is not enabled on this server; start it with --enable-lora",
                           code="lora_not_enabled")

    def _claim_lora_name(self, name: str) -> None:
        if name in self._lora_busy:
            raise APIError(409, f"The lora adapter '{name}' is being loaded or unloaded; retry later", "lora_name",
                           code="lora_busy")
        self._lora_busy.add(name)

    async def health(self) -> Response:
        """200 while requests are served ({"status": "ok"}, or "degraded" for a while after a step fault, with the
        fault); 503 when the engine stopped, or a step has run past --step-timeout-s ("hung")."""
        if not self.engine.is_running:
            raise APIError(503, "the engine is not running", code="engine_not_running")
        health = self.engine.health()
        body = {"status": health.status, "faults": health.num_faults, "last_fault": health.last_fault}
        if health.step_seconds is not None:
            body["step_seconds"] = round(health.step_seconds, 3)
        return JSONResponse(body, status_code=200 if health.serving else 503)

    async def metrics_text(self) -> Response:
        content, content_type = self.metrics.exposition()
        return Response(content, headers={"Content-Type": content_type})

    # -- requests into the engine -----------------------------------------------------------------------
    def _served(self, model: str) -> LoRARequest | None:
        """The adapter served as `model` (None: the base model); a 404 if this server serves no such model."""
        lora_request = self.loras.get(model)
        if model != self.model_name and lora_request is None:
            served = ", ".join(f"`{n}`" for n in (self.model_name, *self.loras))
            raise APIError(404, f"The model `{model}` does not exist; this server serves {served}",
                           "model", code="model_not_found")
        return lora_request

    def _check_request(self, body: CompletionRequest | ChatCompletionRequest) -> LoRARequest | None:
        """The adapter the `model` field names (None: the base model); APIError if the request cannot be served."""
        lora_request = self._served(body.model)
        check_request(body, self.config)
        return lora_request

    async def _off_loop(self, work: Callable) -> Any:
        """work(tokenizer) in a tokenizer thread, with that thread's own copy of the tokenizer."""
        def run() -> Any:
            tokenizer = getattr(self._worker_tokenizers, "tokenizer", None)
            if tokenizer is None:
                tokenizer = self._worker_tokenizers.tokenizer = copy.deepcopy(self.tokenizer)
            return work(tokenizer)

        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, run)

    async def _submit(self, request_id: str, prompts: list[str | list[int]], params: SamplingParams,
                      prompt_param: str, max_tokens_param: str, lora_request: LoRARequest | None,
                      body: CompletionRequest | ChatCompletionRequest) -> RequestGroup:
        try:
            return await self.engine.add_requests(request_id, prompts, params, lora_request, body.priority,
                                                  body.length_hint)
        except ValueError as error:
            raise engine_rejection(str(error), body, prompt_param, max_tokens_param) from error

    # -- outputs --------------------------------------------------------------------------------------
    @property
    def _timeout(self) -> float | None:
        return self.config.request_timeout_s or None

    def _timed_out(self) -> APIError:
        return APIError(408, f"the request ran past the server's limit of {self.config.request_timeout_s:g} s "
                        "(--request-timeout-s) and was aborted", code="request_timeout")

    async def _collect(self, group: RequestGroup, raw: Request) -> dict[int, RequestOutput] | None:
        """The final output of each prompt, or None if the client disconnected first (its requests are aborted);
        past the request timeout, an APIError (its requests aborted too)."""

        async def final_outputs() -> dict[int, RequestOutput]:
            return {index: output async for index, output in group if output.finished}

        collecting = asyncio.ensure_future(final_outputs())
        disconnect = asyncio.ensure_future(_client_disconnected(raw))
        try:
            done, _ = await asyncio.wait((collecting, disconnect), timeout=self._timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            collecting.cancel()
            disconnect.cancel()
            group.close()
        if not done:
            raise self._timed_out()
        return collecting.result() if collecting in done else None

    def _event_stream(self, events: AsyncIterator[str], group: RequestGroup) -> StreamingResponse:
        deadline = None if self._timeout is None else time.monotonic() + self._timeout

        keepalive_s = self.config.sse_keepalive_s or None

        async def next_event() -> str | None:
            return await anext(events, None)

        async def framed() -> AsyncIterator[str]:
            # The next event is awaited in a task of its own: a keep-alive between events must not cancel it.
            waiting: asyncio.Future[str | None] | None = None
            try:
                while True:
                    remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                    waiting = waiting or asyncio.ensure_future(next_event())
                    done, _ = await asyncio.wait({waiting}, timeout=_earliest(remaining, keepalive_s))
                    if not done:
                        if deadline is not None and time.monotonic() >= deadline:
                            raise TimeoutError
                        # An SSE comment: clients ignore it, proxies see the connection alive.
                        yield ": keep-alive\n\n"
                        continue
                    event, waiting = waiting.result(), None
                    if event is None:
                        break
                    yield event
            except TimeoutError:
                yield _sse(self._timed_out().body)
            except EngineNotRunningError as error:  # the engine failed or stopped mid-stream
                yield _sse(APIError(503, str(error), code="engine_not_running").body)
            except RequestFailedError as error:  # a fault in the engine traced to this request
                yield _sse(_failed(error).body)
            finally:
                if waiting is not None:
                    waiting.cancel()
                group.close()  # the client went away (the generator is closed early): abort what is left
            yield "data: [DONE]\n\n"

        # The background task also aborts when Starlette cancels the stream on a disconnect between events.
        return StreamingResponse(framed(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                 background=BackgroundTask(group.close))

    # -- streams --------------------------------------------------------------------------------------
    async def _completion_events(self, group: RequestGroup, body: CompletionRequest, request_id: str,
                                 created: int) -> AsyncIterator[str]:
        progress: dict[int, _ChoiceProgress] = {}
        finals: list[RequestOutput] = []
        async for prompt_index, output in group:
            for c in output.outputs:
                index = prompt_index * body.n + c.index
                sent = progress.setdefault(index, _ChoiceProgress())
                if sent.finished or not _has_news(c, sent, body.logprobs is not None):
                    continue
                logprobs = None
                if body.logprobs is not None:
                    logprobs = self.responses.completion_logprobs(c, sent.tokens, body.logprobs, sent.text_offset)
                    sent.text_offset += sum(map(len, logprobs.tokens))
                choice = CompletionChoice(index=index, text=c.text[sent.text:], logprobs=logprobs,
                                          finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                _advance(sent, c)
                yield _sse(CompletionResponse(id=request_id, created=created, model=body.model,
                                              choices=[choice]))
            if output.finished:
                finals.append(output)
        if body.include_usage:
            yield _sse(CompletionResponse(id=request_id, created=created, model=body.model, choices=[],
                                          usage=usage(finals)))

    async def _chat_events(self, group: RequestGroup, body: ChatCompletionRequest, request_id: str, created: int,
                           num_top: int | None) -> AsyncIterator[str]:
        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
            return _sse(ChatCompletionChunk(id=request_id, created=created, model=body.model, choices=choices,
                                            usage=usage))

        # As OpenAI does: the role first, before any token, which also starts the response at once.
        for index in range(body.n):
            yield chunk([ChatStreamChoice(index=index, delta=ChatDelta(role="assistant", content=""))])
        progress = [_ChoiceProgress() for _ in range(body.n)]
        final: RequestOutput | None = None
        async for _, output in group:
            for c in output.outputs:
                sent = progress[c.index]
                if sent.finished or not _has_news(c, sent, num_top is not None):
                    continue
                logprobs = None if num_top is None else self.responses.chat_logprobs(c, sent.tokens, num_top)
                choice = ChatStreamChoice(index=c.index, delta=ChatDelta(content=c.text[sent.text:]),
                                          logprobs=logprobs, finish_reason=c.finish_reason,
                                          stop_reason=c.stop_reason)
                _advance(sent, c)
                yield chunk([choice])
            final = output
        if body.include_usage and final is not None:
            yield chunk([], usage([final]))

def _earliest(*timeouts: float | None) -> float | None:
    """The shortest of the timeouts given (None: no timeout)."""
    return min((t for t in timeouts if t is not None), default=None)


def _has_news(c: CompletionOutput, sent: _ChoiceProgress, with_logprobs: bool) -> bool:
    return (len(c.text) > sent.text or c.finish_reason is not None
            or (with_logprobs and len(c.token_ids) > sent.tokens))


def _advance(sent: _ChoiceProgress, c: CompletionOutput) -> None:
    sent.text, sent.tokens, sent.finished = len(c.text), len(c.token_ids), c.finish_reason is not None


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


def _sse(model: BaseModel) -> str:
    return f"data: {model.model_dump_json()}\n\n"


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def _request_id(prefix: str, raw: Request) -> str:
    """The request's id: the client's X-Request-Id header where it sends one (as vLLM takes it), else a random one."""
    given = raw.headers.get("x-request-id")
    if given is None:
        return f"{prefix}-{uuid.uuid4().hex}"
    if not _REQUEST_ID.fullmatch(given):
        raise APIError(400, "the X-Request-Id header must be 1 to 128 letters, digits or ._:- characters",
                       "x-request-id", code="invalid_value")
    return f"{prefix}-{given}"


async def _client_disconnected(raw: Request) -> None:
    # The body was read already, so the next message the server sends the app is the disconnect.
    while (await raw.receive())["type"] != "http.disconnect":
        pass


def _client_gone() -> Response:
    return Response(status_code=499)  # nginx's "client closed request": nobody reads it, metrics count it


class _LimitBody:
    """ASGI middleware: a body over `max_bytes` gets a 413, by its Content-Length before it is read, or as soon
    as its chunks pass the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _refusal(self) -> Response:
        return _error_response(APIError(
            413, f"the request body is larger than the server's limit of {self.max_bytes} bytes (--max-body-bytes)",
            code="body_too_large", headers={"Connection": "close"}))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._refusal()(scope, receive, send)
            return
        received, refused = 0, False

        async def counted() -> dict:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # a chunked body: refuse it, and tell the app the client left
                refused = True
                await self._refusal()(scope, receive, send)
                return {"type": "http.disconnect"}
            return message

        async def unless_refused(message: dict) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counted, unless_refused)


class _LimitHeaders:
    """ASGI middleware: a request with more than `max_count` headers, or with more than `max_bytes` of them in
    all, gets a 431."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_count: int) -> None:
        self.app = app
        self.max_bytes, self.max_count = max_bytes, max_count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope["headers"]
            size = sum(len(name) + len(value) for name, value in headers)
            problem = None
            if len(headers) > self.max_count:
                problem = (f"{len(headers)} headers, more than the server's limit of {self.max_count} "
                           "(--max-header-count)")
            elif size > self.max_bytes:
                problem = (f"{size} bytes of headers, more than the server's limit of {self.max_bytes} "
                           "(--max-header-bytes)")
            if problem is not None:
                error = APIError(431, f"the request has {problem}", code="headers_too_large",
                                 headers={"Connection": "close"})
                await _error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _RequireAPIKey:
    """ASGI middleware: paths under the `protected` prefixes need `Authorization: Bearer <key>`."""

    def __init__(self, app: ASGIApp, api_key: str, protected: tuple[str, ...]) -> None:
        self.app = app
        self.api_key = api_key.encode()
        self.protected = protected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.protected) and not self._authorized(scope):
            error = APIError(401, "missing or incorrect API key: send the header 'Authorization: Bearer <key>'",
                             code="invalid_api_key")
            await _error_response(error)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.api_key)


# -- error handlers ---------------------------------------------------------------------------------------
async def _api_error(_: Request, error: APIError) -> Response:
    return _error_response(error)


async def _overloaded(_: Request, error: EngineOverloadedError) -> Response:
    return _error_response(APIError(503, str(error), code="overloaded",
                                    headers={"Retry-After": str(RETRY_AFTER_S)}))


async def _engine_not_running(_: Request, error: EngineNotRunningError) -> Response:
    return _error_response(APIError(503, str(error), code="engine_not_running"))


def _failed(error: RequestFailedError) -> APIError:
    return APIError(500, f"the engine failed this request: {error}", code="request_failed")


async def _request_failed(_: Request, error: RequestFailedError) -> Response:
    # The fault was contained to this request: the server and its other requests go on, the connection too.
    return _error_response(_failed(error))


async def _invalid_request(_: Request, error: RequestValidationError) -> Response:
    problems = error.errors()
    if problems[0]["type"] == "json_invalid":
        reason = problems[0].get("ctx", {}).get("error", "")
        return _error_response(APIError(400, f"the request body is not valid JSON: {reason}",
                                        code="invalid_json"))
    return _error_response(invalid_body(problems))


async def _http_error(_: Request, error: StarletteHTTPException) -> Response:
    return _error_response(APIError(error.status_code, str(error.detail), headers=error.headers))


async def _unexpected_error(_: Request, error: Exception) -> Response:
    # Starlette re-raises the error after this response, so the server logs it with its traceback, and the server
    # then drops the connection: Connection: close tells the client not to send its next request on it.
    return _error_response(APIError(500, f"internal error: {error}", headers={"Connection": "close"}))
