"""Multi-LoRA serving: PEFT adapters loaded beside the base model and applied per request in one batch.

The package root holds only what callers name (LoRARequest): the layers import the forward-time pieces
(`context`, `ops`, `backends`) without pulling in the manager, which sits above the scheduler's block manager."""

from foreseer.lora.request import LoRARequest

__all__ = ["LoRARequest"]
