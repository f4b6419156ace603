"""Engine configuration (dataclasses); every field is validated with an error that names it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CacheConfig:
    block_size: int = 16
    kv_cache_gib: float | None = None  # fixed size; overrides the fraction
    kv_cache_memory_fraction: float = 0.2  # of the device's free memory, when no size is given
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _check(self.block_size >= 1, "block_size", "must be >= 1")
        _check(self.kv_cache_gib is None or self.kv_cache_gib > 0, "kv_cache_gib", "must be > 0")
        _check(0 < self.kv_cache_memory_fraction <= 1, "kv_cache_memory_fraction", "must be in (0, 1]")


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 2048  # token budget of one step: decodes first, then prefill chunks
    max_num_seqs: int = 256
    policy: str = "fcfs"

    def __post_init__(self) -> None:
        _check(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be >= 1")
        _check(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")


@dataclass
class EngineConfig:
    model: str = "smollm2-135m-instruct"
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on GPU
    device: str = "auto"
    max_model_len: int | None = None  # default: the model's context length
    attention_backend: str = "auto"  # auto, cpu (C++ kernels), torch (reference)
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> EngineConfig:
        """Flat keyword arguments (as LLM(...) and the CLI take them) into the nested configs."""
        sections = {"cache": CacheConfig, "scheduler": SchedulerConfig}
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
                   scheduler=SchedulerConfig(**nested["scheduler"]), **top)


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name} {message}")
