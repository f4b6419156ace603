"""Shared test helpers: reference computations with Hugging Face transformers, random PEFT adapters and prompts,
and a server on a loopback port."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import httpx
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from foreseer.config import EngineConfig
from foreseer.engine.async_engine import AsyncLLMEngine
from foreseer.engine.engine import LLMEngine
from foreseer.server import create_app
from foreseer.server.config import ServerConfig


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int | None = None) -> list[list[int]]:
    """Greedy continuation of each prompt, one at a time (no padding), stopping at EOS if given."""
    results = []
    for prompt in prompts:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_token_id,
                pad_token_id=0, min_new_tokens=0,
            )
        results.append(out[0, len(prompt):].tolist())
    return results


def make_adapter(base: str, directory: str, seed: int, **lora_config) -> str:
    """A PEFT LoRA adapter for `base` with random weights (PEFT starts lora_B at zero, which would change nothing)."""
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    model = peft.get_peft_model(model, peft.LoraConfig(**lora_config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    model.save_pretrained(directory)
    return directory


def random_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in lengths]


@contextmanager
def running_server(model: str, lora_modules: Mapping[str, str] | None = None,
                   **options) -> Iterator[tuple[str, AsyncLLMEngine]]:
    """A server on a free loopback port, in a thread; stops (and stops its engine) when the block ends. `options`
    are ServerConfig's fields and the engine's arguments."""
    server_fields = {f.name for f in dataclasses.fields(ServerConfig)}
    config = ServerConfig(**{k: v for k, v in options.items() if k in server_fields})
    engine_args = {k: v for k, v in options.items() if k not in server_fields}
    engine = AsyncLLMEngine(LLMEngine(EngineConfig.from_kwargs(model, **engine_args)), config.max_waiting_requests,
                            config.step_timeout_s)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = create_app(engine, config, lora_modules)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", engine
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample, keyed by name and sorted labels."""
    text = httpx.get(url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}
