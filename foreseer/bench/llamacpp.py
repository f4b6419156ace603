"""The llama.cpp baseline, through llama-cpp-python's bindings of llama.h: batch-1 greedy decode speed, batched
throughput on the `foreseer bench throughput` workload, and the memory a process holds after loading the model.

llama.cpp runs with its own defaults except where stated: float16 KV cache, flash attention on auto, n_ubatch
512, and the thread count given for both decode and batch (prompt) evaluation."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np

from foreseer.bench.machine import rss_after_load

INSTALL = 'CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=ON" pip install llama-cpp-python --no-binary llama-cpp-python'
RSS_CONTEXT = 2048  # the n_ctx of llamacpp_rss_after_load's context
PROMPT_TEXT = "The quick brown fox jumps over the lazy dog, and the dog dreams of a long walk by the river. "


def _bindings() -> ModuleType:
    try:
        import llama_cpp
    except ImportError as error:
        raise RuntimeError(f"llama.cpp baseline needs llama-cpp-python: {INSTALL}") from error
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's load and context logs
    return llama_cpp


@dataclass
class _Session:
    lib: ModuleType
    model: object
    ctx: object
    vocab: object
    n_vocab: int
    n_batch: int

    def logits(self, rows: int) -> np.ndarray:
        """The logits of the last llama_decode's `rows` outputs, [rows, n_vocab], without a copy."""
        return np.ctypeslib.as_array(self.lib.llama_get_logits(self.ctx), shape=(rows, self.n_vocab))

    def clear(self, seq_id: int = -1) -> None:
        """Drop sequence `seq_id`'s KV cells (every sequence's where -1)."""
        self.lib.llama_memory_seq_rm(self.lib.llama_get_memory(self.ctx), seq_id, -1, -1)


@contextlib.contextmanager
def _session(gguf_path: str, n_ctx: int, threads: int, n_seq_max: int = 1) -> Iterator[_Session]:
    lib = _bindings()
    lib.llama_backend_init()
    model = lib.llama_model_load_from_file(gguf_path.encode(), lib.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {gguf_path}")
    params = lib.llama_context_default_params()
    params.n_ctx, params.n_seq_max = n_ctx, n_seq_max
    params.n_threads = params.n_threads_batch = threads
    ctx = lib.llama_init_from_model(model, params)
    if not ctx:
        lib.llama_model_free(model)
        raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} tokens for {gguf_path}")
    vocab = lib.llama_model_get_vocab(model)
    try:
        yield _Session(lib, model, ctx, vocab, lib.llama_vocab_n_tokens(vocab), lib.llama_n_batch(ctx))
    finally:
        lib.llama_free(ctx)
        lib.llama_model_free(model)


def _decode(session: _Session, batch) -> None:
    status = session.lib.llama_decode(session.ctx, batch)
    if status != 0:
        raise RuntimeError(f"llama_decode failed with status {status}")


