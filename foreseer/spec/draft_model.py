"""Drafting with a model of its own: a smaller model with the target's tokenizer (`draft`), the target itself
with int8 weights (`draft`, the default), or the target with some layers skipped (`layer_skip`, self-speculative
decoding, Zhang et al. 2023).

Where the draft's keys and values live depends on what the draft is. The target drafting for itself (int8 weights,
skipped layers) reads the target's own KV cache: every token but a request's last is computed there already, so a
draft never prefills a prompt or catches up, and needs no cache of its own. Another model keeps its own paged KV
cache, of as many blocks as the target's; each request's state there is the list of tokens whose KV it holds,
cut back before drafting to its common prefix with the request's tokens, so accepted drafts are kept, rejected
ones recomputed, and a preempted or rewritten request simply catches up. A request drafts greedily until the
draft's confidence in its next token falls under a threshold that adapts to keep acceptance near a target
(Draft & Verify). Drafts are the draft model's argmax, verified as deterministic proposals, which keeps sampled
requests exact too.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from foreseer.attention import AttentionBackend
from foreseer.config import SpeculativeConfig
from foreseer.core.block_manager import BlockManager
from foreseer.core.draft_tree import DraftTree
from foreseer.layers.quantization import quantize_linears_int8
from foreseer.models.loader import load_model_config, resolve_model
from foreseer.spec.proposer import DraftProposer
from foreseer.worker.inputs import Segment, runs_as_decode_rows
from foreseer.worker.profiling import StepCostModel
from foreseer.worker.sampler import Sampler

if TYPE_CHECKING:
    from foreseer.core.request import Request
    from foreseer.worker.model_runner import ModelRunner

WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")
LAYER_SKIP_FILE = "{model}-layer-skip.json"  # under WEIGHTS_DIR: the layers `foreseer spec search-layers` chose
# Catch-ups of up to this many tokens (accepted drafts and the token after them) run as decode rows, all of a
# step's in one batched kernel call, instead of one prefill attention call per request and layer.
CATCH_UP_DECODE_ROWS = 16
THRESHOLD_STEP = 0.02  # how far the confidence threshold moves after each verification
MAX_THRESHOLD = 0.95


def shared_copy(model: nn.Module, keep_layers: list[int] | None = None, share_caches: bool = False) -> nn.Module:
    """A new module tree over the same weight tensors (no extra weight memory), over the same KV caches if
    `share_caches`, else without any, keeping only `keep_layers` of the decoder (all when None)."""
    memo: dict[int, object] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    for attention in model.attention_layers():
        memo[id(attention.kv_cache)] = attention.kv_cache if share_caches else None
    clone = copy.deepcopy(model, memo)
    if keep_layers is not None:
        clone.model.layers = nn.ModuleList(clone.model.layers[i] for i in keep_layers)
    return clone


class DraftKV(ABC):
    """Where a draft model's keys and values live: the segments its steps compute."""

    @abstractmethod
    def start(self, request: Request, length: int, drafting: list[Request]) -> Segment | None:
        """The first segment of the request's draft (its last token, after any tokens the cache lacks), with room
        for `length` draft steps; None (no draft this time) where there is no room."""

    def advance(self, request: Request, segment: Segment, token: int) -> Segment:
        """The next draft step's segment: the token the last one drafted."""
        return Segment([token], segment.start + len(segment.token_ids), segment.block_table)

    def catch_up_tokens(self, request: Request) -> int:
        """Tokens the draft computes before drafting, beyond its draft steps (none over the target's cache)."""
        return 0

    def forget_finished(self) -> None:  # noqa: B027 (only a cache of its own holds finished requests)
        """Let go of what finished requests hold."""


