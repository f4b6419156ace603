"""Turns a SchedulerOutput into tensors, runs the model over the paged KV cache, and samples."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from foreseer.attention import AttentionMetadata, PrefillSegment, forward_context, get_backend
from foreseer.config import EngineConfig
from foreseer.core.output import ModelRunnerOutput, SchedulerOutput
from foreseer.models.config import ModelConfig
from foreseer.models.loader import ModelSource, iter_weights
from foreseer.models.registry import build_model
from foreseer.spec.cost_model import StepCostModel
from foreseer.worker.sampler import Sampler

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # CPUs without bf16 matrix units are far slower in half precision.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"dtype must be one of auto, {', '.join(dtypes)}; got {name!r}")
    return dtypes[name]


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, source: ModelSource) -> None:
        self.config = config
        self.model_config = model_config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.block_size = config.cache.block_size
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                self.model = build_model(model_config)
        finally:
            torch.set_default_dtype(previous)
        self.model.load_weights(iter_weights(source, model_config))
        self.model.eval()
        self.backend = get_backend(config.attention_backend, self.device, self.dtype)
        self.num_blocks = self._num_kv_blocks()
        caches = self.backend.allocate_kv_cache(
            model_config.num_hidden_layers, self.num_blocks, self.block_size,
            model_config.num_key_value_heads, model_config.head_dim, self.dtype, self.device,
        )
        for layer, cache in zip(self.model.attention_layers(), caches):
            layer.kv_cache = cache
        self.sampler = Sampler(config.seed)
        self.num_computed_tokens_total = 0  # tokens run through the model so far (prefill and decode)

    def kv_bytes_per_block(self) -> int:
        cfg = self.model_config
        element = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * cfg.num_hidden_layers * self.block_size * cfg.num_key_value_heads * cfg.head_dim * element

    def _num_kv_blocks(self) -> int:
        cache = self.config.cache
        if cache.kv_cache_gib is not None:
            budget = cache.kv_cache_gib * 2**30
        else:
            budget = cache.kv_cache_memory_fraction * free_memory_bytes(self.device)
        num_blocks = int(budget // self.kv_bytes_per_block())
        if num_blocks < 1:
            raise ValueError(f"KV cache budget of {budget / 2**30:.4f} GiB holds no block of this model")
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB)", num_blocks, self.block_size,
                    num_blocks * self.kv_bytes_per_block() / 2**30)
        return num_blocks

    def _tensor(self, data: list) -> torch.Tensor:
        return torch.tensor(data, dtype=torch.int64, device=self.device)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        # Decodes first: the backend attends over them as one batch.
        items = sorted(sched.scheduled, key=lambda s: s.num_new_tokens > 1)
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillSegment] = []
        sample_index: list[int] = []
        sample_requests = []
        sample_drafts = []
        for item in items:
            request, start, n = item.request, item.request.num_computed_tokens, item.num_new_tokens
            drafts = item.draft_token_ids
            table = request.block_table
            query_start = len(input_ids)
            input_ids.extend(request.token_ids[start:start + n - len(drafts)] + drafts)
            positions.extend(range(start, start + n))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            if n == 1:
                decode_tables.append(table)
                decode_lens.append(start + 1)
            else:  # a prefill chunk, or a token and its drafts to verify: causal over the cached context
                prefills.append(PrefillSegment(query_start, n, start, torch.tensor(table, device=self.device)))
            if start + n - len(drafts) == request.num_tokens:
                # Logits at the last real token and at each draft: the distributions that verify the drafts.
                sample_index.extend(range(len(input_ids) - len(drafts) - 1, len(input_ids)))
                sample_requests.append(request)
                sample_drafts.append(drafts)

        max_blocks = max((len(t) for t in decode_tables), default=0)
        metadata = AttentionMetadata(
            slot_mapping=self._tensor(slots),
            num_decode_tokens=len(decode_tables),
            decode_block_tables=self._tensor([t + [0] * (max_blocks - len(t)) for t in decode_tables]),
            decode_seq_lens=self._tensor(decode_lens),
            max_decode_seq_len=max(decode_lens, default=0),
            prefills=prefills,
            block_size=bs,
        )
        self.num_computed_tokens_total += len(input_ids)
        with forward_context(self.backend, metadata):
            hidden = self.model(self._tensor(input_ids), self._tensor(positions))
        if not sample_requests:
            return ModelRunnerOutput(sampled={})
        logits = self.model.compute_logits(hidden[self._tensor(sample_index)])
        tokens, logprobs = self.sampler(logits, sample_requests, sample_drafts)
        return ModelRunnerOutput(
            sampled={r.request_id: t for r, t in zip(sample_requests, tokens)}, logprobs=logprobs
        )

    @torch.inference_mode()
    def measure_step_costs(self, token_counts: Sequence[int], repeats: int = 3) -> StepCostModel:
        """Time a step of n one-token decodes (forward and logits) for each n, on a cache nobody uses yet."""
        bs = self.block_size
        counts = [n for n in token_counts if -(-n // bs) <= self.num_blocks]
        seconds = []
        for n in [counts[0], *counts]:  # the first run warms up (kernel loading, allocations) and is dropped
            slots = torch.arange(n, device=self.device)
            metadata = AttentionMetadata(
                slot_mapping=slots, num_decode_tokens=n, decode_block_tables=(slots // bs)[:, None],
                decode_seq_lens=slots % bs + 1, max_decode_seq_len=min(n, bs), prefills=[], block_size=bs,
            )
            best = float("inf")
            for _ in range(repeats):
                begin = time.perf_counter()
                with forward_context(self.backend, metadata):
                    hidden = self.model(torch.zeros_like(slots), slots % bs)
                self.model.compute_logits(hidden)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                best = min(best, time.perf_counter() - begin)
            seconds.append(best)
        logger.info("step cost: %s", ", ".join(f"{n} tok {t * 1e3:.1f} ms" for n, t in zip(counts, seconds[1:])))
        return StepCostModel(counts, seconds[1:])
