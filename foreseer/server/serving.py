"""What the HTTP server and `foreseer run-batch` share: OpenAI requests turned into the engine's inputs (sampling
parameters, prompts), and the engine's outputs into OpenAI's response bodies. Nothing of FastAPI here, so that the
offline command does not load the web stack."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from jinja2 import TemplateError

from foreseer.outputs import CompletionOutput, Logprob, RequestOutput
from foreseer.sampling_params import SamplingParams
from foreseer.server.config import ServerConfig
from foreseer.server.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ErrorInfo,
    ErrorResponse,
    TopLogprob,
    UsageInfo,
)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 error_type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse(error=ErrorInfo(
            message=message, param=param, code=code,
            type=error_type or ("invalid_request_error" if status < 500 else "server_error")))
        self.headers = headers


def check_request(body: CompletionRequest | ChatCompletionRequest, limits: ServerConfig) -> None:
    """APIError if the request asks for something this server cannot do, or for more than its limits allow."""
    unsupported = body.unsupported()
    if unsupported is not None:
        raise APIError(400, f"{unsupported} is not supported by this server", unsupported,
                       code="unsupported_parameter")
    counts = {"n": (body.n, limits.max_n, "max_n")}
    if isinstance(body, CompletionRequest):
        counts["prompt"] = (len(body.prompts()), limits.max_prompts, "max_prompts")
        counts["logprobs"] = (body.logprobs or 0, limits.max_logprobs, "max_logprobs")
    else:
        counts["messages"] = (len(body.messages), limits.max_messages, "max_messages")
        counts["top_logprobs"] = (body.top_logprobs or 0, limits.max_logprobs, "max_logprobs")
    for param, (value, limit, flag) in counts.items():
        if value > limit:
            raise APIError(400, f"{param} asks for {value}; this server allows at most {limit} "
                           f"(--{flag.replace('_', '-')})", param, code="limit_exceeded")


def completion_sampling_params(body: CompletionRequest) -> SamplingParams:
    return _sampling_params(body, body.max_tokens, body.logprobs, {})


def chat_sampling_params(body: ChatCompletionRequest) -> tuple[SamplingParams, int | None, str]:
    """The request's sampling parameters, its number of top logprobs (None: no logprobs), and the name of the field
    that set max_tokens (for errors about it)."""
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
    num_top = (body.top_logprobs or 0) if body.logprobs else None
    if body.max_completion_tokens is not None:
        max_tokens, max_tokens_param = body.max_completion_tokens, "max_completion_tokens"
    else:
        max_tokens, max_tokens_param = body.max_tokens, "max_tokens"
    params = _sampling_params(body, max_tokens, num_top, {"max_tokens": max_tokens_param, "logprobs": "top_logprobs"})
    return params, num_top, max_tokens_param


def _sampling_params(body: CompletionRequest | ChatCompletionRequest, max_tokens: int | None, logprobs: int | None,
                     api_names: dict[str, str]) -> SamplingParams:
    try:
        structured_outputs, structured_field = body.structured_outputs_params()
    except ValueError as error:
        raise APIError(400, str(error), str(error).split(":")[0]) from error
    api_names = {**api_names, "structured_outputs": structured_field}
    try:
        return SamplingParams(
            n=body.n, temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, min_p=body.min_p or 0.0,
            seed=body.seed, max_tokens=max_tokens, stop=body.stop, stop_token_ids=body.stop_token_ids,
            ignore_eos=body.ignore_eos, logprobs=logprobs,
            include_stop_str_in_output=body.include_stop_str_in_output,
            skip_special_tokens=body.skip_special_tokens, presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            logit_bias=body.token_id_biases(), min_tokens=body.min_tokens, bad_words=body.bad_words,
            structured_outputs=structured_outputs)
    except ValueError as error:
        # "SamplingParams.<field> <problem>": report it under the API's name for that field.
        match = re.fullmatch(r"SamplingParams\.(\w+) (.*)", str(error), re.DOTALL)
        if match is None:
            raise APIError(400, str(error)) from error
        param = api_names.get(match[1], match[1])
        raise APIError(400, f"{param} {match[2]}", param) from error


def render_chat(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    """The token ids of the messages in the tokenizer's chat template."""
    if tokenizer.chat_template is None:
        raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
    try:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                tokenize=True, return_dict=True)
    except (TemplateError, ValueError) as error:
        raise APIError(400, f"the model's chat template rejected the messages: {error}", "messages") from error
    return list(encoded["input_ids"])


