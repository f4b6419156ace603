"""The engine loop: add_request / step / abort, the same for offline batches and the server."""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from foreseer.config import EngineConfig
from foreseer.core.block_manager import BlockManager
from foreseer.core.draft_tree import DraftTree
from foreseer.core.output import RequestFault, SchedulerOutput
from foreseer.core.policies import get_policy
from foreseer.core.request import Request, SequenceGroup
from foreseer.core.scheduler import Scheduler
from foreseer.core.step_hook import StepHook
from foreseer.engine.detokenizer import IncrementalDetokenizer
from foreseer.lengths.hook import create_length_hook
from foreseer.lengths.remaining import default_head_dir
from foreseer.lora.adapter import LoRAAdapter
from foreseer.lora.admission import LoRAAdmission
from foreseer.lora.manager import LoRAManager, LoRAStats
from foreseer.lora.request import LoRARequest
from foreseer.models.loader import load_model_config, load_tokenizer, resolve_model
from foreseer.outputs import CompletionOutput, RequestMetrics, RequestOutput, SpeculationFigures
from foreseer.sampling_params import SamplingParams
from foreseer.spec.speculator import Speculator
from foreseer.structured import GrammarCompiler, SequenceGrammar
from foreseer.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

MAX_FAULTS_PER_REQUEST = 2  # traced faults that fail a request: one may be another's (see LLMEngine._contain)
MAX_FAULTS_KEPT = 100  # the newest step faults kept for inspection (/health shows the last)


@dataclass(frozen=True)
class StepFault:
    """An exception a step caught: where, and which sequences it failed or sent to run again."""

    time: float
    stage: str  # before_schedule, schedule, execute (the model, sampling, the hooks after it) or update
    error: str
    failed: list[str]
    retried: list[str]


@dataclass
class _Sequence:
    request: Request
    detokenizer: IncrementalDetokenizer


@dataclass
class _ParentRequest:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[_Sequence]
    lora_request: LoRARequest | None = None
    error: str | None = None  # why the scheduler gave up on it (e.g. its adapter could no longer be read)

    @property
    def predicted_length(self) -> int | None:
        return self.sequences[0].request.predicted_length

    def output(self) -> RequestOutput:
        requests = [s.request for s in self.sequences]
        want_logprobs = self.params.logprobs is not None
        completions = [
            CompletionOutput(
                index=i,
                text=s.detokenizer.visible_text(s.request.is_finished),
                token_ids=s.request.output_token_ids,
                cumulative_logprob=s.request.cumulative_logprob if want_logprobs else None,
                logprobs=list(s.request.logprobs) if want_logprobs else None,
                finish_reason=s.request.finish_reason,
                stop_reason=s.request.stop_reason,
            )
            for i, s in enumerate(self.sequences)
        ]
        first_tokens = [r.metrics.first_token_time for r in requests if r.metrics.first_token_time]
        finished = all(r.is_finished for r in requests)
        metrics = RequestMetrics(
            arrival_time=requests[0].metrics.arrival_time,
            first_scheduled_time=requests[0].metrics.first_scheduled_time,
            first_token_time=min(first_tokens) if first_tokens else None,
            finished_time=max(r.metrics.finished_time for r in requests) if finished else None,
            num_cached_tokens=requests[0].metrics.num_cached_tokens,
            num_preemptions=sum(r.metrics.num_preemptions for r in requests),
        )
        for request in requests:
            metrics.absorb(request.metrics)
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, completions, finished, metrics,
                             error=self.error, predicted_length=self.predicted_length)


