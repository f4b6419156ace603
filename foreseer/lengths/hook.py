"""Length prediction as the engine's step hook: the probe head reads the hidden state at the end of each
request's prefill, which the forward pass computes anyway, and predicts its answer's length once."""

from __future__ import annotations

import torch

from foreseer.core.output import ModelRunnerOutput, SchedulerOutput
from foreseer.core.step_hook import StepHook
from foreseer.lengths.probe import ProbeHead


class LengthProbeHook(StepHook):
    needs_hidden_states = True

    def __init__(self, probe: ProbeHead) -> None:
        self.probe = probe

    @classmethod
    def load(cls, directory: str, hidden_size: int, device: torch.device) -> LengthProbeHook:
        return cls(ProbeHead.load(directory, hidden_size).to(device))

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
