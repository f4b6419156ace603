"""Foreseer: an exact, fast LLM inference and serving engine."""

from foreseer.llm import LLM
from foreseer.lora import LoRARequest
from foreseer.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from foreseer.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "CompletionOutput", "Logprob", "LoRARequest", "RequestMetrics", "RequestOutput", "SamplingParams",
           "StructuredOutputsParams"]
__version__ = "0.1.0"
