"""Multi-LoRA serving: PEFT adapters loaded beside the base model and applied per request in one batch."""

from foreseer.lora.adapter import LoRAAdapter, load_adapter
from foreseer.lora.context import LoRABatch, apply_lora, lora_context
from foreseer.lora.manager import LoRAManager
from foreseer.lora.request import LoRARequest

__all__ = ["LoRAAdapter", "LoRABatch", "LoRAManager", "LoRARequest", "apply_lora", "load_adapter", "lora_context"]
