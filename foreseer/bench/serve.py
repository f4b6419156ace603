"""Online serving benchmark: ShareGPT questions sent as streaming chat completions to any OpenAI-compatible server.

Only the HTTP API is used, so the same run measures Foreseer, vLLM or any other server. Requests arrive as a
Poisson process at --request-rate (or all at once for inf), at most --max-concurrency in flight. Each request asks
for --max-tokens, or, with --output-len-from-dataset, for as many tokens as the dataset's own answer to it has (at
most --max-tokens), as vLLM's ShareGPT serving benchmark does: a workload of short and long requests.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import asdict, dataclass

import httpx
import numpy as np
from tqdm import tqdm

from foreseer.bench.data import DEFAULT_DATASET, load_sharegpt_questions, sharegpt_answer_budgets
from foreseer.bench.report import write_json


@dataclass
class ServeBenchArgs:
    base_url: str = "http://127.0.0.1:8000"  # the server's address
    model: str | None = None  # model name to request (default: the first model the server lists)
    dataset: str = DEFAULT_DATASET  # ShareGPT-format JSON file of the prompts
    num_prompts: int = 100  # requests, one per prompt
    request_rate: float = math.inf  # requests per second, Poisson arrivals; inf sends all at once
    max_concurrency: int | None = None  # requests in flight at most
    max_tokens: int = 256  # new tokens per request at most
    output_len_from_dataset: bool = False  # each request's max_tokens: its dataset answer's length, at most max_tokens
    tokenizer: str = "smollm2-135m-instruct"  # model whose tokenizer counts the dataset answers' tokens
    seed: int = 0  # seed of the arrival times
    api_key: str | None = None  # sent as 'Authorization: Bearer <key>'
    output_json: str | None = None  # write the report to this JSON file
    timeout_s: float = 600.0  # the longest wait for the next byte of a response


@dataclass
class RequestResult:
    ok: bool
    latency_s: float  # end to end, as the client sees it
    ttft_s: float | None = None  # until the first chunk that carries output
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


async def send_chat_request(client: httpx.AsyncClient, model: str, question: str, max_tokens: int,
                            headers: dict[str, str]) -> RequestResult:
    """One streaming chat completion, timed from the moment it is sent."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft = None
    content_chunks = 0
    usage = None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")
                return RequestResult(False, time.perf_counter() - start,
                                     error=f"HTTP {response.status_code}: {detail[:300]}")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    return RequestResult(False, time.perf_counter() - start, error=json.dumps(event["error"]))
                usage = event.get("usage") or usage
                for choice in event.get("choices") or []:
                    if (choice.get("delta") or {}).get("content") or choice.get("finish_reason"):
                        if ttft is None:
                            ttft = time.perf_counter() - start
                        content_chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        return RequestResult(False, time.perf_counter() - start, error=f"{type(error).__name__}: {error}")
    latency = time.perf_counter() - start
    if usage is None:  # a server without stream_options: one chunk per token is the usual approximation
        return RequestResult(True, latency, ttft, 0, content_chunks)
    return RequestResult(True, latency, ttft, usage["prompt_tokens"], usage["completion_tokens"])


def request_lengths(args: ServeBenchArgs) -> tuple[list[str], list[int]]:
    """The questions and each one's max_tokens."""
    if not args.output_len_from_dataset:
        return load_sharegpt_questions(args.dataset, args.num_prompts), [args.max_tokens] * args.num_prompts
    from foreseer.models.loader import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(args.tokenizer))
    budgets = sharegpt_answer_budgets(tokenizer, args.dataset, args.num_prompts, 0, args.max_tokens)
    return [question for _, question, _ in budgets], [limit for _, _, limit in budgets]