def engine_rejection(message: str, body: CompletionRequest | ChatCompletionRequest, prompt_param: str,
                     max_tokens_param: str) -> APIError:
    """The 400 for the engine's own checks (empty prompt, too long, max_tokens beyond the context, token ids past
    the vocabulary or a grammar that does not compile, naming their SamplingParams field), under the request field
    at fault."""
    field = re.search(r"SamplingParams\.(\w+) ", message)
    param = field[1] if field else max_tokens_param if "max_tokens" in message else prompt_param
    if param == "structured_outputs":  # named as the request set it (response_format, guided_json, ...)
        param = body.structured_outputs_params()[1]
    return APIError(400, message, param)


def invalid_body(problems: Sequence[Mapping[str, Any]]) -> APIError:
    """The 400 for a body that is no valid request: pydantic's problems, each at ("body", field, ...)."""
    # Of the problems with the first field, the deepest is the most precise (e.g. inside one member of a union).
    first = max((p for p in problems if p["loc"][:2] == problems[0]["loc"][:2]), key=lambda p: len(p["loc"]))
    # Union members add their type names to loc (e.g. "list[int]"), which only confuse.
    path = [str(p) for p in first["loc"][1:] if isinstance(p, int) or ("[" not in p and p not in ("str", "int"))]
    param = ".".join(path) or None
    message = f"{param}: {first['msg']}" if param else f"the request body: {first['msg']}"
    if "input" in first and first["type"] != "missing" and param:
        message += f" (got {_short(first['input'])})"
    others = {p["loc"][:2] for p in problems} - {first["loc"][:2]}
    if others:
        message += f"; and problems with {len(others)} more field(s)"
    return APIError(400, message, param, code="invalid_value")


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def usage(outputs: Iterable[RequestOutput]) -> UsageInfo:
    outputs = list(outputs)
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class ResponseBuilder:
    """Response bodies and their logprobs, with token texts decoded by `tokenizer` (cached: one per token id)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._token_texts: dict[int, str] = {}

    def completion_response(self, body: CompletionRequest, request_id: str, created: int,
                            outputs: Mapping[int, RequestOutput]) -> CompletionResponse:
        """The response to a completions request whose prompts (by index) gave `outputs`."""
        choices = [
            CompletionChoice(
                index=prompt_index * body.n + c.index, text=c.text,
                logprobs=None if body.logprobs is None else self.completion_logprobs(c, 0, body.logprobs, 0),
                finish_reason=c.finish_reason, stop_reason=c.stop_reason)
            for prompt_index, output in sorted(outputs.items()) for c in output.outputs
        ]
        return CompletionResponse(id=request_id, created=created, model=body.model, choices=choices,
                                  usage=usage(outputs.values()))

    def chat_response(self, body: ChatCompletionRequest, request_id: str, created: int, output: RequestOutput,
                      num_top: int | None) -> ChatCompletionResponse:
        choices = [
            ChatChoice(index=c.index, message=ChatResponseMessage(content=c.text),
                       logprobs=None if num_top is None else self.chat_logprobs(c, 0, num_top),
                       finish_reason=c.finish_reason, stop_reason=c.stop_reason)
            for c in output.outputs
        ]
        return ChatCompletionResponse(id=request_id, created=created, model=body.model, choices=choices,
                                      usage=usage([output]))

    def token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def _top(self, logprobs: dict[int, Logprob], num_top: int) -> list[tuple[str, float]]:
        ranked = sorted((lp.rank, token_id, lp.logprob) for token_id, lp in logprobs.items() if lp.rank <= num_top)
        return [(self.token_text(token_id), logprob) for _, token_id, logprob in ranked]

    def completion_logprobs(self, c: CompletionOutput, start: int, num_top: int,
                            text_offset: int) -> CompletionLogprobs:
        """Logprobs of the choice's tokens from `start` on, the first token at character `text_offset`."""
        result = CompletionLogprobs(text_offset=[], token_logprobs=[], tokens=[], top_logprobs=[])
        for token_id, logprobs in zip(c.token_ids[start:], c.logprobs[start:]):
            text = self.token_text(token_id)
            result.tokens.append(text)
            result.token_logprobs.append(logprobs[token_id].logprob)
            result.top_logprobs.append(dict(self._top(logprobs, num_top)))
            result.text_offset.append(text_offset)
            text_offset += len(text)
        return result

    def chat_logprobs(self, c: CompletionOutput, start: int, num_top: int) -> ChatLogprobs:
        def entry(token: str, logprob: float) -> TopLogprob:
            return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))

        content = []
        for token_id, logprobs in zip(c.token_ids[start:], c.logprobs[start:]):
            chosen = entry(self.token_text(token_id), logprobs[token_id].logprob)
            top = [entry(token, logprob) for token, logprob in self._top(logprobs, num_top)]
            content.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=top))
        return ChatLogprobs(content=content)
