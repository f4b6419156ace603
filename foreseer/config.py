"""Engine configuration (dataclasses); every field is validated with an error that names it."""

from __future__ import annotations

from dataclasses import dataclass, field

from foreseer.registry import ATTENTION_BACKENDS, DRAFT_PROPOSERS, SCHEDULING_POLICIES

WEIGHT_FORMATS = ("auto", "float32")
LORA_MEMORY_MODES = ("separate", "unified")


@dataclass
class CacheConfig:
    block_size: int = 16  # tokens per KV cache block
    kv_cache_gib: float | None = None  # KV cache size in GiB; overrides kv_cache_memory_fraction
    kv_cache_memory_fraction: float = 0.2  # KV cache share of the device's free memory, when no size is given
    enable_prefix_caching: bool = True  # reuse the KV cache blocks of prompt prefixes computed before

    def __post_init__(self) -> None:
        _check(self.block_size >= 1, "block_size", "must be >= 1")
        _check(self.kv_cache_gib is None or self.kv_cache_gib > 0, "kv_cache_gib", "must be > 0")
        _check(0 < self.kv_cache_memory_fraction <= 1, "kv_cache_memory_fraction", "must be in (0, 1]")


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 2048  # token budget of one step: decodes first, then prefill chunks
    max_num_seqs: int = 256  # sequences running at once, at most
    # Which requests run first (foreseer/core/policies.py); sjf and s3 predict answer lengths with the length
    # probe at the end of each prefill
    policy: str = "fcfs"
    max_wait_s: float = 10.0  # sjf, mlfq: a request waiting longer than this goes first (aging)
    # sjf: a running request that has generated this share of its predicted length is not preempted (TRAIL)
    sjf_preemption_limit: float = 0.5
    s3_quantile: float = 0.9  # s3: reserve KV for this upper quantile of each request's predicted remaining length
    mlfq_levels: int = 4  # mlfq: priority levels
    mlfq_base_quantum: int = 16  # mlfq: decode iterations at the top level; each level below doubles it
    mlfq_prefill_tokens_per_iteration: int = 64  # mlfq skip-join: prompt tokens that cost one decode iteration

    def __post_init__(self) -> None:
        _check(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be >= 1")
        _check(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        _check(self.policy in SCHEDULING_POLICIES, "scheduling_policy",
               f"must be one of {', '.join(sorted(SCHEDULING_POLICIES))}, got {self.policy!r}")
        _check(self.max_wait_s > 0, "max_wait_s", "must be > 0")
        _check(0 < self.sjf_preemption_limit <= 1, "sjf_preemption_limit", "must be in (0, 1]")
        _check(0 < self.s3_quantile < 1, "s3_quantile", "must be in (0, 1)")
        for name in ("mlfq_levels", "mlfq_base_quantum", "mlfq_prefill_tokens_per_iteration"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "must be an integer >= 1")


@dataclass
class SpeculativeConfig:
    """Speculative decoding (vLLM's `speculative_config`): who drafts, and how many tokens at most."""

    method: str
    num_speculative_tokens: int = 5  # deepest draft per request and step; the engine adapts below it
    # Choose each step's drafts by their expected gain from measured step costs and acceptance (off: every request
    # drafts up to num_speculative_tokens at every step, as vLLM does)
    adaptive: bool = True
    tree_width: int = 1  # most alternatives per draft (1: a chain; more: a token tree verified at once)
    prompt_lookup_min: int = 1  # ngram: shortest and longest suffix n-gram to look up
    prompt_lookup_max: int = 4
    medusa_heads: str | None = None  # medusa: directory of trained heads (default: those shipped for the model)
    draft_model: str | None = None  # draft: a model with the target's tokenizer (default: the target itself)
    draft_quantization: str = "int8"  # draft: "int8" (int8 weights) or "none"
    skip_layers: list[int] | None = None  # layer_skip: layers to skip (default: those searched for the model)
    # draft, layer_skip: a request stops drafting at a token the draft is less sure of than this; it adapts so
    # that acceptance stays near target_acceptance (Draft & Verify)
    draft_confidence: float = 0.3
    target_acceptance: float = 0.8
    # Correct the start-up step timings by what steps measure in service (off: decisions from the timings alone,
    # as when they are pinned for a test or a forced measurement)
    calibrate: bool = True

    def __post_init__(self) -> None:
        _check(self.method in DRAFT_PROPOSERS, "speculative_config.method",
               f"must be one of {', '.join(sorted(DRAFT_PROPOSERS))}, got {self.method!r}")
        _check(isinstance(self.num_speculative_tokens, int) and self.num_speculative_tokens >= 1,
               "speculative_config.num_speculative_tokens", "must be an integer >= 1")
        _check(isinstance(self.tree_width, int) and self.tree_width >= 1, "speculative_config.tree_width",
               "must be an integer >= 1")
        _check(isinstance(self.prompt_lookup_min, int) and self.prompt_lookup_min >= 1,
               "speculative_config.prompt_lookup_min", "must be an integer >= 1")
        _check(isinstance(self.prompt_lookup_max, int) and self.prompt_lookup_max >= self.prompt_lookup_min,
               "speculative_config.prompt_lookup_max", "must be an integer >= prompt_lookup_min")
        _check(self.draft_quantization in ("int8", "none"), "speculative_config.draft_quantization",
               f"must be 'int8' or 'none', got {self.draft_quantization!r}")
        _check(self.skip_layers is None or (isinstance(self.skip_layers, list) and all(
            isinstance(i, int) and i >= 0 for i in self.skip_layers)), "speculative_config.skip_layers",
            "must be a list of layer indices")
        for name in ("adaptive", "calibrate"):
            _check(isinstance(getattr(self, name), bool), f"speculative_config.{name}", "must be true or false")
        for name in ("draft_confidence", "target_acceptance"):
            value = getattr(self, name)
            _check(isinstance(value, int | float) and 0 <= value < 1, f"speculative_config.{name}", "must be in [0, 1)")

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict | None) -> SpeculativeConfig | None:
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a dict or SpeculativeConfig, got {type(value).__name__}")
        unknown = set(value) - set(cls.__dataclass_fields__)
        _check(not unknown, "speculative_config", f"has unknown keys {sorted(unknown)}")
        _check("method" in value, "speculative_config", "needs a 'method'")
        return cls(**value)


@dataclass
class LoRAConfig:
    """Multi-LoRA serving (vLLM's enable_lora, max_lora_rank, max_loras, max_cpu_loras; S-LoRA's unified memory).

    Adapters live in three tiers: `max_loras` slots on the compute device (a batch holds at most that many
    adapters), a host-memory cache of `max_cpu_loras` loaded adapters, and their directories on disk. Each tier
    evicts its least recently used adapter that nothing needs (a device slot is kept while a running request
    uses it)."""

    enable_lora: bool = False  # serve LoRA adapters beside the base model
    max_lora_rank: int = 16  # adapters of a higher rank are refused
    max_loras: int = 4  # device slots: distinct LoRA adapters in one batch
    max_cpu_loras: int | None = None  # LoRA adapters kept loaded in host memory (default: max(16, max_loras))
    # "separate": adapter weights beside the KV cache; "unified": a device slot's weights take KV-block-sized
    # pages from the KV cache's pool while it is loaded (S-LoRA), and idle adapters give them back under KV pressure.
    lora_memory: str = "separate"

    def __post_init__(self) -> None:
        _check(isinstance(self.enable_lora, bool), "enable_lora", "must be True or False")
        for name in ("max_lora_rank", "max_loras"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "must be an integer >= 1")
        if self.max_cpu_loras is None:
            self.max_cpu_loras = max(16, self.max_loras)
        _check(isinstance(self.max_cpu_loras, int) and self.max_cpu_loras >= self.max_loras, "max_cpu_loras",
               f"must be an integer >= max_loras ({self.max_loras}), got {self.max_cpu_loras!r}")
        _check(self.lora_memory in LORA_MEMORY_MODES, "lora_memory",
               f"must be 'separate' or 'unified', got {self.lora_memory!r}")


@dataclass
class EngineConfig:
    model: str = "smollm2-135m-instruct"  # model name, GGUF file or Hugging Face model directory
    tokenizer: str | None = None  # where the tokenizer and chat template come from (default: the model)
    dtype: str = "auto"  # activations: auto is float32 on CPU, bfloat16 on GPU
    # Weights in memory: "auto" keeps them as the checkpoint stores them (GGUF blocks, F16, BF16), computed by
    # kernels that dequantize in registers (exact); "float32" expands them at load (the reference path).
    weight_format: str = "auto"
    device: str = "auto"  # a torch device; auto is cuda if there is one, else cpu
    max_model_len: int | None = None  # tokens of prompt and answer at most (default: the model's context length)
    attention_backend: str = "auto"  # auto, cpu (C++ kernels), torch (reference)
    seed: int = 0  # seed of the sampling of requests that have no seed of their own
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # Speculative decoding: SpeculativeConfig's fields, e.g. {"method": "ngram", "num_speculative_tokens": 5}
    speculative_config: SpeculativeConfig | None = None
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # Predict how long each request's answer is from hidden states the forward pass computes anyway: "remaining"
    # (the remaining-length head shipped for the model, refined while it decodes), "probe" (the prompt-only head)
    # or a directory of a trained head; outputs then carry `predicted_length`. sjf and s3 use "remaining" unless
    # told otherwise
    length_predictor: str | None = None
    length_refresh_tokens: int = 16  # the remaining-length head predicts again every this many generated tokens

    def __post_init__(self) -> None:
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        _check(self.weight_format in WEIGHT_FORMATS, "weight_format",
               f"must be one of {', '.join(WEIGHT_FORMATS)}, got {self.weight_format!r}")
        _check(self.attention_backend == "auto" or self.attention_backend in ATTENTION_BACKENDS, "attention_backend",
               f"must be one of auto, {', '.join(sorted(ATTENTION_BACKENDS))}, got {self.attention_backend!r}")
        _check(self.length_predictor is None or isinstance(self.length_predictor, str), "length_predictor",
               "must be 'remaining', 'probe' or a directory of a trained head")
        _check(isinstance(self.length_refresh_tokens, int) and self.length_refresh_tokens >= 1,
               "length_refresh_tokens", "must be an integer >= 1")

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> EngineConfig:
        """Flat keyword arguments (as LLM(...) and the CLI take them) into the nested configs."""
        sections = {"cache": CacheConfig, "scheduler": SchedulerConfig, "lora": LoRAConfig}
        nested: dict[str, dict] = {name: {} for name in sections}
        top = {}
        aliases = {"scheduling_policy": ("scheduler", "policy")}
        for key, value in kwargs.items():
            if key in aliases:
                section, name = aliases[key]
                nested[section][name] = value
                continue
            owner = next((s for s, c in sections.items() if key in c.__dataclass_fields__), None)
            if owner:
                nested[owner][key] = value
            elif key in cls.__dataclass_fields__ and key not in sections:
                top[key] = value
            else:
                raise TypeError(f"unknown engine argument {key!r}")
        return cls(model=model, cache=CacheConfig(**nested["cache"]),
                   scheduler=SchedulerConfig(**nested["scheduler"]), lora=LoRAConfig(**nested["lora"]), **top)


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name} {message}")