async def benchmark(args: ServeBenchArgs) -> dict:
    questions, max_tokens = request_lengths(args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    # Unlimited connections: the benchmark's own limits are the arrival rate and --max-concurrency.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(args.timeout_s, connect=30.0)
    async with httpx.AsyncClient(base_url=args.base_url, limits=limits, timeout=timeout) as client:
        model = args.model or await _first_model(client, headers)
        in_flight = asyncio.Semaphore(args.max_concurrency or len(questions))
        bar = tqdm(total=len(questions), desc="bench serve", unit="req")

        async def one(question: str, limit: int) -> RequestResult:
            async with in_flight:
                result = await send_chat_request(client, model, question, limit, headers)
            bar.update(1)
            return result

        arrivals = random.Random(args.seed)
        tasks = []
        start = time.perf_counter()
        for i, (question, limit) in enumerate(zip(questions, max_tokens)):
            if i and math.isfinite(args.request_rate):
                await asyncio.sleep(arrivals.expovariate(args.request_rate))
            tasks.append(asyncio.create_task(one(question, limit)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
    return _report(args, model, results, duration, max_tokens)


def _report(args: ServeBenchArgs, model: str, results: list[RequestResult], duration: float,
            max_tokens: list[int]) -> dict:
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_tokens for r in done)
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    return {
        "base_url": args.base_url, "model": model, "dataset": args.dataset, "num_prompts": len(results),
        # JSON has no infinity
        "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
        "max_concurrency": args.max_concurrency, "max_tokens": args.max_tokens,
        "output_len_from_dataset": args.output_len_from_dataset, "mean_max_tokens": sum(max_tokens) / len(max_tokens),
        "duration_s": duration, "completed": len(done), "failed": len(results) - len(done),
        "total_prompt_tokens": prompt_tokens, "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration, "output_throughput": output_tokens / duration,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration,
        "ttft_ms": _summary([r.ttft_s for r in done]),
        "tpot_ms": _summary([r.tpot_s for r in done]),
        "e2e_latency_ms": _summary([r.latency_s for r in done]),
        "errors": errors,
        "requests": [{**asdict(r), "tpot_s": r.tpot_s, "max_tokens": limit} for r, limit in zip(results, max_tokens)],
    }


def _summary(seconds: list[float | None]) -> dict[str, float | None]:
    values = np.array([s for s in seconds if s is not None]) * 1000
    if not len(values):
        return {"mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"mean": float(values.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99),
            "max": float(values.max())}


async def _first_model(client: httpx.AsyncClient, headers: dict[str, str]) -> str:
    try:
        response = await client.get("/v1/models", headers=headers)
        response.raise_for_status()
    except httpx.HTTPError as error:
        raise ValueError(f"cannot list the models of the server at {client.base_url}: {error}") from error
    models = response.json()["data"]
    if not models:
        raise ValueError(f"the server at {client.base_url} lists no models")
    return models[0]["id"]


def run(args: ServeBenchArgs) -> dict:
    report = asyncio.run(benchmark(args))
    print(format_report(report))
    write_json(report, args.output_json)
    return report


def format_report(report: dict) -> str:
    lines = [
        f"model {report['model']} at {report['base_url']}: request rate {report['request_rate']}, "
        f"max concurrency {report['max_concurrency']}, max tokens {report['max_tokens']}"
        + (f" (the dataset answers' lengths, {report['mean_max_tokens']:.0f} on average)"
           if report["output_len_from_dataset"] else ""),
        f"completed {report['completed']}, failed {report['failed']} in {report['duration_s']:.1f} s",
        f"request throughput {report['request_throughput']:.3f} req/s, output {report['output_throughput']:.1f} "
        f"tok/s, total {report['total_token_throughput']:.1f} tok/s",
        f"{'(ms)':<16}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("end-to-end", "e2e_latency_ms")):
        values = [report[key][q] for q in ("mean", "p50", "p90", "p99")]
        lines.append(f"{name:<16}" + "".join(f"{v:>10.1f}" if v is not None else f"{'-':>10}" for v in values))
    for error, count in report["errors"].items():
        lines.append(f"failed x{count}: {error}")
    return "\n".join(lines)
