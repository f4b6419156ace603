"""The step-hook interface: how a technique that works around the engine's steps (speculative decoding, length
prediction) plugs in, so that the step loop names none of them.

Each step the engine calls, on every hook in turn: `before_schedule` (e.g. draft tokens for the requests that
decode next), then, once the model ran, `after_execute` with what it computed (e.g. read hidden states), and
`after_update` with what the scheduler made of it (e.g. how many drafts were accepted)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from foreseer.core.output import ModelRunnerOutput, RequestUpdate, SchedulerOutput
    from foreseer.core.scheduler import Scheduler


class StepHook:
    """Does nothing by default: a hook overrides the calls it needs."""

    # The runner then returns the final hidden state of the token each request got last.
    needs_hidden_states: bool = False
    # Decoder layers (1-based) whose output the runner then returns too, at the same token (output.layer_states).
    capture_layers: tuple[int, ...] = ()
    predicts_lengths: bool = False  # it sets requests' predicted lengths (what sjf and s3 rank by)

    def before_schedule(self, scheduler: Scheduler) -> None:
        """Before the scheduler picks this step's tokens."""

    def after_execute(self, sched: SchedulerOutput, output: ModelRunnerOutput, execute_seconds: float) -> None:
        """After the model ran the scheduled tokens (`execute_seconds` of wall time) and sampled."""

    def after_update(self, updates: list[RequestUpdate]) -> None:
        """After the scheduler appended the sampled tokens to their requests."""
