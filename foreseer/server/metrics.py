"""Prometheus metrics of one server, in a registry of its own (several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from foreseer.engine.async_engine import AsyncLLMEngine
from foreseer.lora.manager import LoRAStats
from foreseer.outputs import RequestOutput

# Bucket bounds in seconds, from a few milliseconds (a GPU) to minutes (a loaded CPU).
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0, 960.0)


class ServerMetrics:
    def __init__(self, engine: AsyncLLMEngine, endpoints: Iterable[str]) -> None:
        self.registry = CollectorRegistry()
        self.endpoints = frozenset(endpoints)
        self.http_responses = Counter(
            "foreseer_http_responses", "HTTP responses by endpoint and status code", ["endpoint", "status"],
            registry=self.registry)
        self.requests_finished = Counter(
            "foreseer_requests_finished", "Finished sequences (choices) by finish reason: stop, length or abort",
            ["finish_reason"], registry=self.registry)
        self.time_to_first_token = Histogram(
            "foreseer_time_to_first_token_seconds", "Time from arrival to the first generated token",
            buckets=TTFT_BUCKETS, registry=self.registry)
        self.time_per_output_token = Histogram(
            "foreseer_time_per_output_token_seconds", "Mean time per generated token after the first, per request",
            buckets=TPOT_BUCKETS, registry=self.registry)
        self.e2e_latency = Histogram(
            "foreseer_e2e_request_latency_seconds", "Time from arrival to the last generated token",
            buckets=E2E_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(engine))
        engine.add_finished_listener(self.observe_finished)

    def observe_finished(self, output: RequestOutput) -> None:
        """Runs on the engine thread (prometheus-client's metrics are thread-safe)."""
        for completion in output.outputs:
            self.requests_finished.labels(completion.finish_reason).inc()
        metrics = output.metrics
        if any(c.finish_reason == "abort" for c in output.outputs) or metrics.time_to_first_token is None:
            return  # an aborted request's latency says how long the client waited, not how fast we were
        self.time_to_first_token.observe(metrics.time_to_first_token)
        self.e2e_latency.observe(metrics.e2e_latency)
        longest = max(len(c.token_ids) for c in output.outputs)
        if longest > 1:
            self.time_per_output_token.observe((metrics.e2e_latency - metrics.time_to_first_token) / (longest - 1))

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def endpoint_label(self, path: str) -> str:
        # Unknown paths share one label, so that random URLs cannot grow the number of series.
        return path if path in self.endpoints else "other"


class _EngineCollector(Collector):
    """Gauges and token counters read from the engine's latest stats at scrape time."""

    def __init__(self, engine: AsyncLLMEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterable[Metric]:
        stats = self.engine.stats
        yield GaugeMetricFamily("foreseer_num_requests_running", "Sequences being generated", stats.num_running)
        yield GaugeMetricFamily("foreseer_num_requests_waiting", "Sequences waiting to be scheduled",
                                stats.num_waiting)
        yield GaugeMetricFamily("foreseer_kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1)",
                                stats.kv_cache_usage)
        yield GaugeMetricFamily("foreseer_kv_cache_used_blocks", "KV cache blocks in use (LoRA adapters' pages too)",
                                stats.kv_blocks_used)
        yield CounterMetricFamily("foreseer_prompt_tokens", "Prompt tokens prefilled", stats.prompt_tokens)
        yield CounterMetricFamily("foreseer_generation_tokens", "Tokens generated", stats.generation_tokens)
        yield from _lora_metrics(stats.lora)
        spec = stats.speculation
        if spec is None:
            return
        yield CounterMetricFamily("foreseer_spec_decode_num_draft_tokens", "Draft tokens verified",
                                  spec.num_draft_tokens)
        yield CounterMetricFamily("foreseer_spec_decode_num_accepted_tokens", "Draft tokens accepted",
                                  spec.num_accepted_tokens)
        yield CounterMetricFamily("foreseer_spec_decode_num_verifications", "Verifications of a request's draft",
                                  spec.num_verifications)
        for name, counts in (("drafted", spec.drafted_per_position), ("accepted", spec.accepted_per_position)):
            family = CounterMetricFamily(f"foreseer_spec_decode_num_{name}_tokens_per_pos",
                                         f"Draft tokens {name}, by position in the draft", labels=["position"])
            for position, count in enumerate(counts):
                family.add_metric([str(position)], count)
            yield family


def _lora_metrics(lora: LoRAStats | None) -> Iterable[Metric]:
    """The adapter tiers: device slots, host cache (disk holds the rest)."""
    if lora is None:
        return
    tiers = {"device": (lora.device_adapters, lora.device_bytes, lora.max_loras),
             "host": (lora.host_adapters, lora.host_bytes, lora.max_cpu_loras)}
    for name, index, help_text in (("adapters", 0, "LoRA adapters loaded, by tier"),
                                   ("adapter_bytes", 1, "Bytes of LoRA adapter weights loaded, by tier"),
                                   ("adapter_capacity", 2, "LoRA adapters each tier holds (max_loras, max_cpu_loras)")):
        family = GaugeMetricFamily(f"foreseer_lora_{name}", help_text, labels=["tier"])
        for tier, values in tiers.items():
            family.add_metric([tier], values[index])
        yield family
    yield GaugeMetricFamily("foreseer_lora_kv_blocks", "KV cache blocks held by LoRA adapters (unified memory)",
                            lora.device_pages)
    loads = CounterMetricFamily("foreseer_lora_loads", "LoRA adapters read from disk: waited for, or prefetched",
                                labels=["mode"])
    loads.add_metric(["sync"], lora.sync_loads)
    loads.add_metric(["prefetch"], lora.prefetch_loads)
    yield loads
    evictions = CounterMetricFamily("foreseer_lora_evictions", "LoRA adapters evicted, by tier", labels=["tier"])
    evictions.add_metric(["device"], lora.device_evictions)
    evictions.add_metric(["host"], lora.host_evictions)
    yield evictions


class ResponseCounter:
    """ASGI middleware counting every HTTP response by endpoint and status code."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = self.metrics.endpoint_label(scope["path"])

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.http_responses.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