def check_length_hint(length_hint: int | None) -> None:
    if length_hint is not None and (isinstance(length_hint, bool) or not isinstance(length_hint, int)
                                    or length_hint < 1):
        raise ValueError(f"length_hint must be an integer >= 1, got {length_hint!r}")


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.source = resolve_model(config.model)
        self.model_config = load_model_config(self.source)
        context = self.model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > context:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's context of {context} tokens")
        self.max_model_len = config.max_model_len or context
        self.policy = get_policy(config.scheduler.policy, config.scheduler)
        length_predictor = self._length_predictor()
        self.tokenizer = load_tokenizer(self.source if config.tokenizer is None else resolve_model(config.tokenizer))
        self.eos_token_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.runner = ModelRunner(config, self.model_config, self.source)
        self.lora: LoRAManager | None = None
        if config.lora.enable_lora:  # unified memory: an adapter's pages are KV blocks
            runner = self.runner
            self.lora = LoRAManager(config.lora, runner.model, runner.device, runner.dtype, runner.kv_bytes_per_block())
            runner.use_lora(self.lora)
        # Where no layer reads further back than a window, the blocks behind it are given back as requests move on.
        cfg = self.model_config
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching,
            window=cfg.sliding_window if cfg.every_layer_slides else None,
        )
        gate = None
        if self.lora is not None:  # LoRA adapters: admission within the device slots
            self.lora.bind_block_manager(self.block_manager)
            gate = LoRAAdmission(self.lora, config.scheduler.max_wait_s)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self.policy, gate=gate)
        self._gate = gate
        spec = config.speculative_config
        self.speculator = None if spec is None else Speculator.create(
            spec, self.runner, self.block_manager, config.scheduler.max_num_batched_tokens)
        lengths = None if length_predictor is None else create_length_hook(
            length_predictor, config.model, self.model_config.hidden_size, self.runner.device,
            config.length_refresh_tokens)
        self.hooks: list[StepHook] = []
        for hook in (self.speculator, lengths):
            if hook is not None:
                self.add_hook(hook)
        self.parents: dict[str, _ParentRequest] = {}
        self.faults: collections.deque[StepFault] = collections.deque(maxlen=MAX_FAULTS_KEPT)
        self.num_faults = 0
        self._sequences: dict[str, tuple[_ParentRequest, _Sequence]] = {}  # child request id -> its place
        self._grammar_compiler: GrammarCompiler | None = None

    def reconfigure_scheduler(self, **changes) -> None:
        """A new scheduler with these SchedulerConfig fields changed (another policy, max_num_seqs, ...), so that
        runs comparing them share one loaded model; the engine must be idle."""
        if self.has_unfinished_requests():
            raise ValueError("reconfigure_scheduler needs an idle engine")
        config = dataclasses.replace(self.config.scheduler, **changes)
        policy = get_policy(config.policy, config)
        if policy.needs_predicted_length and not any(h.predicts_lengths for h in self.hooks):
            raise ValueError(f"scheduling_policy {policy.name!r} needs a length predictor: start the engine with "
                             "length_predictor='remaining'")
        self.config.scheduler, self.policy = config, policy
        self.scheduler = Scheduler(config, self.block_manager, policy, gate=self._gate)

    def add_hook(self, hook: StepHook) -> None:
        """Call `hook` around every step from now on, after the hooks added before it."""
        self.hooks.append(hook)
        # Hooks may draw on hidden states the model computes anyway (Medusa heads, the length predictor).
        self.runner.return_hidden_states = any(h.needs_hidden_states for h in self.hooks)
        self.runner.capture_layers = sorted({layer for h in self.hooks for layer in h.capture_layers})

    def _length_predictor(self) -> str | None:
        """The length predictor asked for; without one, the shipped remaining-length head if the policy needs it."""
        if self.config.length_predictor is None and self.policy.needs_predicted_length:
            try:
                default_head_dir(self.config.model)  # before the model loads: a missing head fails fast
            except ValueError as error:
                raise ValueError(
                    f"scheduling_policy {self.policy.name!r} needs length_predictor to predict answer lengths, "
                    f"and none was given: {error}; or give length_predictor=<directory of a trained head>"
                ) from error
            return "remaining"
        return self.config.length_predictor

    @property
    def spec_stats(self) -> SpeculationFigures | None:
        return None if self.speculator is None else self.speculator.stats

    # -- requests -------------------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        """The prompt's token ids; ValueError naming what is wrong with it."""
        if isinstance(prompt, str):
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as error:  # a lone surrogate: no tokenizer takes it
                raise ValueError(f"prompt is not valid Unicode: a lone surrogate at character {error.start}") from None
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, list | tuple):
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        vocab = self.model_config.vocab_size
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        return list(prompt)

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
        arrival_time: float | None = None, priority: int = 0, lora_request: LoRARequest | None = None,
        length_hint: int | None = None,
    ) -> None:
        """Validate and queue a request; raises ValueError (and changes nothing) if it cannot be served.

        `length_hint`: the answer's length in tokens, where the client knows it (e.g. from an earlier run); the
        length-aware policies then use it instead of a prediction."""
        params = params or SamplingParams()
        if request_id in self.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        token_ids = self.tokenize_prompt(prompt)
        # With unified memory, the adapter's pages come out of the same KV pool as the request's blocks.
        pages = 0 if lora_request is None else self._lora_manager(lora_request).validate(lora_request)
        max_tokens = self.check_lengths(len(token_ids), params, reserved_blocks=pages)
        bad_words_token_ids = self.check_vocabulary(params)
        check_length_hint(length_hint)
        grammars = [self._grammar_matcher(params) for _ in range(params.n)]  # each sequence its own matcher
        if lora_request is not None:  # last: a request refused before holds no adapter
            self.lora.add_user(lora_request)
        sequences = []
        group = SequenceGroup()
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            request = Request(f"{request_id}#{i}", token_ids, params, max_tokens, self.eos_token_ids,
                              arrival_time, priority, seed, group, length_hint)
            request.lora_request = lora_request
            request.bad_words_token_ids = bad_words_token_ids
            request.grammar = grammars[i]
            request.cache_salt = None if lora_request is None else lora_request.cache_salt
            detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens,
                                                 params.stop_strings, params.include_stop_str_in_output)
            sequences.append(_Sequence(request, detokenizer))
        parent = _ParentRequest(request_id, prompt if isinstance(prompt, str) else None, token_ids, params, sequences,
                                lora_request=lora_request)
        self.parents[request_id] = parent
        for seq in sequences:
            self._sequences[seq.request.request_id] = (parent, seq)
            self.scheduler.add_request(seq.request)

    def _grammar_matcher(self, params: SamplingParams) -> SequenceGrammar | None:
        """A matcher for params.structured_outputs (None without it); ValueError naming it where it does not compile."""
        if params.structured_outputs is None:
            return None
        if self._grammar_compiler is None:  # xgrammar's import and tokenizer tables take a while: on first use
            from foreseer.structured.xgrammar_backend import XGrammarBackend

            self._grammar_compiler = GrammarCompiler(
                XGrammarBackend(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids))
        return self._grammar_compiler.matcher(params.structured_outputs)

    def load_lora(self, lora_request: LoRARequest) -> LoRAAdapter:
        """Read an adapter into the host cache ahead of its requests (validating it); ValueError if LoRA is off
        or the adapter cannot serve this model."""
        return self._lora_manager(lora_request).load_to_host(lora_request)

    def fetch_lora(self, lora_request: LoRARequest) -> Future:
        """Read an adapter into the host cache in the background (it joins the cache at the next step or
        load_lora); the future gives the adapter or raises ValueError naming the problem."""
        return self._lora_manager(lora_request).fetch(lora_request)

    def unload_lora(self, lora_int_id: int) -> bool:
        """Forget an adapter in every tier; False if it was not loaded. LoRAInUseError while unfinished requests
        use it (they keep it: finish or abort them first)."""
        if self.lora is None:
            raise ValueError("LoRA is not enabled: the engine was started without enable_lora=True")
        return self.lora.unload(lora_int_id)

    def lora_stats(self) -> LoRAStats | None:
        return None if self.lora is None else self.lora.stats()

    def _lora_manager(self, lora_request: LoRARequest) -> LoRAManager:
        if self.lora is None:
            raise ValueError(f"LoRA adapter {lora_request.lora_name!r} requested, but the engine was started without "
                             "enable_lora=True")
        return self.lora

    def _release_lora(self, parent: _ParentRequest) -> None:
        if parent.lora_request is not None:
            self.lora.release(parent.lora_request.lora_int_id)

    def check_vocabulary(self, params: SamplingParams) -> list[list[int]]:
        """The token id sequences of params.bad_words; ValueError where params name tokens past the vocabulary."""
        vocab = self.model_config.vocab_size
        if params.logprobs is not None and params.logprobs > vocab:
            raise ValueError(f"SamplingParams.logprobs asks for the top {params.logprobs} tokens, but the vocabulary "
                             f"has {vocab}")
        outside = [t for t in params.logit_bias or {} if t >= vocab]
        if outside:
            raise ValueError(f"SamplingParams.logit_bias has token ids outside the vocabulary [0, {vocab}): {outside}")
        words = []
        for word in params.bad_words or []:
            # vLLM's rule: the word as given, and with a leading space where that is other tokens of the same count
            # (the word in the middle of a text).
            plain = self.tokenizer.encode(word.lstrip(), add_special_tokens=False)
            spaced = self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            if not plain:
                raise ValueError(f"SamplingParams.bad_words has {word!r}, which the tokenizer makes no tokens of")
            words.append(plain)
            if spaced[0] != plain[0] and len(spaced) == len(plain):
                words.append(spaced)
        if any(t >= vocab for word in words for t in word):
            raise ValueError(f"SamplingParams.bad_words has words whose tokens are outside the vocabulary [0, {vocab})")
        return words

    def check_lengths(self, num_prompt_tokens: int, params: SamplingParams, reserved_blocks: int = 0) -> int:
        """The request's max_tokens resolved against the context; ValueError if it cannot fit. `reserved_blocks`:
        KV blocks something else holds while it runs (its LoRA adapter's pages, with unified memory)."""
        if num_prompt_tokens == 0:
            raise ValueError("prompt is empty")
        if num_prompt_tokens >= self.max_model_len:
            raise ValueError(
                f"prompt has {num_prompt_tokens} tokens, but the model's context is {self.max_model_len} tokens "
                "(prompt and at least one generated token must fit)"
            )
        room = self.max_model_len - num_prompt_tokens
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if max_tokens > room:
            raise ValueError(
                f"max_tokens {max_tokens} plus the prompt's {num_prompt_tokens} tokens exceeds the model's context "
                f"of {self.max_model_len} tokens"
            )
        capacity = (self.block_manager.num_blocks - reserved_blocks) * self.block_manager.block_size
        if num_prompt_tokens + max_tokens > capacity:
            beside = f" beside its LoRA adapter's {reserved_blocks} blocks" if reserved_blocks else ""
            raise ValueError(
                f"prompt ({num_prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the KV cache's "
                f"{capacity} tokens{beside}; give a larger kv_cache_gib or a smaller max_tokens"
            )
        return max_tokens

    def abort_request(self, request_id: str) -> RequestOutput | None:
        parent = self.parents.pop(request_id, None)
        if parent is None:
            return None
        for seq in parent.sequences:
            self.scheduler.finish_request(seq.request, "abort")
            del self._sequences[seq.request.request_id]
        self._release_lora(parent)
        return parent.output()

    def has_unfinished_requests(self) -> bool:
        return bool(self.parents)

    # -- the loop -------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample; returns the outputs of requests that advanced (or failed).

        A fault never leaves this call: it fails the requests it is traced to (a kernel error, an out-of-memory,
        a bad sampling state), and the others run on with the outputs they would have had (see `faults`)."""
        try:
            for hook in self.hooks:
                hook.before_schedule(self.scheduler)
        except Exception as error:  # drafts and length predictions only order and speed up work: drop them
            self._record_fault("before_schedule", error, [], [])
            for request in self.scheduler.running:
                request.draft = DraftTree()
        try:
            sched = self.scheduler.schedule()
        except Exception as error:  # the scheduler's own state is in doubt: nothing of it can be trusted
            return self._fail_requests("schedule", error, self.scheduler.running + self.scheduler.waiting)
        touched = self._take_failed()
        if sched.is_empty:
            if self.scheduler.num_unfinished and not touched:  # a scheduler bug; without this, a live lock
                return self._fail_requests("schedule", RuntimeError("no request could be scheduled although some "
                                           "are unfinished"), self.scheduler.running + self.scheduler.waiting)
            return self._outputs(touched.values())
        generators = self._generator_states(sched)
        try:
            executing = time.perf_counter()
            result = self.runner.execute(sched)
            execute_seconds = time.perf_counter() - executing
            for hook in self.hooks:
                hook.after_execute(sched, result, execute_seconds)
        except Exception as error:  # nothing of the step was kept yet: its requests can run it again
            for generator, state in generators:
                generator.set_state(state)
            self._contain(sched, error, touched)
            return self._outputs(touched.values())
        try:
            updates = self.scheduler.update_from_output(sched, result)
            for hook in self.hooks:
                hook.after_update(updates)
            for update in updates:
                request = update.request
                parent, seq = self._sequences[request.request_id]
                self._detokenize(request, seq, update.new_token_ids)
                touched[parent.request_id] = parent
        except Exception as error:  # half applied: these requests' outputs cannot be trusted any more
            return self._fail_requests("update", error, [item.request for item in sched.scheduled])
        return self._outputs(touched.values())

    def _generator_states(self, sched: SchedulerOutput) -> list[tuple[torch.Generator, torch.Tensor]]:
        """The random state the step's sampling draws from, so that a failed step can be run again as it was."""
        generators = [self.runner.sampler.generator]
        generators += [item.request.generator for item in sched.scheduled if item.request.generator is not None]
        return [(generator, generator.get_state()) for generator in generators]

    def _contain(self, sched: SchedulerOutput, error: Exception, touched: dict[str, _ParentRequest]) -> None:
        """A fault while running the step: trace it, fail the requests it is traced to twice, retry the rest.

        Traced: what a RequestFault names, or the step's one request. A traced request runs alone next (the
        scheduler recomputes it), so that a one-off fault (another's memory, a flaky device) costs it nothing;
        MAX_FAULTS_PER_REQUEST traced faults fail it. An untraced fault isolates all of the step's requests: each
        recomputes and runs alone, so that a fault that comes back is traced then."""
        requests = [item.request for item in sched.scheduled]
        for request in requests:
            request.draft = DraftTree()
        if isinstance(error, RequestFault):
            culprits = [r for r in requests if r.request_id in error.request_ids]
        elif len(requests) == 1:
            culprits = requests
        else:
            self._record_fault("execute", error, [], [r.request_id for r in requests])
            self.scheduler.isolate(requests)
            return
        for request in culprits:
            request.num_faults += 1
        failed = [r for r in culprits if r.num_faults >= MAX_FAULTS_PER_REQUEST]
        self._record_fault("execute", error, [r.request_id for r in failed],
                           [r.request_id for r in requests if r not in failed])
        self.scheduler.isolate([r for r in culprits if r not in failed])
        for request in failed:
            touched.update(self._fail_parent(request, error))

    def _fail_requests(self, stage: str, error: Exception, requests: list[Request]) -> list[RequestOutput]:
        self._record_fault(stage, error, [r.request_id for r in requests], [])
        touched: dict[str, _ParentRequest] = {}
        for request in list(requests):
            touched.update(self._fail_parent(request, error))
        return self._outputs(touched.values())

    def _fail_parent(self, request: Request, error: Exception) -> dict[str, _ParentRequest]:
        """Fail the API request a sequence belongs to, every sequence of it."""
        parent, _ = self._sequences[request.request_id]
        cause = error.cause if isinstance(error, RequestFault) else error
        parent.error = parent.error or f"the engine failed while computing this request: {type(cause).__name__}: " \
                                       f"{cause}"
        for seq in parent.sequences:
            self.scheduler.finish_request(seq.request, "error")
        return {parent.request_id: parent}

    def _record_fault(self, stage: str, error: Exception, failed: list[str], retried: list[str]) -> None:
        logger.error("engine fault in %s (failed: %s; run again: %s)", stage, failed or "none", retried or "none",
                     exc_info=error)
        self.num_faults += 1
        self.faults.append(StepFault(time.time(), stage, f"{type(error).__name__}: {error}", failed, retried))

    def _take_failed(self) -> dict[str, _ParentRequest]:
        """Parents of the requests the scheduler gave up on this step (finished with finish_reason "error")."""
        touched: dict[str, _ParentRequest] = {}
        for request, message in self.scheduler.take_failed():
            parent, _ = self._sequences[request.request_id]
            logger.warning("request %s failed: %s", parent.request_id, message)
            parent.error = parent.error or message
            touched[parent.request_id] = parent
        return touched

    def _outputs(self, parents) -> list[RequestOutput]:
        """The outputs of parents that advanced; finished ones are forgotten and release their adapter."""
        outputs = []
        for parent in parents:
            output = parent.output()
            if output.finished:
                del self.parents[parent.request_id]
                for seq in parent.sequences:
                    del self._sequences[seq.request.request_id]
                self._release_lora(parent)
            outputs.append(output)
        return outputs

    def _detokenize(self, request: Request, seq: _Sequence, new_token_ids: list[int]) -> None:
        for i, token in enumerate(new_token_ids):
            stop = seq.detokenizer.update(token)
            if stop is None:
                continue
            # A stop string wins over a length limit reached in the same step; tokens after it are dropped.
            self._drop_last_tokens(request, len(new_token_ids) - i - 1)
            if request.is_finished:
                request.finish_reason = "stop"
            else:
                self.scheduler.finish_request(request, "stop")
            request.stop_reason = stop
            break
        if request.is_finished:
            seq.detokenizer.flush()

    @staticmethod
    def _drop_last_tokens(request: Request, count: int) -> None:
        """Forget the last `count` generated tokens (accepted drafts that came after a stop string)."""
        for _ in range(count):
            token = request.token_ids.pop()
            if request.logprobs:
                request.cumulative_logprob -= request.logprobs.pop()[token].logprob
