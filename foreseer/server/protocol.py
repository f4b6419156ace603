"""Requests and responses of the OpenAI-compatible API, in OpenAI's shape (plus vLLM's sampling extensions)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from foreseer.sampling_params import StructuredOutputsParams

GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}  # vLLM's older names -> StructuredOutputsParams' fields


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# -- requests -----------------------------------------------------------------------------------------
class _Request(BaseModel):
    # Unknown fields are ignored, as OpenAI's and vLLM's servers do; NaN and infinity are not numbers here.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: object) -> object:
        """JSON lets a string hold a lone surrogate ("\\ud800", or the bytes ED A0 80, which Python's JSON reader
        passes through): no tokenizer or response encoder takes one, so it is refused here, naming its field."""
        _check_unicode(value)
        return value


def _check_unicode(value: object) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(f"text is not valid Unicode: a lone surrogate at character {error.start}") from None
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_unicode(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key)
            _check_unicode(item)


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingRequest(_Request):
    model: str
    n: int = Field(1, ge=1)  # at most the server's max_n
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (a string, as JSON keys are) -> bias in [-100, 100]
    # vLLM's extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    bad_words: list[str] | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # vLLM's: lower values are served first under --scheduling-policy priority
    priority: int = Field(0, ge=-(2**63), lt=2**63)
    # Foreseer's: the answer's length in tokens where the client knows it; sjf and s3 then use it, not a prediction
    length_hint: int | None = Field(None, ge=1, lt=2**63)
    # vLLM's structured outputs: its current form, and its older guided_* fields
    structured_outputs: dict | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def structured_outputs_fields(self) -> dict[str, dict]:
        """The constraints set, by the API field that set them, as StructuredOutputsParams' keyword arguments."""
        fields = {api: {name: getattr(self, api)} for api, name in GUIDED_FIELDS.items()
                  if getattr(self, api) is not None}
        if self.structured_outputs is not None:
            fields["structured_outputs"] = self.structured_outputs
        return fields

    def structured_outputs_params(self) -> tuple[StructuredOutputsParams | None, str]:
        """The request's constraint and the API field it came from; ValueError naming that field where it is
        malformed or more than one is set."""
        fields = self.structured_outputs_fields()
        if len(fields) > 1:
            raise ValueError(f"{', '.join(fields)}: set at most one")
        if not fields:
            return None, "structured_outputs"
        (api, arguments), = fields.items()
        try:
            return StructuredOutputsParams(**arguments), api
        except (TypeError, ValueError) as error:
            raise ValueError(f"{api}: {error}") from None

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for token in bias or {}:  # the values' range is SamplingParams' check
            if not (token.isascii() and token.isdigit()):
                raise ValueError(f"keys must be token ids, got {token!r}")
        return bias

    def token_id_biases(self) -> dict[int, float] | None:
        return None if self.logit_bias is None else {int(t): b for t, b in self.logit_bias.items()}

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingRequest):
    # A string, a list of token ids, or a batch of either.
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(None, ge=0)  # at most the server's max_logprobs
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    def unsupported(self) -> str | None:
        """The name of a field set to something this server cannot do, if any."""
        if self.echo:
            return "echo"
        if self.suffix:
            return "suffix"
        return "best_of" if self.best_of not in (None, self.n) else None


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContentPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class JsonSchemaFormat(_Request):
    name: str
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # None: up to the model's context
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)  # at most the server's max_logprobs
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    response_format: ResponseFormat | None = None

    def unsupported(self) -> str | None:
        if self.tools:
            return "tools"
        if self.tool_choice not in (None, "none", "auto"):
            return "tool_choice"
        return None

    def structured_outputs_fields(self) -> dict[str, dict]:
        fields = super().structured_outputs_fields()
        response_format = self.response_format
        if response_format is not None and response_format.type == "json_object":
            fields["response_format"] = {"json_object": True}
        elif response_format is not None and response_format.type == "json_schema":
            schema = response_format.json_schema
            fields["response_format"] = {"json": None if schema is None else schema.schema_}
        return fields

    def conversation(self) -> list[dict[str, str]]:
        return conversation(self.messages)


def conversation(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as chat templates take them."""
    # "developer" is OpenAI's newer name for the system role; chat templates know "system".
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]


class TokenizeRequest(_Request):
    """vLLM's /tokenize body: a completion prompt, or chat messages rendered by the model's chat template."""

    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool = True  # for messages

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Request):
    """vLLM's /detokenize body."""

    model: str
    tokens: list[int]


class LoadLoRAAdapterRequest(_Request):
    """vLLM's /v1/load_lora_adapter body."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(_Request):
    """vLLM's /v1/unload_lora_adapter body."""

    lora_name: str = Field(min_length=1)


# -- responses ----------------------------------------------------------------------------------------
class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    text_offset: list[int]
    token_logprobs: list[float]
    tokens: list[str]
    top_logprobs: list[dict[str, float]]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop string or token id that ended the choice


class CompletionResponse(BaseModel):
    """A whole completion, and also each streamed chunk (OpenAI uses the same object for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "foreseer"
    root: str
    parent: str | None = None  # a LoRA adapter's base model (vLLM's field); None for the base model
    max_model_len: int


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
