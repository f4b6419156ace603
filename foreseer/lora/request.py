"""What a request names to run with a LoRA adapter (vLLM's LoRARequest)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """A PEFT LoRA adapter for a request: `lora_int_id` identifies it across requests (requests with the same id
    share its loaded weights and their prefix cache), `lora_path` is its directory."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an integer >= 1, got {self.lora_int_id!r}")
        if not self.lora_path:
            raise ValueError(f"LoRA adapter {self.lora_name!r} has no lora_path")

    @property
    def cache_salt(self) -> str:
        """Seeds the prefix cache's hash chain: KV computed under one adapter is never reused by another adapter or
        by the base model (the path guards against an id reused for other weights)."""
        return f"lora:{self.lora_int_id}:{os.path.abspath(self.lora_path)}"
