"""The offline API in vLLM's shape: LLM(...).generate(prompts, params) and .chat(messages, params)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from tqdm import tqdm

from foreseer.config import EngineConfig
from foreseer.engine.engine import LLMEngine, check_length_hint
from foreseer.lengths.batching import BatchingStrategy, Job, get_strategy
from foreseer.lora import LoRARequest
from foreseer.outputs import CompletionOutput, RequestMetrics, RequestOutput
from foreseer.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

Prompt = str | list[int]
# vLLM's prompt dicts: {"prompt": text} (TextPrompt) or {"prompt_token_ids": [...]} (TokensPrompt).
PromptDict = dict[str, str | list[int]]
PROMPT_DICT_KEYS = {"prompt": str, "prompt_token_ids": list}
Message = dict[str, str]


class LLM:
    def __init__(self, model: str = "smollm2-135m-instruct", **engine_args) -> None:
        self.engine = LLMEngine(EngineConfig.from_kwargs(model, **engine_args))
        self._counter = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        llm = cls.__new__(cls)
        llm.engine, llm._counter = LLMEngine(config), 0
        return llm

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | PromptDict | Sequence[Prompt | PromptDict],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
        batching: str | BatchingStrategy = "continuous",
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        length_hint: int | Sequence[int | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; a prompt that cannot be served gets an output with `error` set.

        `length_hint`: each answer's length where it is known (e.g. from an earlier run of the same prompts),
        which the length-aware policies (sjf, s3) then use instead of predicting it.

        `lora_request` runs every prompt, or each prompt (a list), with a LoRA adapter (None: the base model);
        the engine needs enable_lora=True.

        `batching` cuts the prompts into batches: "continuous" (the engine's scheduler, the default), "static"
        (fixed batches in arrival order) or "seqsched" (sequence scheduling by predicted length), or a
        configured strategy from foreseer.lengths.batching. Outputs come back in the prompts' order.

        A prompt is a string, a list of token ids, or vLLM's {"prompt": text} or {"prompt_token_ids": [...]};
        a dict of another shape raises ValueError.
        """
        strategy = get_strategy(batching)
        if isinstance(prompts, str | dict) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = [_unwrap(prompt) for prompt in prompts]
        params_list = _per_prompt(sampling_params or SamplingParams(), len(prompts), "sampling_params")
        priorities = _per_prompt(priority if priority is not None else 0, len(prompts), "priority")
        loras = _per_prompt(lora_request, len(prompts), "lora_request")
        hints = _per_prompt(length_hint, len(prompts), "length_hint")
        results: dict[str, RequestOutput] = {}
        order = []
        jobs = []
        for prompt, params, prio, lora, hint in zip(prompts, params_list, priorities, loras, hints):
            request_id = str(self._counter)
            self._counter += 1
            order.append(request_id)
            try:
                token_ids = self.engine.tokenize_prompt(prompt)
                reserved = 0
                if lora is not None:
                    self.engine.load_lora(lora)
                    reserved = self.engine.lora.pages(lora.lora_int_id)  # unified memory: its KV pages
                max_tokens = self.engine.check_lengths(len(token_ids), params, reserved)
                self.engine.check_vocabulary(params)
                check_length_hint(hint)
            except ValueError as error:
                logger.warning("request %s rejected: %s", request_id, error)
                results[request_id] = _rejected(request_id, prompt, str(error))
                continue
            jobs.append(Job(request_id, prompt, token_ids, params, max_tokens, prio, lora, hint))
        bar = tqdm(total=len(jobs), desc="generate", disable=not use_tqdm, unit="req")

        def finished(output: RequestOutput) -> None:
            results[output.request_id] = output
            bar.update(1)

        strategy.run(self, jobs, finished)
        bar.close()
        return [results[request_id] for request_id in order]

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix block (e.g. between benchmark runs); the engine must be idle."""
        if self.engine.has_unfinished_requests():
            raise ValueError("reset_prefix_cache needs an idle engine")
        self.engine.block_manager.reset_prefix_cache()

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation and generate the assistant's reply."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c, add_generation_prompt) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)

    def apply_chat_template(self, conversation: list[Message], add_generation_prompt: bool = True) -> list[int]:
        if self.tokenizer.chat_template is None:
            raise ValueError("this model's tokenizer has no chat template")
        ids = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                 tokenize=True, return_dict=True)["input_ids"]
        return list(ids)


def _unwrap(prompt: Prompt | PromptDict) -> Prompt:
    """A prompt dict's text or token ids (the engine checks what they hold); other prompts as they are."""
    if not isinstance(prompt, dict):
        return prompt
    keys = set(prompt)
    if len(keys) != 1 or not keys <= PROMPT_DICT_KEYS.keys():
        raise ValueError(f"a prompt dict must have exactly one of the keys 'prompt' (text) or 'prompt_token_ids', "
                         f"got keys {sorted(map(str, keys))}")
    (key, value), = prompt.items()
    if not isinstance(value, PROMPT_DICT_KEYS[key]):
        raise ValueError(f"a prompt dict's {key!r} must be a {PROMPT_DICT_KEYS[key].__name__}, "
                         f"got {type(value).__name__}")
    return value


def _per_prompt(value, count: int, name: str) -> list:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries for {count} prompts")
        return list(value)
    return [value] * count


def _rejected(request_id: str, prompt: Prompt, error: str) -> RequestOutput:
    return RequestOutput(
        request_id=request_id,
        prompt=prompt if isinstance(prompt, str) else None,
        prompt_token_ids=[] if isinstance(prompt, str) else list(prompt),
        outputs=[CompletionOutput(0, "", [], None, None, finish_reason="error")],
        finished=True,
        metrics=RequestMetrics(arrival_time=time.time()),
        error=error,
    )
