"""Fault injection, for the tests and `foreseer bench reliability` only: an engine step fails where real faults
happen (as the model run starts, inside an attention kernel halfway through the layers, in one request's
sampling) or hangs, so that containment (LLMEngine.step) and the server's watchdog can be shown to work.

`FaultInjector(engine, faults).install()` wraps the runner's methods on that engine alone; `remove()` undoes it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from foreseer.core.output import SchedulerOutput
from foreseer.core.request import Request
from foreseer.engine.engine import LLMEngine
from foreseer.outputs import RequestOutput
from foreseer.sampling_params import SamplingParams

FaultSite = Literal["step", "kernel", "sampling", "hang"]


class InjectedFault(RuntimeError):
    """The exception an injected fault raises."""


@dataclass
class Fault:
    """Where to fail, and when.

    site: "step" raises as the step's model run starts; "kernel" raises in an attention kernel halfway through
    the layers (after the first half wrote their KV); "sampling" raises while sampling `request_id`'s token
    (the runner traces that one to its request); "hang" sleeps `seconds` in the step, then goes on.
    at_step: the engine step (1-based, counted from install) it fires at; None: any step it matches.
    request_id: it fires only in steps that compute this request (the API request's id, or one sequence's).
    times: how many times it fires; None: every time it matches.
    """

    site: FaultSite
    at_step: int | None = None
    request_id: str | None = None
    times: int | None = 1
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.site not in ("step", "kernel", "sampling", "hang"):
            raise ValueError(f"unknown fault site {self.site!r}")
        if self.site == "sampling" and self.request_id is None:
            raise ValueError("a sampling fault needs the request_id whose sampling fails")


def belongs_to(request: Request, request_id: str) -> bool:
    """Whether the engine sequence is `request_id`, or one of the sequences of the API request of that id."""
    return request.request_id == request_id or request.request_id.rpartition("#")[0] == request_id


class FaultInjector:
    def __init__(self, engine: LLMEngine, faults: list[Fault]) -> None:
        self.engine = engine
        self.faults = list(faults)
        self.num_steps = 0  # model runs since install
        self.fired: list[tuple[Fault, int]] = []  # each firing, with its step
        self._remaining = {id(f): f.times for f in self.faults}
        self._armed_kernel: Fault | None = None  # a kernel fault due in this step's forward
        self._attention_calls = 0
        self._originals: dict[str, tuple[object, Callable]] = {}
        self._fused_decoder = None  # the runner's, set aside while installed

    def install(self) -> FaultInjector:
        runner = self.engine.runner
        # Kernel faults are injected into the attention backend's Python entry, which a fused decode step (one C++
        # call for every layer) never passes: while installed, every step runs the model's modules.
        self._fused_decoder, runner.fused_decoder = runner.fused_decoder, None
        self._wrap(runner, "execute", self._execute)
        self._wrap(runner.backend, "forward", self._attention)
        self._wrap(runner.sampler, "_emit", self._emit)
        return self

    def remove(self) -> None:
        for name, (owner, _) in self._originals.items():
            delattr(owner, name.rpartition(".")[2])
        self._originals.clear()
        self.engine.runner.fused_decoder = self._fused_decoder

    def _wrap(self, owner: object, name: str, wrapper: Callable) -> None:
        original = getattr(owner, name)
        self._originals[f"{type(owner).__name__}.{name}"] = (owner, original)
        setattr(owner, name, lambda *args, **kwargs: wrapper(original, *args, **kwargs))

    def _due(self, fault: Fault, requests: list[Request]) -> bool:
        if self._remaining[id(fault)] == 0:
            return False
        if fault.at_step is not None and fault.at_step != self.num_steps:
            return False
        return fault.request_id is None or any(belongs_to(r, fault.request_id) for r in requests)

    def _fire(self, fault: Fault) -> None:
        if self._remaining[id(fault)] is not None:
            self._remaining[id(fault)] -= 1
        self.fired.append((fault, self.num_steps))

    def _execute(self, original: Callable, sched: SchedulerOutput):
        self.num_steps += 1
        requests = [item.request for item in sched.scheduled]
        self._armed_kernel, self._attention_calls = None, 0
        for fault in self.faults:
            if fault.site == "sampling" or not self._due(fault, requests):
                continue
            if fault.site == "kernel":
                self._armed_kernel = fault
                continue
            self._fire(fault)
            if fault.site == "hang":
                time.sleep(fault.seconds)
            else:
                raise InjectedFault(f"injected fault at step {self.num_steps}")
        try:
            return original(sched)
        finally:
            self._armed_kernel = None

    def _attention(self, original: Callable, *args, **kwargs):
        self._attention_calls += 1
        fault = self._armed_kernel
        if fault is not None and self._attention_calls > self.engine.model_config.num_hidden_layers // 2:
            self._armed_kernel = None
            self._fire(fault)
            raise InjectedFault(f"injected attention-kernel fault at step {self.num_steps}")
        return original(*args, **kwargs)

    def _emit(self, original: Callable, request: Request, *args, **kwargs):
        for fault in self.faults:
            if fault.site == "sampling" and self._due(fault, [request]):
                self._fire(fault)
                raise InjectedFault(f"injected sampling fault for {request.request_id} at step {self.num_steps}")
        return original(request, *args, **kwargs)


def run_requests(engine: LLMEngine, requests: list[tuple[str, list[int], SamplingParams]],
                 faults: list[Fault]) -> tuple[dict[str, RequestOutput], FaultInjector]:
    """Run the requests (id, prompt, params) to completion with the faults injected: each request's final output,
    and the injector (what fired). The engine must be idle; it is again after."""
    injector = FaultInjector(engine, faults).install()
    try:
        for request_id, prompt, params in requests:
            engine.add_request(request_id, prompt, params)
        finals = {}
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    finals[output.request_id] = output
    finally:
        injector.remove()
    return finals, injector


def answers(finals: dict[str, RequestOutput]) -> dict[str, list]:
    """Each completed request's tokens and text, and its logprobs rounded: a batch of another shape sums in
    another order, which moves a logprob in its 7th digit."""
    return {rid: [(c.token_ids, c.text, c.logprobs and [{t: round(lp.logprob, 4) for t, lp in top.items()}
                                                        for top in c.logprobs]) for c in out.outputs]
            for rid, out in finals.items() if out.error is None}