class TargetKV(DraftKV):
    """The target's own KV cache, for a draft that is the target itself with other weights or fewer layers.

    The target has computed every token of a decoding request but the last, so drafting starts there. Draft
    tokens' KV goes into the request's own slots after its computed tokens: slots that only this request holds
    (blocks are shared through the prefix cache only once computed), that nothing reads before the target's
    verification writes its own KV over them, and that the target frees when it rejects them."""

    def __init__(self, block_manager: BlockManager) -> None:
        self.block_manager = block_manager

    def start(self, request: Request, length: int, drafting: list[Request]) -> Segment | None:
        if request.num_computed_tokens != request.num_tokens - 1:
            return None
        if not self.block_manager.allocate_slots(request, length):
            return None
        return Segment([request.token_ids[-1]], request.num_computed_tokens, request.block_table)


@dataclass
class _DraftSequence:
    """A request in a draft model's own cache; has what the block manager reads of a request."""

    token_ids: list[int] = field(default_factory=list)  # tokens whose KV the draft cache holds
    block_table: list[int] = field(default_factory=list)

    @property
    def num_computed_tokens(self) -> int:
        return len(self.token_ids)

    num_tokens = num_computed_tokens


class OwnKV(DraftKV):
    """A paged KV cache of the draft model's own, as many blocks as the target's, kept in step with each request
    by catching up on the tokens it lacks before drafting."""

    def __init__(self, models: list[nn.Module], backend: AttentionBackend, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        cfg = models[0].config
        caches = backend.allocate_kv_cache(len(models[0].attention_layers()), num_blocks, block_size,
                                           cfg.num_key_value_heads, cfg.head_dim, dtype, device)
        for model in models:  # a float and an int8 copy of the draft share one cache
            for attention, cache in zip(model.attention_layers(), caches):
                attention.kv_cache = cache
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.sequences: dict[str, tuple[Request, _DraftSequence]] = {}

    def start(self, request: Request, length: int, drafting: list[Request]) -> Segment | None:
        """Brings the draft cache up to the request's last token, with room for `length` drafts."""
        # A request id can come back for a new request: the token check below keeps what still matches.
        _, seq = self.sequences.get(request.request_id, (request, _DraftSequence()))
        self.sequences[request.request_id] = (request, seq)
        tokens = request.token_ids
        valid = 0
        limit = min(len(seq.token_ids), len(tokens) - 1)  # the last token is computed again for its logits
        while valid < limit and seq.token_ids[valid] == tokens[valid]:
            valid += 1
        del seq.token_ids[valid:]
        self.block_manager.free_unneeded_blocks(seq)
        new = tokens[valid:]
        if not self.block_manager.allocate_slots(seq, len(new) + length - 1):
            # Make room by dropping the cache of requests that are not drafting now, then try once more.
            ids = {r.request_id for r in drafting}
            for request_id in [k for k in self.sequences if k not in ids]:
                self._forget(request_id)
            if not self.block_manager.allocate_slots(seq, len(new) + length - 1):
                self._forget(request.request_id)
                return None
        seq.token_ids.extend(new)
        return Segment(new, valid, seq.block_table)

    def advance(self, request: Request, segment: Segment, token: int) -> Segment:
        self.sequences[request.request_id][1].token_ids.append(token)
        return super().advance(request, segment, token)

    def catch_up_tokens(self, request: Request) -> int:
        # An estimate without the prefix check: drafts that get rejected are a few tokens more.
        _, seq = self.sequences.get(request.request_id, (request, _DraftSequence()))
        return max(request.num_tokens - len(seq.token_ids), 1)

    def forget_finished(self) -> None:
        for request_id in [k for k, (r, _) in self.sequences.items() if r.is_finished]:
            self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        _, seq = self.sequences.pop(request_id)
        self.block_manager.free(seq)


class DraftModelProposer(DraftProposer):
    name = "draft"
    prior_acceptance = 0.8  # a model that imitates the target (its int8 self, a smaller sibling) mostly agrees

    def __init__(self, config: SpeculativeConfig, model: nn.Module, kv: DraftKV, runner: ModelRunner,
                 float_model: nn.Module | None = None, quantized: bool = False) -> None:
        self.model = model
        self.kv = kv
        # With int8 weights and a cache of its own: the same model in float, for prompts' prefills (see _run).
        self.float_model = float_model
        self.catch_up_on_target_weights = float_model is not None
        self.quantized = quantized
        self.runner = runner  # runs the draft's forward passes over its KV cache
        self.threshold = config.draft_confidence
        self.target_acceptance = config.target_acceptance
        self.draft_step_cost: StepCostModel | None = None
        self.generator = torch.Generator(runner.device).manual_seed(0)  # sampled drafts of requests without a seed

    @classmethod
    def create(cls, config: SpeculativeConfig, runner: ModelRunner, block_manager: BlockManager
               ) -> DraftModelProposer:
        int8 = config.draft_quantization == "int8"
        if config.draft_model is None:  # the target drafts for itself, over its own KV cache
            model = shared_copy(runner.model, share_caches=True)
            return cls(config, quantize_linears_int8(model) if int8 else model, TargetKV(block_manager), runner,
                       quantized=int8).timed()
        draft_config = load_model_config(resolve_model(config.draft_model))
        if draft_config.vocab_size != runner.model_config.vocab_size:
            raise ValueError(f"draft model {config.draft_model!r} has a vocabulary of {draft_config.vocab_size} "
                             f"tokens, the target {runner.model_config.vocab_size}: they must share a tokenizer")
        model, _ = runner.load_model(config.draft_model)
        float_model = None
        if int8:
            float_model, model = model, quantize_linears_int8(shared_copy(model))
        kv = OwnKV([m for m in (model, float_model) if m is not None], runner.backend, runner.num_blocks,
                   runner.block_size, runner.device, runner.dtype)
        return cls(config, model, kv, runner, float_model, quantized=int8).timed()

    def timed(self) -> DraftModelProposer:
        """Time the draft model's steps, which the engine weighs against what its drafts save. The timing writes
        into the draft's KV cache, which may be the target's: only an idle engine's cache may be reused after."""
        self.draft_step_cost = self.runner.measure_step_costs([1, 2, 4, 8, 16, 32], self.model, self.logits)
        return self

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # A quantized lm_head is a module to call, not a weight to multiply by.
        return self.model.lm_head(hidden).float() if self.quantized else self.model.compute_logits(hidden)

    # -- drafting -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, requests: list[Request], max_lengths: list[int], hidden_states=None) -> list[DraftTree]:
        self.kv.forget_finished()
        trees = [DraftTree() for _ in requests]
        going: list[int] = []  # requests still drafting, in the order of `segments`
        segments: list[Segment] = []
        sampled_probs: dict[int, list[torch.Tensor]] = {}  # request index -> distributions of its draft tokens
        for i, (request, length) in enumerate(zip(requests, max_lengths)):
            if length <= 0:
                continue
            segment = self.kv.start(request, length, requests)
            if segment is not None:
                going.append(i)
                segments.append(segment)
        while going:
            order = sorted(range(len(going)), key=lambda j: not runs_as_decode_rows(  # decodes first
                len(segments[j].token_ids), segments[j].draft, segments[j].start, CATCH_UP_DECODE_ROWS))
            going, segments = [going[j] for j in order], [segments[j] for j in order]
            choices = self._choose(self._run(segments), [requests[i] for i in going])
            next_going, next_segments = [], []
            for i, segment, (token, sure, dist) in zip(going, segments, choices):
                if dist is not None:
                    sampled_probs.setdefault(i, []).append(dist)
                tree = trees[i]
                tree.token_ids.append(token)
                tree.parents.append(len(tree) - 2)
                if len(tree) < max_lengths[i] and sure >= self.threshold:
                    next_segments.append(self.kv.advance(requests[i], segment, token))
                    next_going.append(i)
            going, segments = next_going, next_segments
        for i, rows in sampled_probs.items():
            trees[i].probs = torch.stack(rows)
        return trees

    def _choose(self, logits: torch.Tensor, requests: list[Request]) -> list[tuple[int, float, torch.Tensor | None]]:
        """Each request's next draft token, the draft's confidence, and the distribution it was drawn from.

        Greedy requests take the argmax (no distribution). Sampled ones draw from the draft's distribution
        under their own sampling parameters, which speculative sampling needs to accept more than a
        deterministic draft would get."""
        confidence, tokens = logits.softmax(dim=-1).max(dim=-1)
        choices: list[tuple[int, float, torch.Tensor | None]] = list(zip(tokens.tolist(), confidence.tolist(),
                                                                         [None] * len(requests)))
        rows = [j for j, r in enumerate(requests) if not r.params.greedy]
        if rows:
            for j, dist in zip(rows, Sampler.processed_probs(logits[rows], [requests[j] for j in rows])):
                generator = requests[j].generator or self.generator
                choices[j] = (int(torch.multinomial(dist, 1, generator=generator)[0]), float(dist.max()), dist)
        return choices

    def _run(self, segments) -> torch.Tensor:
        """Logits [len(segments), V] at each segment's last token.

        With int8 weights, segments from a prompt's start run on the float weights: the CPU's int8 GEMM quantizes
        all of a call's activations with one scale, and a prompt's first tokens carry activations far larger than
        the rest's, which left the other tokens' KV too coarse to draft from (no draft token accepted on
        300-token prompts). Later catch-ups (a few tokens after a verification) stay on int8. (A draft over the
        target's cache never prefills.)"""
        if self.float_model is None:
            return self._forward(self.model, segments, self.logits)
        prefills = [i for i, s in enumerate(segments) if s.start == 0]
        if not prefills:
            return self._forward(self.model, segments, self.logits)
        steps = [i for i, s in enumerate(segments) if s.start > 0]
        logits = self._forward(self.float_model, [segments[i] for i in prefills], self.float_model.compute_logits)
        if steps:
            logits = torch.cat([logits, self._forward(self.model, [segments[i] for i in steps], self.logits)])
        order = torch.empty(len(segments), dtype=torch.long, device=logits.device)
        order[torch.tensor(prefills + steps, device=logits.device)] = torch.arange(len(segments), device=logits.device)
        return logits[order]

    def _forward(self, model: nn.Module, segments, logits) -> torch.Tensor:
        return logits(self.runner.forward_segments(model, segments, CATCH_UP_DECODE_ROWS))

    def catch_up_tokens(self, request: Request) -> int:
        return self.kv.catch_up_tokens(request)

    def record(self, num_drafted: int, num_accepted: int) -> None:
        """Raise the confidence needed to go on drafting while acceptance is under target, else lower it."""
        if num_drafted:
            step = THRESHOLD_STEP if num_accepted / num_drafted < self.target_acceptance else -THRESHOLD_STEP
            self.threshold = min(max(self.threshold + step, 0.0), MAX_THRESHOLD)


class LayerSkipProposer(DraftModelProposer):
    """Self-speculative decoding: the target model itself, with the layers in `skip_layers` skipped."""

    name = "layer_skip"

    @classmethod
    def create(cls, config: SpeculativeConfig, runner: ModelRunner, block_manager: BlockManager
               ) -> LayerSkipProposer:
        num_layers = runner.model_config.num_hidden_layers
        skip = config.skip_layers if config.skip_layers is not None else searched_skip_layers(runner.config.model)
        if skip is None:
            raise ValueError(f"no layer-skip set is saved for {runner.config.model!r}; give "
                             "speculative_config.skip_layers or run `foreseer spec search-layers`")
        if any(i >= num_layers for i in skip) or len(set(skip)) >= num_layers:
            raise ValueError(f"skip_layers {skip} must name some, not all, of the model's {num_layers} layers")
        keep = [i for i in range(num_layers) if i not in set(skip)]
        # Each kept layer reads and writes the target's cache of the same layer.
        model = shared_copy(runner.model, keep, share_caches=True)
        return cls(config, model, TargetKV(block_manager), runner).timed()


def layer_skip_path(model_name: str) -> str:
    return os.path.join(WEIGHTS_DIR, LAYER_SKIP_FILE.format(model=os.path.basename(model_name).lower()))


def searched_skip_layers(model_name: str) -> list[int] | None:
    """The layers that `foreseer spec search-layers` saved for this model, or None."""
    path = layer_skip_path(model_name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return list(json.load(f)["skip_layers"])
