"""Admission by LoRA adapter slots: batches are composed within the `max_loras` device slots, fairly across
adapters. The scheduler sees an AdmissionGate; the policy still orders the requests.

- A waiting request whose adapter is in a slot may start (unless that adapter is being drained, below).
- A request whose adapter is not in a slot may start only if a slot is free or can be freed (its adapter has no
  running request), and only if its adapter is among the first to get one: slots go to the adapters not in a
  slot in the order of their longest-waiting request (`queued_time`), whatever the policy's order of the
  requests themselves. A request passed over does not block the requests after it.
- Starvation bound: when every slot's adapter keeps running requests, an adapter whose request has waited
  longer than `max_wait_s` (the scheduler's aging bound) has a slot drained for it: the slot's adapter with the
  fewest running requests (the least recently used among equals) admits no new request; its running ones
  finish, the slot frees, and the starved adapter takes it. So no adapter waits much longer than `max_wait_s`
  plus the longest request, while slots stay with busy adapters as long as nobody starves.
- Adapters of waiting requests are prefetched from disk into the host cache at the start of every step (in the
  background: see LoRAManager.prefetch).
"""

from __future__ import annotations

from foreseer.core.request import Request
from foreseer.core.scheduler import AdmissionError, AdmissionGate
from foreseer.lora.manager import LoRAManager


class LoRAAdmission(AdmissionGate):
    def __init__(self, manager: LoRAManager, max_wait_s: float) -> None:
        self.manager = manager
        self.max_wait_s = max_wait_s
        self.now = 0.0
        self.waiting_since: dict[int, float] = {}  # adapter id -> its longest-waiting request's queued_time
        self.queue: list[int] = []  # adapters of waiting requests not in a slot, longest waiting first
        self.draining: set[int] = set()  # adapters in slots that admit no new request, to free a slot

    def on_schedule(self, waiting: list[Request], running: list[Request], now: float) -> None:
        self.now = now
        manager = self.manager
        manager.prefetch([r.lora_request for r in waiting if r.lora_request is not None])
        since: dict[int, float] = {}
        for request in waiting:
            if request.lora_request is not None:
                lora_id = request.lora_request.lora_int_id
                since[lora_id] = min(since.get(lora_id, request.queued_time), request.queued_time)
        self.waiting_since = since
        self.queue = sorted((i for i in since if not manager.is_resident(i)), key=since.__getitem__)
        self._plan_drains()

    def _plan_drains(self) -> None:
        manager = self.manager
        starved = [i for i in self.queue if self.now - self.waiting_since[i] > self.max_wait_s]
        if not starved:
            self.draining.clear()
            return
        self.draining = {i for i in self.draining if manager.is_resident(i)}
        busy_draining = sum(1 for i in self.draining if manager.num_running(i))
        missing = len(starved) - manager.num_obtainable_slots() - busy_draining
        if missing > 0:
            candidates = [i for i in manager.loaded_ids if manager.num_running(i) and i not in self.draining]
            candidates.sort(key=manager.num_running)  # stable: least recently used first among equals
            self.draining.update(candidates[:missing])

    def admit(self, request: Request) -> bool:
        lora_request = request.lora_request
        if lora_request is None:
            return True
        manager, lora_id = self.manager, lora_request.lora_int_id
        if manager.is_resident(lora_id):
            if lora_id in self.draining:
                return False
        else:
            rank = self.queue.index(lora_id) if lora_id in self.queue else len(self.queue)
            if rank >= manager.num_obtainable_slots():
                return False
            try:
                if not manager.activate(lora_request):
                    return False
            except ValueError as error:
                raise AdmissionError(str(error)) from error
            if lora_id in self.queue:
                self.queue.remove(lora_id)
            self.draining = {i for i in self.draining if manager.is_resident(i)}
        manager.pin(lora_id)
        return True

    def may_admit(self, request: Request) -> bool:
        lora_request = request.lora_request
        if lora_request is None:
            return True
        lora_id = lora_request.lora_int_id
        if self.manager.is_resident(lora_id):
            return lora_id not in self.draining
        rank = self.queue.index(lora_id) if lora_id in self.queue else len(self.queue)
        return rank < self.manager.num_obtainable_slots()

    def release(self, request: Request) -> None:
        if request.lora_request is not None:
            self.manager.unpin(request.lora_request.lora_int_id)
