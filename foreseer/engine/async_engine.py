"""The engine behind the server: one background thread steps the engine for every request at once.

The engine is not thread-safe, so only that thread touches it. Event loops hand it work through a queue
(processed between steps) and get outputs back through `loop.call_soon_threadsafe`. Outputs are
cumulative, so a request's consumer only ever needs the newest one: a slow client costs no memory.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import queue
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from foreseer.engine.engine import LLMEngine
from foreseer.lora import LoRARequest
from foreseer.lora.manager import LoRAStats
from foreseer.outputs import RequestOutput, SpeculationFigures
from foreseer.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

Prompt = str | list[int]
T = TypeVar("T")

MAX_WAITING_REQUESTS = 256  # sequences that may wait for the engine; beyond, add_requests raises EngineOverloadedError
STEP_TIMEOUT_S = 120.0  # a step running longer is reported hung; CPU prefill chunks take seconds, not minutes
DEGRADED_WINDOW_S = 300.0  # /health reports "degraded" this long after a step fault
WATCHDOG_PERIOD_S = 1.0


class EngineOverloadedError(Exception):
    """The waiting queue is full: the client should retry later."""


class EngineNotRunningError(Exception):
    """The engine is not started, is stopping, or failed."""


class RequestFailedError(Exception):
    """The engine gave up on this request (a fault traced to it, an adapter that could no longer be read); the
    other requests go on."""


@dataclass(frozen=True)
class EngineHealth:
    status: str  # "ok"; "degraded": a step fault in the last DEGRADED_WINDOW_S; "hung": a step over its limit
    num_faults: int = 0  # step faults since the start
    last_fault: str | None = None  # the newest one: its stage, error, and the requests it failed
    step_seconds: float | None = None  # how long the step now running has taken, if one is

    @property
    def serving(self) -> bool:
        """Whether requests are being served: degraded still serves; a hung step serves nobody."""
        return self.status != "hung"


@dataclass(frozen=True)
class EngineStats:
    """A snapshot published by the engine thread; replaced as a whole, so readers in other threads see it whole."""

    num_running: int = 0  # sequences (a request with n choices counts n)
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use
    kv_blocks_used: int = 0  # KV blocks held by requests (and LoRA adapters' pages); 0 when idle without adapters
    prompt_tokens: int = 0  # total, counted when a request's prefill completes
    generation_tokens: int = 0  # total generated
    speculation: SpeculationFigures | None = None  # a copy of the engine's, when it speculates
    lora: LoRAStats | None = None  # the adapter tiers, when LoRA is enabled


class RequestGroup:
    """The engine requests of one API call (one per prompt), followed together from one event loop.

    Iterate it for `(prompt_index, cumulative_output)` pairs until every request finished; `close()` aborts
    the ones that have not (the client went away).
    """

    def __init__(self, request_ids: list[str], loop: asyncio.AbstractEventLoop,
                 abort: Callable[[str], None]) -> None:
        self.request_ids = request_ids
        self._loop = loop
        self._abort = abort
        self._accepted: asyncio.Future[None] = loop.create_future()
        self._ready = asyncio.Event()
        self._latest: dict[int, RequestOutput] = {}
        self._unfinished = set(range(len(request_ids)))
        self._error: Exception | None = None

    # Called on the event loop's thread, scheduled by the engine thread.
    def _resolve(self, error: Exception | None) -> None:
        if self._accepted.done():  # the caller gave up waiting
            return
        if error is None:
            self._accepted.set_result(None)
        else:
            self._accepted.set_exception(error)

    def _deliver(self, index: int, output: RequestOutput) -> None:
        self._latest[index] = output
        self._ready.set()

    def _fail(self, error: Exception) -> None:
        self._error = error
        self._ready.set()

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while self._unfinished:
            await self._ready.wait()
            self._ready.clear()
            if self._error is not None:
                raise self._error
            latest, self._latest = self._latest, {}
            for index in sorted(latest):
                output = latest[index]
                if output.finished:
                    self._unfinished.discard(index)
                    if output.error is not None:
                        raise RequestFailedError(output.error if len(self.request_ids) == 1
                                                 else f"prompt {index}: {output.error}")
                yield index, output

    def close(self) -> None:
        """Abort the requests that have not finished; safe to call more than once."""
        for index in self._unfinished:
            self._abort(self.request_ids[index])
        self._unfinished.clear()


@dataclass
class _Add:
    group: RequestGroup
    prompts: list[Prompt]
    params: SamplingParams
    arrival_time: float
    num_sequences: int
    lora_request: LoRARequest | None = None
    priority: int = 0
    length_hint: int | None = None


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    """Run a function with the engine on its thread, between steps; its result or error goes to `future`."""

    function: Callable[[LLMEngine], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


class _Stop:
    pass


@dataclass
class _Entry:
    group: RequestGroup
    index: int
    num_generated: int = 0  # tokens already counted in the stats


class AsyncLLMEngine:
    """Serves many concurrent callers from one engine thread, with a bounded waiting queue."""

    def __init__(self, engine: LLMEngine, max_waiting_requests: int = MAX_WAITING_REQUESTS,
                 step_timeout_s: float = STEP_TIMEOUT_S) -> None:
        if max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be >= 1, got {max_waiting_requests}")
        if not step_timeout_s > 0:
            raise ValueError(f"step_timeout_s must be > 0, got {step_timeout_s}")
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.step_timeout_s = step_timeout_s  # a step running longer is reported hung (/health, the log)
        self._step_started: float | None = None  # time.monotonic() at the start of the step now running
        self._watchdog_stop = threading.Event()
        self.stats = EngineStats()
        self._commands: queue.Queue[_Add | _Abort | _Call | _Stop] = queue.Queue()
        # Guards admission: whether requests are accepted, and how many sequences are queued but not yet added.
        self._lock = threading.Lock()
        self._accepting = False
        self._num_queued = 0
        self._entries: dict[str, _Entry] = {}  # engine thread only
        self._finished_listeners: list[Callable[[RequestOutput], None]] = []
        self._thread: threading.Thread | None = None
        self._prompt_tokens = 0
        self._generation_tokens = 0

    def add_finished_listener(self, listener: Callable[[RequestOutput], None]) -> None:
        """Called from the engine thread with the final output of every request, aborted ones included."""
        self._finished_listeners.append(listener)

    @property
    def is_running(self) -> bool:
        return self._accepting

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine loop was already started")
        self.engine.runner.reserve_kv_cache()  # a server's resident memory is flat from its first request
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="foreseer-engine", daemon=True)
        self._thread.start()
        threading.Thread(target=self._watch, name="foreseer-watchdog", daemon=True).start()

    def health(self) -> EngineHealth:
        """How the engine is doing, from any thread."""
        started, faults = self._step_started, self.engine.faults
        step_seconds = None if started is None else time.monotonic() - started
        last = faults[-1] if faults else None
        last_text = None
        if last is not None:
            last_text = f"{last.stage}: {last.error} (failed: {', '.join(last.failed) or 'none'})"
        if step_seconds is not None and step_seconds > self.step_timeout_s:
            status = "hung"
        elif last is not None and time.time() - last.time < DEGRADED_WINDOW_S:
            status = "degraded"
        else:
            status = "ok"
        return EngineHealth(status, self.engine.num_faults, last_text, step_seconds)

    def _watch(self) -> None:
        """Log a step that runs over step_timeout_s, once, with where the engine thread is."""
        reported = None
        while not self._watchdog_stop.wait(WATCHDOG_PERIOD_S):
            started = self._step_started
            if started is None or started == reported or time.monotonic() - started <= self.step_timeout_s:
                continue
            reported = started
            frame = sys._current_frames().get(self._thread.ident)
            where = "".join(traceback.format_stack(frame)) if frame is not None else "(unknown)"
            logger.error("an engine step has run for over %.0f s (step_timeout_s); /health reports the engine hung. "
                         "The engine thread is at:\n%s", self.step_timeout_s, where)

    async def stop(self) -> None:
        """Refuse new requests, abort those still unfinished, and wait for the engine thread to end."""
        with self._lock:
            self._accepting = False
        self._watchdog_stop.set()
        if self._thread is None:
            return
        self._commands.put(_Stop())
        await asyncio.to_thread(self._thread.join)

    async def add_requests(self, request_id: str, prompts: list[Prompt], params: SamplingParams,
                           lora_request: LoRARequest | None = None, priority: int = 0,
                           length_hint: int | None = None) -> RequestGroup:
        """Queue one request per prompt (with the LoRA adapter, if any, the priority and the length hint), all or
        none; returns once the engine accepted them.

        Raises ValueError (the input cannot be served), EngineOverloadedError or EngineNotRunningError.
        """
        if not prompts:
            raise ValueError("prompt is empty")
        request_ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        num_sequences = len(prompts) * params.n
        if num_sequences > self.max_waiting_requests:
            raise ValueError(f"the request asks for {num_sequences} sequences (prompts times n); this server queues "
                             f"at most {self.max_waiting_requests}")
        group = RequestGroup(request_ids, asyncio.get_running_loop(), self._request_abort)
        with self._lock:
            if not self._accepting:
                raise EngineNotRunningError("the engine is not running (shutting down or failed)")
            if self.stats.num_waiting + self._num_queued + num_sequences > self.max_waiting_requests:
                raise EngineOverloadedError(f"the server is overloaded: its queue of {self.max_waiting_requests} "
                                            "waiting sequences is full; retry later")
            self._num_queued += num_sequences
            self._commands.put(_Add(group, list(prompts), params, time.time(), num_sequences, lora_request,
                                    priority, length_hint))
        try:
            await group._accepted
        except asyncio.CancelledError:
            group.close()
            raise
        return group

    async def call(self, function: Callable[[LLMEngine], T]) -> T:
        """Run `function(engine)` on the engine thread between steps (commands run in the order they were
        sent); its exception is raised here. EngineNotRunningError if the engine is not running."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if not self._accepting:
                raise EngineNotRunningError("the engine is not running (shutting down or failed)")
            self._commands.put(_Call(function, loop, future))
        return await future

    def _request_abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    # -- the engine thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._serve()
        except Exception as error:
            logger.exception("the engine loop failed; failing every request")
            self._shut_down(EngineNotRunningError(f"the engine failed: {error}"))

    def _serve(self) -> None:
        while True:
            # Block only when idle: with work in flight, commands are picked up between steps.
            commands = self._take_commands(block=not self.engine.has_unfinished_requests())
            stop = False
            for command in commands:
                if isinstance(command, _Add):
                    self._add(command)
                elif isinstance(command, _Abort):
                    self._abort(command.request_id)
                elif isinstance(command, _Call):
                    self._run_call(command)
                else:
                    stop = True
            self._publish_stats(sum(c.num_sequences for c in commands if isinstance(c, _Add)))
            if stop:
                self._shut_down(EngineNotRunningError("the engine stopped"))
                return
            if self.engine.has_unfinished_requests():
                self._step_started = time.monotonic()
                try:
                    outputs = self.engine.step()
                finally:
                    self._step_started = None
                self._deliver(outputs)
                self._publish_stats(0)

    def _take_commands(self, block: bool) -> list[_Add | _Abort | _Call | _Stop]:
        commands = [self._commands.get()] if block else []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _add(self, command: _Add) -> None:
        group = command.group
        added: list[str] = []
        try:
            for request_id, prompt in zip(group.request_ids, command.prompts):
                self.engine.add_request(request_id, prompt, command.params, arrival_time=command.arrival_time,
                                        priority=command.priority, lora_request=command.lora_request,
                                        length_hint=command.length_hint)
                added.append(request_id)
        except Exception as error:  # a request that cannot be served must never stop this thread
            for request_id in added:
                self.engine.abort_request(request_id)
            if len(command.prompts) > 1 and isinstance(error, ValueError):
                error = ValueError(f"prompt {len(added)}: {error}")
            self._call(group, group._resolve, error)
            return
        for index, request_id in enumerate(added):
            self._entries[request_id] = _Entry(group, index)
        self._call(group, group._resolve, None)

    def _run_call(self, command: _Call) -> None:
        try:
            result, error = command.function(self.engine), None
        except Exception as exc:  # the caller's problem (e.g. a bad adapter), never this thread's
            result, error = None, exc
        self._call_soon(command.loop, _settle, command.future, result, error)

    def _abort(self, request_id: str) -> None:
        entry = self._entries.pop(request_id, None)
        output = self.engine.abort_request(request_id)
        if entry is not None and output is not None:
            self._notify_finished(output)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        deliveries: dict[asyncio.AbstractEventLoop, list[tuple[RequestGroup, int, RequestOutput]]] = {}
        for output in outputs:
            entry = self._entries[output.request_id]
            num_generated = sum(len(c.token_ids) for c in output.outputs)
            if entry.num_generated == 0 and num_generated:
                self._prompt_tokens += len(output.prompt_token_ids)
            self._generation_tokens += num_generated - entry.num_generated
            entry.num_generated = num_generated
            if output.finished:
                del self._entries[output.request_id]
                self._notify_finished(output)
            deliveries.setdefault(entry.group._loop, []).append((entry.group, entry.index, output))
        # One wake-up per event loop and step, not one per request.
        for loop, items in deliveries.items():
            self._call_soon(loop, _deliver_all, items)

    def _notify_finished(self, output: RequestOutput) -> None:
        for listener in self._finished_listeners:
            try:
                listener(output)
            except Exception:
                logger.exception("finished-request listener failed")

    def _publish_stats(self, num_added: int) -> None:
        scheduler = self.engine.scheduler
        spec = self.engine.spec_stats
        blocks = self.engine.block_manager
        stats = EngineStats(len(scheduler.running), len(scheduler.waiting), blocks.usage,
                            blocks.num_blocks - blocks.num_free_blocks, self._prompt_tokens, self._generation_tokens,
                            None if spec is None else copy.deepcopy(spec), self.engine.lora_stats())
        # Together, so that admission never sees the added sequences in neither count.
        with self._lock:
            self._num_queued -= num_added
            self.stats = stats

    def _shut_down(self, error: EngineNotRunningError) -> None:
        """Fail the callers of what is left and of every queued request, refuse new ones, free the blocks."""
        with self._lock:
            self._accepting = False
        entries, self._entries = self._entries, {}
        for entry in entries.values():
            self._call(entry.group, entry.group._fail, error)
        for command in self._take_commands(block=False):
            if isinstance(command, _Add):
                self._call(command.group, command.group._resolve, error)
            elif isinstance(command, _Call):
                self._call_soon(command.loop, _settle, command.future, None, error)
        try:
            for request_id in entries:
                output = self.engine.abort_request(request_id)
                if output is not None:
                    self._notify_finished(output)
            self._publish_stats(0)
        except Exception:  # after a failed step the engine may be beyond repair; the callers know already
            logger.exception("could not abort the remaining requests")

    def _call(self, group: RequestGroup, method: Callable, *args) -> None:
        self._call_soon(group._loop, method, *args)

    @staticmethod
    def _call_soon(loop: asyncio.AbstractEventLoop, function: Callable, *args) -> None:
        try:
            loop.call_soon_threadsafe(function, *args)
        except RuntimeError:  # the caller's event loop is closed: nobody is waiting any more
            pass


def _settle(future: asyncio.Future, result: Any, error: Exception | None) -> None:
    if future.done():  # the caller gave up waiting
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


def _deliver_all(items: list[tuple[RequestGroup, int, RequestOutput]]) -> None:
    for group, index, output in items:
        group._deliver(index, output)
