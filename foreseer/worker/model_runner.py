"""Turns a SchedulerOutput into tensors, runs the model over the paged KV cache, and samples."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from foreseer.attention import AttentionMetadata, forward_context, get_backend
from foreseer.config import EngineConfig
from foreseer.core.output import ModelRunnerOutput, SchedulerOutput
from foreseer.core.request import Request
from foreseer.layers.quantized_linear import choose_dataflows, load_kernels
from foreseer.lora.context import LoRABatch, lora_context
from foreseer.lora.manager import LoRAManager
from foreseer.models.config import ModelConfig
from foreseer.models.cpu_decoder import FusedCpuDecoder
from foreseer.models.loader import ModelSource, iter_weights, load_model_config, resolve_model
from foreseer.models.registry import build_model
from foreseer.worker.inputs import Segment, prepare_batch, runs_as_decode_rows
from foreseer.worker.profiling import StepCostModel, measure_step_costs
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
        self.model = load_model(model_config, source, self.device, self.dtype, config.weight_format)
        self.backend = get_backend(config.attention_backend, self.device, self.dtype)
        self.num_blocks = self._num_kv_blocks()
        caches = self.backend.allocate_kv_cache(
            model_config.num_hidden_layers, self.num_blocks, self.block_size,
            model_config.num_key_value_heads, model_config.head_dim, self.dtype, self.device,
        )
        for layer, cache in zip(self.model.attention_layers(), caches):
            layer.kv_cache = cache
        self.fused_decoder: FusedCpuDecoder | None = None
        self.refresh_fused_decoder()
        self.lora: LoRAManager | None = None  # the engine's, when it serves adapters: each step's adapter batch
        self.sampler = Sampler(config.seed)
        self.num_computed_tokens_total = 0  # tokens run through the model so far (prefill and decode)
        self.return_hidden_states = False  # set when a step hook reads the target's hidden states
        self._captured: dict[int, torch.Tensor] = {}  # decoder layer (1-based) -> its output this step
        self._capture_handles: list = []

    @property
    def capture_layers(self) -> tuple[int, ...]:
        """Decoder layers (1-based) whose output (the residual stream after them) each step returns, at the same
        tokens as the final hidden states: the states a length predictor reads, which the forward computes anyway."""
        return tuple(sorted(self._captured))

    @capture_layers.setter
    def capture_layers(self, layers: Sequence[int]) -> None:
        decoder_layers = self.model.decoder_layers()
        for layer in layers:
            if not 1 <= layer <= len(decoder_layers):
                raise ValueError(f"capture layer {layer!r} is not in [1, {len(decoder_layers)}]")
        for handle in self._capture_handles:
            handle.remove()
        self._captured = dict.fromkeys(layers)
        self._capture_handles = [decoder_layers[layer - 1].register_forward_hook(self._capture_hook(layer))
                                 for layer in self._captured]

    def _capture_hook(self, layer: int) -> Callable:
        def capture(module: nn.Module, args: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> None:
            self._captured[layer] = self.model.residual_stream(output)
        return capture

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
        hidden = self._forward(batch.input_ids, batch.positions, batch.metadata, lora_batch)
        if not sample_requests:
            return ModelRunnerOutput(sampled={})
        sample_index = batch.sample_index
        logits = self.model.compute_logits(hidden[self._tensor(sample_index)])
        tokens, paths, logprobs = self.sampler(logits, sample_requests, sample_drafts)
        self._pack_accepted_kv(batch.sample_slots, paths)
        hidden_states, layer_states = {}, {}
        if self.return_hidden_states or self._captured:
            rows, first_row = [], 0
            for draft, path in zip(sample_drafts, paths):
                rows.append(sample_index[first_row + (path[-1] + 1 if path else 0)])  # gave the last emitted token
                first_row += len(draft) + 1
            rows = self._tensor(rows)
            if self.return_hidden_states:
                hidden_states = dict(zip((r.request_id for r in sample_requests), hidden[rows]))
            if self._captured:  # one gather per layer; each request gets views of its row
                gathered = {n: out[rows] for n, out in self._captured.items()}
                layer_states = {r.request_id: {n: states[i] for n, states in gathered.items()}
                                for i, r in enumerate(sample_requests)}
        return ModelRunnerOutput(
            sampled={r.request_id: t for r, t in zip(sample_requests, tokens)}, logprobs=logprobs,
            hidden_states=hidden_states, layer_states=layer_states,
        )

    def reserve_kv_cache(self) -> None:
        """Make every page of the KV pool resident now. A CPU pool is allocated empty, so its pages become resident
        as blocks are first used, and a server's memory would creep up for hours to the pool's size, as a leak
        does; a long-running server reserves it at start instead, as llama.cpp and vLLM do. Every value is written
        back as it is (times one), so blocks already holding a cached prefix keep it."""
        for layer in self.model.attention_layers():
            for cache in layer.kv_cache:
                cache.mul_(1)

    def refresh_fused_decoder(self) -> None:
        """Decode steps as one C++ call where the model, its weights and the backend allow (else the modules). Call
        again after replacing the model's modules or weights (a merged adapter): the fused decoder holds the ones
        it was built from."""
        self.fused_decoder = FusedCpuDecoder.build(self.model, self.backend) if self.device.type == "cpu" else None

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
                 lora_batch: LoRABatch | None = None) -> torch.Tensor:
        """The target's final hidden states for a step: one fused call for a decode step without adapters where
        the model has a fused decoder (the same numbers), else its modules; the captured layers' outputs either way."""
        fused = self.fused_decoder
        if fused is not None and lora_batch is None and fused.supports(metadata, len(input_ids)):
            hidden, captured = fused(input_ids, positions, metadata, self.capture_layers)
            self._captured.update(captured)
            return hidden
        with forward_context(self.backend, metadata), lora_context(lora_batch):
            return self.model(input_ids, positions)

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

    def use_lora(self, manager: LoRAManager) -> None:
        """Run each step with the adapters `manager` holds in its device slots (the engine owns it)."""
        self.lora = manager

    def load_model(self, model: str) -> tuple[nn.Module, ModelConfig]:
        """Another model (a draft) on this runner's device, in its dtype and weight format; without a KV cache."""
        source = resolve_model(model)
        model_config = load_model_config(source)
        return load_model(model_config, source, self.device, self.dtype, self.config.weight_format), model_config

    @torch.inference_mode()
    def forward_segments(self, model: nn.Module, segments: Sequence[Segment], max_decode_run: int = 1) -> torch.Tensor:
        """Run `model` (the target, or a draft over its own or the target's cache) over the segments, outside any
        scheduled step; returns the final hidden states of the rows each segment samples from, in order."""
        batch = prepare_batch(segments, self.block_size, self.device, max_decode_run)
        rows = torch.tensor(batch.sample_index, device=self.device)
        with forward_context(self.backend, batch.metadata):
            return model(batch.input_ids, batch.positions)[rows]

    @torch.inference_mode()
    def layer_outputs(self, segments: Sequence[Segment], layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """Run the target over the segments (prefills, without drafts), outside any scheduled step; returns each
        decoder layer's output at every row: [total tokens, hidden], the segments' tokens in order."""
        batch = prepare_batch(segments, self.block_size, self.device)
        capturing = self.capture_layers
        self.capture_layers = sorted({*capturing, *layers})
        try:
            with forward_context(self.backend, batch.metadata):
                self.model(batch.input_ids, batch.positions)
            return {layer: self._captured[layer] for layer in layers}
        finally:
            self.capture_layers = capturing

    def measure_step_costs(self, token_counts: Sequence[int], model: nn.Module | None = None,
                           compute_logits: Callable | None = None) -> StepCostModel:
        """Time decode steps of `model` (default: the target, as its steps run) over this runner's KV cache: see
        profiling.py."""
        return measure_step_costs(model or self.model, self.backend, self.block_size, self.num_blocks, self.device,
                                  token_counts, compute_logits=compute_logits,
                                  forward=None if model is not None else self._forward)


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
    model.load_weights(iter_weights(source, model, keep_formats), device, from_gguf=source.is_gguf)
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


def _lora_id(request: Request) -> int:
    return 0 if request.lora_request is None else request.lora_request.lora_int_id


