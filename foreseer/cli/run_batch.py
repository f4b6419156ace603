"""foreseer run-batch: requests in the OpenAI Batch API's file format, run together on the offline engine, their
results written in the same format, as `vllm run-batch` does.

Each input line is {"custom_id", "method": "POST", "url": "/v1/completions" or "/v1/chat/completions", "body"};
each output line (in the input's order) is {"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}. A body the server would refuse gets the server's status and error body; a line that is no request at
all (not JSON, no custom_id, another url) gets `"response": null` and an `error`. Neither stops the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from foreseer.cli.serve import add_chat_template_argument, set_chat_template
from foreseer.commands import add_dataclass_arguments, add_engine_arguments, from_args, make_llm
from foreseer.sampling_params import SamplingParams
from foreseer.server.config import ServerConfig
from foreseer.server.protocol import ChatCompletionRequest, CompletionRequest
from foreseer.server.serving import (
    APIError,
    ResponseBuilder,
    chat_sampling_params,
    check_request,
    completion_sampling_params,
    engine_rejection,
    invalid_body,
    render_chat,
)

# Each endpoint's request body, and the prefix of its responses' ids (the server's).
ENDPOINTS = {"/v1/completions": (CompletionRequest, "cmpl"),
             "/v1/chat/completions": (ChatCompletionRequest, "chatcmpl")}
# The server's settings that mean something offline: the model's name and what one request may ask for.
SERVER_FIELDS = ("served_model_name", "max_prompts", "max_messages", "max_n", "max_logprobs")


class BadLine(Exception):
    """A line that is no batch request: it gets an error instead of a response."""

    def __init__(self, message: str, custom_id: str | None = None) -> None:
        super().__init__(message)
        self.custom_id = custom_id


@dataclass
class _Request:
    """A request ready for the engine, and where its prompts sit among all the batch's prompts."""

    custom_id: str
    request_id: str
    body: CompletionRequest | ChatCompletionRequest
    prompts: list[list[int]]
    params: SamplingParams
    num_top: int | None  # chat's top logprobs (None: none asked)
    max_tokens_param: str
    first_prompt: int = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", "--input-file", required=True, help="the requests, one JSON object a line")
    parser.add_argument("-o", "--output-file", required=True, help="where the results go, one JSON object a line")
    add_chat_template_argument(parser)
    add_dataclass_arguments(parser.add_argument_group("requests"), ServerConfig,
                            exclude=[f.name for f in dataclasses.fields(ServerConfig) if f.name not in SERVER_FIELDS])
    add_engine_arguments(parser)


def main(args: argparse.Namespace) -> int:
    config = from_args(ServerConfig, args)
    with open(args.input_file, encoding="utf-8") as file:
        lines = [line for line in file if line.strip()]
    llm = make_llm(args)
    set_chat_template(llm, args)
    model_name = config.served_model_name or args.model
    results: list[dict[str, Any]] = [{}] * len(lines)
    requests: dict[int, _Request] = {}
    prompts: list[list[int]] = []
    for number, line in enumerate(lines):
        try:
            request = _prepare(line, model_name, config, llm.tokenizer)
        except BadLine as error:
            results[number] = {"id": _line_id(), "custom_id": error.custom_id, "response": None,
                               "error": {"code": "invalid_request", "message": str(error)}}
            continue
        except _Refused as refused:
            results[number] = _line(refused.custom_id, refused.request_id, refused.error.status, refused.error.body)
            continue
        request.first_prompt = len(prompts)
        prompts += request.prompts
        requests[number] = request
    each = [r for r in requests.values() for _ in r.prompts]  # each prompt's request
    # With a length predictor, sequence scheduling batches the requests by their predicted lengths.
    outputs = llm.generate(prompts, [r.params for r in each], use_tqdm=False, priority=[r.body.priority for r in each],
                           length_hint=[r.body.length_hint for r in each],
                           batching="seqsched" if args.length_predictor else "continuous")
    builder = ResponseBuilder(llm.tokenizer)
    created = int(time.time())
    for number, request in requests.items():
        mine = dict(enumerate(outputs[request.first_prompt:request.first_prompt + len(request.prompts)]))
        failed = next((o.error for o in mine.values() if o.error), None)
        body = request.body
        if failed is not None:
            prompt_param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
            error = engine_rejection(failed, body, prompt_param, request.max_tokens_param)
            results[number] = _line(request.custom_id, request.request_id, error.status, error.body)
            continue
        if isinstance(body, ChatCompletionRequest):
            response = builder.chat_response(body, request.request_id, created, mine[0], request.num_top)
        else:
            response = builder.completion_response(body, request.request_id, created, mine)
        results[number] = _line(request.custom_id, request.request_id, 200, response)
    with open(args.output_file, "w", encoding="utf-8") as file:
        for result in results:
            file.write(json.dumps(result, ensure_ascii=False) + "\n")
    answered = sum(r["response"] is not None and r["response"]["status_code"] == 200 for r in results)
    print(f"{answered} of {len(results)} requests answered; results in {args.output_file}", file=sys.stderr)
    return 0


class _Refused(Exception):
    """A batch request whose body the server would refuse: it gets the server's error response."""

    def __init__(self, custom_id: str, request_id: str, error: APIError) -> None:
        super().__init__(str(error))
        self.custom_id, self.request_id, self.error = custom_id, request_id, error


def _prepare(line: str, model_name: str, config: ServerConfig, tokenizer) -> _Request:
    """The line's request, tokenized, as the server takes it; BadLine if it is no batch request, _Refused if the
    server would refuse its body."""
    try:
        item = json.loads(line)
    except json.JSONDecodeError as error:
        raise BadLine(f"the line is not valid JSON: {error}") from error
    if not isinstance(item, dict) or not isinstance(item.get("custom_id"), str):
        raise BadLine("the line must be a JSON object with a string custom_id")
    custom_id = item["custom_id"]
    if item.get("method") != "POST":
        raise BadLine(f"method must be POST, got {item.get('method')!r}", custom_id)
    if item.get("url") not in ENDPOINTS:
        raise BadLine(f"url must be one of {', '.join(ENDPOINTS)}, got {item.get('url')!r}", custom_id)
    request_type, id_prefix = ENDPOINTS[item["url"]]
    request_id = f"{id_prefix}-{uuid.uuid4().hex}"
    try:
        try:
            body = request_type.model_validate(item.get("body"))
        except ValidationError as error:
            raise invalid_body([{**p, "loc": ("body", *p["loc"])} for p in error.errors()]) from error
        if body.model != model_name:
            raise APIError(404, f"The model `{body.model}` does not exist; this batch runs `{model_name}`", "model",
                           code="model_not_found")
        if body.stream:
            raise APIError(400, "a batch request cannot stream", "stream", code="unsupported_parameter")
        check_request(body, config)
        if isinstance(body, ChatCompletionRequest):
            params, num_top, max_tokens_param = chat_sampling_params(body)
            prompts = [render_chat(tokenizer, body.conversation(), True)]
        else:
            params, num_top, max_tokens_param = completion_sampling_params(body), None, "max_tokens"
            prompts = [p if isinstance(p, list) else tokenizer.encode(p) for p in body.prompts()]
    except APIError as error:
        raise _Refused(custom_id, request_id, error) from error
    return _Request(custom_id, request_id, body, prompts, params, num_top, max_tokens_param)


def _line_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


def _line(custom_id: str, request_id: str, status: int, body: BaseModel) -> dict[str, Any]:
    return {"id": _line_id(), "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body.model_dump(mode="json")},
            "error": None}
