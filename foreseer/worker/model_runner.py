"""Turns a SchedulerOutput into tensors, runs the model over the paged KV cache, and samples."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from foreseer.attention import AttentionBackend, AttentionMetadata, PrefillSegment, forward_context, get_backend
from foreseer.config import EngineConfig
from foreseer.core.draft_tree import DraftTree
from foreseer.core.output import ModelRunnerOutput, SchedulerOutput
from foreseer.core.request import Request
from foreseer.layers.quantized_linear import choose_dataflows, load_kernels
from foreseer.lora.context import lora_context
from foreseer.lora.manager import LoRAManager
from foreseer.models.config import ModelConfig
from foreseer.models.loader import ModelSource, iter_weights
from foreseer.models.registry import build_model
from foreseer.spec.cost_model import StepCostModel
from foreseer.worker.sampler import Sampler

logger = logging.getLogger(__name__)

LONG_CONTEXT, LONG_CONTEXT_ROWS = 512, 8  # the long-context step that prices attention per cached token


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
        self.model = load_model(model_config, source, self.device, self.dtype, config.weight_format)
        self.backend = get_backend(config.attention_backend, self.device, self.dtype)
        self.num_blocks = self._num_kv_blocks()
        caches = self.backend.allocate_kv_cache(
            model_config.num_hidden_layers, self.num_blocks, self.block_size,
            model_config.num_key_value_heads, model_config.head_dim, self.dtype, self.device,
        )
        for layer, cache in zip(self.model.attention_layers(), caches):
            layer.kv_cache = cache
        self.lora = None
        if config.lora.enable_lora:  # unified memory: an adapter's pages are KV blocks
            self.lora = LoRAManager(config.lora, self.model, self.device, self.dtype, self.kv_bytes_per_block())
        self.sampler = Sampler(config.seed)
        self.num_computed_tokens_total = 0  # tokens run through the model so far (prefill and decode)
        self.return_hidden_states = False  # set when a draft proposer reads the target's hidden states

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
        # Decode rows first (one-token decodes and chains to verify): the backend attends over them as one batch.
        # Within each kind, requests of one LoRA adapter side by side: each adapter's rows are one slice.
        items = sorted(sched.scheduled, key=lambda s: (
            not runs_as_decode_rows(s.num_new_tokens - len(s.draft), s.draft), _lora_id(s.request)))
        segments = []
        sample_requests = []
        sample_drafts = []
        for item in items:
            request, start, draft = item.request, item.request.num_computed_tokens, item.draft
            num_real = item.num_new_tokens - len(draft)
            samples = start + num_real == request.num_tokens
            segments.append(Segment(request.token_ids[start:start + num_real], start, request.block_table, draft,
                                    samples))
            if samples:
                sample_requests.append(request)
                sample_drafts.append(draft)
        batch = prepare_batch(segments, self.block_size, self.device)
        self.num_computed_tokens_total += len(batch.input_ids)
        lora_batch = None if self.lora is None else self.lora.batch(
            [(item.num_new_tokens, item.request.lora_request) for item in items])
        with forward_context(self.backend, batch.metadata), lora_context(lora_batch):
            hidden = self.model(batch.input_ids, batch.positions)
        if not sample_requests:
            return ModelRunnerOutput(sampled={})
        sample_index = batch.sample_index
        logits = self.model.compute_logits(hidden[self._tensor(sample_index)])
        tokens, paths, logprobs = self.sampler(logits, sample_requests, sample_drafts)
        self._pack_accepted_kv(batch.sample_slots, paths)
        hidden_states = {}
        if self.return_hidden_states:
            first_row = 0
            for request, draft, path in zip(sample_requests, sample_drafts, paths):
                last_row = first_row + (path[-1] + 1 if path else 0)  # the row that gave the last emitted token
                hidden_states[request.request_id] = hidden[sample_index[last_row]].clone()
                first_row += len(draft) + 1
        return ModelRunnerOutput(
            sampled={r.request_id: t for r, t in zip(sample_requests, tokens)}, logprobs=logprobs,
            hidden_states=hidden_states,
        )

    def _pack_accepted_kv(self, slots: list[list[int]], paths: list[list[int]]) -> None:
        """Move the KV of accepted tree nodes to the slots right after their root (a chain is in place)."""
        src, dst = [], []
        for request_slots, path in zip(slots, paths):
            for depth, node in enumerate(path):
                if node != depth:
                    src.append(request_slots[node + 1])
                    dst.append(request_slots[depth + 1])
        if src:
            for layer in self.model.attention_layers():
                self.backend.move_kv(layer.kv_cache, self._tensor(src), self._tensor(dst))

    def measure_step_costs(self, token_counts: Sequence[int]) -> StepCostModel:
        return measure_step_costs(self.model, self.backend, self.block_size, self.num_blocks, self.device,
                                  token_counts)


def load_model(model_config: ModelConfig, source: ModelSource, device: torch.device, dtype: torch.dtype,
               weight_format: str = "auto") -> nn.Module:
    """Build the model for `model_config` on `device` in `dtype` and load its weights from `source`.

    Weight format "auto" keeps each matrix as stored where the quantized kernels run (a CPU, float32 activations,
    a compiler), and measures there which dataflow each weight shape takes; else every weight is expanded."""
    keep_formats = (weight_format == "auto" and device.type == "cpu" and dtype == torch.float32
                    and load_kernels() is not None)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), _parameters_on_meta():
            model = build_model(model_config)
    finally:
        torch.set_default_dtype(previous)
    model.load_weights(iter_weights(source, model_config, keep_formats), device)
    if keep_formats:
        choose_dataflows(model)
    _release_freed_memory()
    return model.eval()


def _release_freed_memory() -> None:
    """Hand the heap that loading freed (parsed checkpoint metadata, dequantization temporaries) back to the
    system, so that the process's resident memory is what it holds."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc only
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules built inside get their parameters as meta placeholders, which take no memory until the checkpoint
    fills them (a weight kept in its stored format never has a float32 copy), and skip their random
    initialization (on meta tensors it would only import torch's compiler); buffers are made as usual."""
    register = nn.Module.register_parameter
    initializers = {cls: cls.reset_parameters for cls in (nn.Linear, nn.Embedding)}

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:  # a tied weight is registered again: keep it tied
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    for cls in initializers:
        cls.reset_parameters = lambda self: None
    try:
        yield
    finally:
        nn.Module.register_parameter = register
        for cls, initializer in initializers.items():
            cls.reset_parameters = initializer


@dataclass
class Segment:
    """Tokens of one request to compute in a step: real tokens, then the nodes of a draft tree to verify."""

    token_ids: list[int]  # the real tokens, starting at position `start`
    start: int  # tokens already in the KV cache
    block_table: list[int]
    draft: DraftTree = field(default_factory=DraftTree)
    samples: bool = True  # whether logits are wanted (at the last real token and at each draft node)


@dataclass
class Batch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    sample_index: list[int]  # rows to take logits from, segment by segment
    sample_slots: list[list[int]]  # per sampling segment: cache slots of its last real token and its draft nodes


def prepare_batch(segments: Sequence[Segment], block_size: int, device: torch.device,
                  max_decode_run: int = 1) -> Batch:
    """Flatten segments (decodes first, for the backend's batched decode path) into model inputs.

    A segment of at most `max_decode_run` new tokens over cached context, followed by a chain of drafts or none,
    runs as decode rows. The target keeps 1: its prompt chunks then always take the prefill kernels, as the
    reference does. A draft model, whose numbers need not match anything, runs its catch-ups as decode rows."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    decode_tables: list[list[int]] = []
    decode_lens: list[int] = []
    prefills: list[PrefillSegment] = []
    sample_index: list[int] = []
    sample_slots: list[list[int]] = []
    for seg in segments:
        start, draft, table = seg.start, seg.draft, seg.block_table
        num_real = len(seg.token_ids)
        n = num_real + len(draft)
        query_start = len(input_ids)
        input_ids.extend(seg.token_ids + draft.token_ids)
        # Draft tokens sit at their depth after the last real token; their slots follow it in node order.
        positions.extend(range(start, start + num_real))
        positions.extend(start + num_real - 1 + depth for depth in draft.depths())
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, start + n))
        if runs_as_decode_rows(num_real, draft, start, max_decode_run):
            if prefills:
                raise ValueError("decode segments must come before prefill chunks and trees")
            # A chain's token j sees the cache up to itself: a decode row of its own, all on one block table.
            decode_tables.extend([table] * n)
            decode_lens.extend(range(start + 1, start + n + 1))
        else:  # a prefill chunk, or a token tree to verify, over the cached context
            tree_mask = None if draft.is_chain else draft.attention_mask(device)
            prefills.append(PrefillSegment(query_start, n, start, torch.tensor(table, device=device), tree_mask))
        if seg.samples:
            # Logits at the last real token and at each draft: the distributions that verify the drafts.
            sample_index.extend(range(len(input_ids) - len(draft) - 1, len(input_ids)))
            sample_slots.append(slots[-len(draft) - 1:])

    def tensor(data: list) -> torch.Tensor:
        return torch.tensor(data, dtype=torch.int64, device=device)

    max_blocks = max((len(t) for t in decode_tables), default=0)
    metadata = AttentionMetadata(
        slot_mapping=tensor(slots),
        num_decode_tokens=len(decode_tables),
        decode_block_tables=tensor([t + [0] * (max_blocks - len(t)) for t in decode_tables]),
        decode_seq_lens=tensor(decode_lens),
        max_decode_seq_len=max(decode_lens, default=0),
        prefills=prefills,
        block_size=block_size,
    )
    return Batch(tensor(input_ids), tensor(positions), metadata, sample_index, sample_slots)


def _lora_id(request: Request) -> int:
    return 0 if request.lora_request is None else request.lora_request.lora_int_id


def runs_as_decode_rows(num_real: int, draft: DraftTree, start: int = 1, max_run: int = 1) -> bool:
    """Whether a segment runs as decode rows: one new token (up to `max_run` over cached context), with or without
    a chain of drafts after it."""
    return (num_real == 1 or (start > 0 and num_real <= max_run)) and draft.is_chain


@torch.inference_mode()
def measure_step_costs(
    model: nn.Module, backend: AttentionBackend, block_size: int, num_blocks: int, device: torch.device,
    token_counts: Sequence[int], repeats: int = 5, compute_logits: Callable | None = None,
) -> StepCostModel:
    """Time a step of n one-token decodes (forward and logits) for each n, on a cache nobody uses yet, and
    the same decodes of LONG_CONTEXT_ROWS rows over a long context, for attention's cost per cached token.

    The steps are timed in turns, `repeats` rounds after a warm-up round (kernel loading, allocations), and
    each keeps its fastest time: on a shared machine a burst of load then slows one round, not one step.
    """
    compute_logits = compute_logits or model.compute_logits
    counts = [n for n in token_counts if -(-n // block_size) <= num_blocks]
    rows = min(LONG_CONTEXT_ROWS, counts[-1])
    context = min(LONG_CONTEXT, num_blocks // rows * block_size)
    steps = {n: _decode_metadata(n, 1, block_size, device) for n in counts}
    if context > 4 * block_size:
        for k_cache, v_cache in (layer.kv_cache for layer in model.attention_layers()):
            # Zeros, not whatever the fresh memory holds: denormals would slow the timing down.
            k_cache[:rows * context // block_size].zero_()
            v_cache[:rows * context // block_size].zero_()
        steps["long"] = _decode_metadata(rows, context, block_size, device)
    best = dict.fromkeys(steps, float("inf"))
    for round_index in range(repeats + 1):
        for key, metadata in steps.items():
            begin = time.perf_counter()
            with forward_context(backend, metadata):
                hidden = model(torch.zeros_like(metadata.decode_seq_lens), metadata.decode_seq_lens - 1)
            compute_logits(hidden)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_index:
                best[key] = min(best[key], time.perf_counter() - begin)
    seconds = [best[n] for n in counts]
    cost = StepCostModel(counts, seconds)
    if "long" in best:
        short_context = sum(min(i, block_size - 1) + 1 for i in range(rows))  # what the short steps read
        extra = best["long"] - cost.cost(rows)
        cost.seconds_per_context_token = max(extra, 0.0) / (rows * context - short_context)
    logger.info("step cost: %s; %.2f us per context token", ", ".join(
        f"{n} tok {t * 1e3:.1f} ms" for n, t in zip(counts, seconds)), cost.seconds_per_context_token * 1e6)
    return cost


def _decode_metadata(num_rows: int, context: int, block_size: int, device: torch.device) -> AttentionMetadata:
    """Decode rows for timing: with context 1, row i is the i-th slot of the cache with i % block_size tokens
    before it; else each row has `context` tokens in its own run of blocks."""
    if context == 1:
        slots = torch.arange(num_rows, device=device)
        return AttentionMetadata(
            slot_mapping=slots, num_decode_tokens=num_rows, decode_block_tables=(slots // block_size)[:, None],
            decode_seq_lens=slots % block_size + 1, max_decode_seq_len=min(num_rows, block_size), prefills=[],
            block_size=block_size,
        )
    blocks_per_row = context // block_size
    tables = torch.arange(num_rows * blocks_per_row, device=device).view(num_rows, blocks_per_row)
    return AttentionMetadata(
        slot_mapping=tables[:, -1] * block_size + block_size - 1, num_decode_tokens=num_rows,
        decode_block_tables=tables, decode_seq_lens=torch.full((num_rows,), blocks_per_row * block_size,
                                                               device=device),
        max_decode_seq_len=blocks_per_row * block_size, prefills=[], block_size=block_size,
    )
