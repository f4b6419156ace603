"""Length prediction as the engine's step hook, on hidden states the forward pass computes anyway.

- `LengthProbeHook`: the probe head reads the final hidden state at the end of each request's prefill and predicts
  its answer's length once.
- `RemainingLengthHook`: the remaining-length head reads one decoder layer's output at the end of the prefill and
  again every `refresh_tokens` generated tokens, and gives each request a distribution over the tokens it has left
  (`request.length_estimate`), which the scheduler's policies read.
"""

from __future__ import annotations

import os
import time

import torch

from foreseer.core.output import ModelRunnerOutput, SchedulerOutput
from foreseer.core.request import Request
from foreseer.core.step_hook import StepHook
from foreseer.lengths.probe import CONFIG_FILE as PROBE_CONFIG
from foreseer.lengths.probe import ProbeHead, default_probe_dir
from foreseer.lengths.remaining import CONFIG_FILE as REMAINING_CONFIG
from foreseer.lengths.remaining import RemainingHead, default_head_dir


class LengthProbeHook(StepHook):
    needs_hidden_states = True
    predicts_lengths = True

    def __init__(self, probe: ProbeHead) -> None:
        self.probe = probe

    def after_execute(self, sched: SchedulerOutput, output: ModelRunnerOutput, execute_seconds: float) -> None:
        """A request's first hidden state comes from the end of its prefill: one prediction per sequence group
        (the n sequences of one prompt), from the last of its sequences in this step."""
        if not output.hidden_states:
            return
        requests = {item.request.request_id: item.request for item in sched.scheduled}
        unpredicted = {}
        for request_id, hidden in output.hidden_states.items():
            request = requests[request_id]
            if request.predicted_length is None:
                unpredicted[id(request.group)] = (request, hidden)
        if unpredicted:
            states = torch.stack([hidden for _, hidden in unpredicted.values()])
            lengths = torch.tensor([r.num_prompt_tokens for r, _ in unpredicted.values()], device=states.device)
            for (request, _), length in zip(unpredicted.values(), self.probe.predict(states, lengths)):
                request.predicted_length = length


class RemainingLengthHook(StepHook):
    predicts_lengths = True

    def __init__(self, head: RemainingHead, refresh_tokens: int) -> None:
        if refresh_tokens < 1:
            raise ValueError(f"length_refresh_tokens must be >= 1, got {refresh_tokens!r}")
        self.head = head
        self.refresh_tokens = refresh_tokens
        self.capture_layers = (head.config.layer,)
        self.seconds = 0.0  # spent predicting, for the benchmarks' share of step time
        self.num_predictions = 0

    def is_due(self, request: Request) -> bool:
        estimate = request.length_estimate
        if request.has_length_hint:
            return False
        return estimate is None or request.num_output_tokens - estimate.at_tokens >= self.refresh_tokens

    def after_execute(self, sched: SchedulerOutput, output: ModelRunnerOutput, execute_seconds: float) -> None:
        if not output.layer_states:
            return
        start = time.perf_counter()
        layer = self.head.config.layer
        due = [(item.request, output.layer_states[item.request.request_id][layer]) for item in sched.scheduled
               if item.request.request_id in output.layer_states and self.is_due(item.request)]
        if not due:
            return
        requests = [request for request, _ in due]
        device = due[0][1].device
        estimates = self.head.predict(
            torch.stack([state for _, state in due]),
            torch.tensor([r.num_output_tokens for r in requests], device=device),
            torch.tensor([r.num_prompt_tokens for r in requests], device=device))
        for request, estimate in zip(requests, estimates):
            request.length_estimate = estimate
            if request.predicted_length is None:  # the whole answer, as predicted at the end of the prefill
                request.predicted_length = round(estimate.mean(0, request.max_tokens))
        self.seconds += time.perf_counter() - start
        self.num_predictions += len(due)


def create_length_hook(name: str, model: str, hidden_size: int, device: torch.device,
                       refresh_tokens: int) -> StepHook:
    """The hook of `name`: "remaining" or "probe" (the heads shipped for `model`), or a trained head's directory."""
    directory = {"remaining": default_head_dir, "probe": default_probe_dir}.get(name, lambda _: name)(model)
    if os.path.isfile(os.path.join(directory, REMAINING_CONFIG)):
        return RemainingLengthHook(RemainingHead.load(directory, hidden_size).to(device), refresh_tokens)
    if os.path.isfile(os.path.join(directory, PROBE_CONFIG)):
        return LengthProbeHook(ProbeHead.load(directory, hidden_size).to(device))
    raise ValueError(f"length_predictor {name!r} is not 'remaining', 'probe' or a directory with {REMAINING_CONFIG} "
                     f"or {PROBE_CONFIG}")