def _text_tokens(session: _Session, count: int) -> list[int]:
    """`count` token ids of a repeated English text, from llama.cpp's tokenizer (no BOS)."""
    text = (PROMPT_TEXT * (count // 8 + 1)).encode()
    buffer = (session.lib.llama_token * (len(text) + 1))()
    n = session.lib.llama_tokenize(session.vocab, text, len(text), buffer, len(buffer), False, False)
    if n < count:
        raise RuntimeError(f"the text tokenized to {n} tokens; {count} needed")
    return list(buffer[:count])


def llamacpp_decode(gguf_path: str, context: int, new_tokens: int, threads: int, repeats: int = 3) -> dict:
    """llama.cpp's batch-1 greedy decode speed after a prompt of `context` tokens.

    Each repeat clears the KV cache, evaluates the prompt (a repeated text, llama.cpp's tokenizer) in batches of
    n_batch tokens, then runs `new_tokens` single-token llama_decode calls, each followed by the argmax of its
    logits, whose token is the next call's input: a real greedy generation, EOS ignored. Only the decode steps are
    timed for tokens/s; the prompt evaluation is timed on its own. Best (fastest) of `repeats` for both."""
    with _session(gguf_path, context + new_tokens, threads) as s:
        lib = s.lib
        prompt = _text_tokens(s, context)
        chunks = [prompt[i:i + s.n_batch] for i in range(0, context, s.n_batch)]
        chunk_arrays = [(lib.llama_token * len(chunk))(*chunk) for chunk in chunks]
        token = (lib.llama_token * 1)()
        best_prompt = best_decode = float("inf")
        for _ in range(repeats):
            s.clear()
            start = time.perf_counter()
            for array in chunk_arrays:
                _decode(s, lib.llama_batch_get_one(array, len(array)))
            token[0] = int(s.logits(1).argmax())
            decode_start = time.perf_counter()
            for _ in range(new_tokens):
                _decode(s, lib.llama_batch_get_one(token, 1))
                token[0] = int(s.logits(1).argmax())
            end = time.perf_counter()
            best_prompt, best_decode = min(best_prompt, decode_start - start), min(best_decode, end - decode_start)
    return {"context": context, "new_tokens": new_tokens, "threads": threads, "repeats": repeats,
            "decode_tokens_per_s": new_tokens / best_decode, "ms_per_token": 1000 * best_decode / new_tokens,
            "prompt_eval_s": best_prompt, "prompt_tokens_per_s": context / best_prompt}


@dataclass
class _Slot:
    """One of the parallel sequences: the request it serves, how far its prompt is, what it has generated."""
    seq_id: int
    request: int = -1
    prompt: list[int] = field(default_factory=list)
    fed: int = 0  # tokens of the prompt already in the KV cache
    output: list[int] = field(default_factory=list)

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)


def llamacpp_batched_throughput(gguf_path: str, prompts: list[list[int]], max_tokens: int, threads: int,
                                n_parallel: int = 32) -> dict:
    """llama.cpp's offline throughput on `prompts` (token ids), greedy, up to `max_tokens` new tokens each, a
    request stopping at the model's end-of-generation tokens (the EOS counted as output, as Foreseer does).

    Continuous batching the way llama-server schedules it: `n_parallel` sequences in one context (n_seq_max =
    n_parallel, a KV stream per sequence of longest prompt + max_tokens cells, rounded up to a multiple of 256).
    Each llama_decode call holds one token of every generating sequence, then as many prompt tokens of the
    prefilling ones as fit in n_batch (chunked prefill); a finished sequence's KV cells are dropped
    (llama_memory_seq_rm) and its slot takes the next request. The clock runs from the first llama_decode to the
    last request's end, prompt processing included."""
    width = -(-(max(map(len, prompts)) + max_tokens) // 256) * 256  # llama.cpp's streams are multiples of 256
    with _session(gguf_path, n_parallel * width, threads, n_seq_max=n_parallel) as s:
        lib = s.lib
        batch = lib.llama_batch_init(s.n_batch, 0, 1)
        try:
            elapsed, tokens = _run_batched(s, batch, prompts, max_tokens, n_parallel)
        finally:
            lib.llama_batch_free(batch)
    output_tokens = sum(map(len, tokens))
    return {"num_requests": len(prompts), "n_parallel": n_parallel, "threads": threads, "max_tokens": max_tokens,
            "prompt_tokens": sum(map(len, prompts)), "output_tokens": output_tokens, "elapsed_s": elapsed,
            "output_tokens_per_s": output_tokens / elapsed, "requests_per_s": len(prompts) / elapsed}


def _run_batched(s: _Session, batch, prompts: list[list[int]], max_tokens: int,
                 n_parallel: int) -> tuple[float, list[list[int]]]:
    """The scheduling loop of llamacpp_batched_throughput: (seconds, each request's output tokens)."""
    lib = s.lib
    results: list[list[int]] = [[] for _ in prompts]
    slots = [_Slot(seq_id) for seq_id in range(n_parallel)]
    waiting = iter(range(len(prompts)))

    def assign(slot: _Slot) -> None:
        slot.request = next(waiting, -1)
        slot.prompt, slot.fed, slot.output = (prompts[slot.request], 0, []) if slot.request >= 0 else ([], 0, [])

    for slot in slots:
        assign(slot)
    start = time.perf_counter()
    while any(slot.request >= 0 for slot in slots):
        n, sampled = 0, []  # sampled: the slots whose last batch token gives their next token, in output order

        def add(slot: _Slot, token: int, pos: int, logits: bool) -> None:
            nonlocal n
            batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = token, pos, 1, int(logits)
            batch.seq_id[n][0] = slot.seq_id
            n += 1

        for slot in slots:
            if slot.request >= 0 and not slot.prefilling:
                add(slot, slot.output[-1], len(slot.prompt) + len(slot.output) - 1, True)
                sampled.append(slot)
        for slot in slots:
            if slot.request >= 0 and slot.prefilling and n < s.n_batch:
                take = min(len(slot.prompt) - slot.fed, s.n_batch - n)
                for i in range(slot.fed, slot.fed + take):
                    add(slot, slot.prompt[i], i, i == len(slot.prompt) - 1)
                slot.fed += take
                if not slot.prefilling:
                    sampled.append(slot)
        batch.n_tokens = n
        _decode(s, batch)
        for slot, token in zip(sampled, s.logits(len(sampled)).argmax(axis=1).tolist()):
            slot.output.append(token)
            if lib.llama_vocab_is_eog(s.vocab, token) or len(slot.output) >= max_tokens:
                results[slot.request] = slot.output
                s.clear(slot.seq_id)
                assign(slot)
    return time.perf_counter() - start, results


def llamacpp_rss_after_load(gguf_path: str, threads: int) -> int:
    """The resident set size in bytes of a fresh Python process after llama-cpp-python loaded `gguf_path`:
    Llama(model_path, n_ctx=RSS_CONTEXT, ...), llama.cpp's defaults otherwise (weights memory-mapped, and read in
    at load, so resident; a float16 KV cache of RSS_CONTEXT tokens; its compute buffers), interpreter included."""
    _bindings()
    return rss_after_load(
        "from llama_cpp import Llama\n"
        f"llm = Llama(model_path={gguf_path!r}, n_ctx={RSS_CONTEXT}, n_threads={threads}, "
        f"n_threads_batch={threads}, verbose=False)\n")
