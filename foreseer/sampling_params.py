"""Per-request sampling parameters, in the shape of vLLM's SamplingParams."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

# A temperature below this samples greedily (vLLM's rule): the logits divided by it would overflow float32 (1e-320
# is 0 there), and the distribution it leaves is its argmax anyway.
GREEDY_TEMPERATURE = 1e-5
# A top_k at least this keeps every token of any vocabulary, as 0 does (and would overflow an int64 tensor).
TOP_K_UNLIMITED = 2**31
# Beyond these, float32 logits divided or multiplied by the penalty overflow (an infinite logit leaves no
# distribution) or vanish.
REPETITION_PENALTY_RANGE = (1e-6, 1e6)
LOGIT_BIAS_RANGE = (-100.0, 100.0)  # OpenAI's
SEED_RANGE = (-(2**63), 2**63)  # a torch.Generator takes [-2**63, 2**64): seed + i, for the i-th of n choices, fits


@dataclass
class StructuredOutputsParams:
    """A constraint on the generated text (vLLM's form): exactly one of these is set. The engine compiles it when
    the request is added; a schema, regex or grammar the library refuses is a ValueError then."""

    json: dict | str | None = None  # a JSON schema, as a dict or its JSON text
    regex: str | None = None
    choice: list[str] | None = None  # the output is one of these strings
    grammar: str | None = None  # EBNF, in the grammar library's dialect (xgrammar's GBNF)
    json_object: bool = False  # any JSON object

    def __post_init__(self) -> None:
        kinds = [name for name in ("json", "regex", "choice", "grammar", "json_object") if getattr(self, name)]
        _check(len(kinds) == 1, "structured_outputs", f"must set exactly one of json, regex, choice, grammar or "
               f"json_object, got {kinds or 'none'}")
        _check(self.json is None or isinstance(self.json, dict | str), "structured_outputs",
               f"json must be a schema dict or its JSON text, got {type(self.json).__name__}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            _check(value is None or isinstance(value, str), "structured_outputs",
                   f"{name} must be a string, got {type(value).__name__}")
        _check(self.choice is None or (isinstance(self.choice, list | tuple)
                                       and all(isinstance(c, str) and c for c in self.choice)),
               "structured_outputs", "choice must be a list of non-empty strings")
        _check(isinstance(self.json_object, bool), "structured_outputs", "json_object must be a bool")
        if self.choice is not None:
            self.choice = list(self.choice)

    @property
    def kind(self) -> str:
        """Which constraint is set: json, regex, choice, grammar or json_object."""
        return next(name for name in ("json", "regex", "choice", "grammar", "json_object") if getattr(self, name))

    @property
    def key(self) -> tuple[str, str]:
        """What identifies the compiled grammar: equal keys compile to the same one."""
        value = getattr(self, self.kind)
        if isinstance(value, dict | list):
            value = json.dumps(value, sort_keys=True)
        return self.kind, str(value)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 (or below GREEDY_TEMPERATURE) means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 disables
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the model's context
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per generated token
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    use_speculation: bool = True  # False: this request opts out of the engine's speculative decoding
    # Logits processing (vLLM's names and semantics), before temperature: bad_words and min_tokens mask tokens,
    # logit_bias adds to them, then repetition_penalty (over prompt and generated tokens: a logit > 0 divided by it,
    # else multiplied), frequency_penalty (times each token's count in the generated tokens) and presence_penalty
    # (once per generated token) are subtracted. They apply to greedy requests too. A request with any of them
    # set does not speculate: the penalties depend on the tokens before each draft position.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens are generated
    bad_words: list[str] | None = None  # a word's last token is masked where its other tokens were just generated
    # A grammar the output follows (JSON schema, regex, choice, EBNF); such a request does not speculate.
    structured_outputs: StructuredOutputsParams | None = None
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check(_is_integer(self.n) and self.n >= 1, "n", f"must be an integer >= 1, got {self.n!r}")
        _check(_is_finite(self.temperature) and self.temperature >= 0, "temperature",
               f"must be a finite number >= 0, got {self.temperature!r}")
        _check(_is_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        _check(_is_integer(self.top_k) and self.top_k >= -1, "top_k",
               f"must be an integer >= 1, or 0 or -1 to disable, got {self.top_k!r}")
        _check(_is_finite(self.min_p) and 0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p!r}")
        _check(self.seed is None or (_is_integer(self.seed) and SEED_RANGE[0] <= self.seed < SEED_RANGE[1]), "seed",
               f"must be an integer in [-2**63, 2**63), got {self.seed!r}")
        _check(self.max_tokens is None or (_is_integer(self.max_tokens) and self.max_tokens >= 1), "max_tokens",
               f"must be an integer >= 1, got {self.max_tokens!r}")
        _check(self.logprobs is None or (_is_integer(self.logprobs) and self.logprobs >= 0), "logprobs",
               f"must be an integer >= 0, got {self.logprobs!r}")
        _check(self.stop is None or isinstance(self.stop, str | list | tuple), "stop",
               f"must be a string or a list of strings, got {type(self.stop).__name__}")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        _check(all(isinstance(s, str) and s for s in stops), "stop", "must be non-empty strings")
        self.stop_strings = stops
        _check(self.stop_token_ids is None or isinstance(self.stop_token_ids, list | tuple), "stop_token_ids",
               f"must be a list of token ids, got {type(self.stop_token_ids).__name__}")
        ids = list(self.stop_token_ids or [])
        _check(all(_is_integer(t) and t >= 0 for t in ids), "stop_token_ids", "must be non-negative integers")
        self.stop_token_ids = ids
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_finite(value) and -2 <= value <= 2, name, f"must be in [-2, 2], got {value!r}")
        low, high = REPETITION_PENALTY_RANGE
        _check(_is_finite(self.repetition_penalty) and low <= self.repetition_penalty <= high, "repetition_penalty",
               f"must be > 0 (in [{low:g}, {high:g}]), got {self.repetition_penalty!r}")
        _check(self.logit_bias is None or isinstance(self.logit_bias, dict), "logit_bias",
               f"must be a dict of token id -> bias, got {type(self.logit_bias).__name__}")
        bias = dict(self.logit_bias or {})
        _check(all(_is_integer(t) and t >= 0 for t in bias), "logit_bias", "keys must be non-negative token ids")
        low, high = LOGIT_BIAS_RANGE
        _check(all(_is_finite(b) and low <= b <= high for b in bias.values()), "logit_bias",
               f"values must be in [{low:g}, {high:g}]")
        self.logit_bias = {t: float(b) for t, b in bias.items()} or None
        _check(_is_integer(self.min_tokens) and self.min_tokens >= 0, "min_tokens",
               f"must be an integer >= 0, got {self.min_tokens!r}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               f"must be at most max_tokens ({self.max_tokens}), got {self.min_tokens!r}")
        _check(self.bad_words is None or isinstance(self.bad_words, list | tuple), "bad_words",
               f"must be a list of strings, got {type(self.bad_words).__name__}")
        _check(all(isinstance(w, str) and w.strip() for w in self.bad_words or []), "bad_words",
               "must be non-blank strings")
        self.bad_words = list(self.bad_words or []) or None
        _check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
               "structured_outputs", f"must be a StructuredOutputsParams, got {type(self.structured_outputs).__name__}")
        # At the grammar's end only EOS is allowed: past an ignored EOS the grammar allows nothing.
        _check(self.structured_outputs is None or not self.ignore_eos, "structured_outputs",
               "cannot be combined with ignore_eos")
        # As floats: a large int temperature would overflow the int64 tensor the sampler builds from them.
        self.temperature, self.top_p, self.min_p = float(self.temperature), float(self.top_p), float(self.min_p)
        self.presence_penalty, self.frequency_penalty = float(self.presence_penalty), float(self.frequency_penalty)
        self.repetition_penalty = float(self.repetition_penalty)
        if self.top_k == -1 or self.top_k >= TOP_K_UNLIMITED:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def adjusts_logits(self) -> bool:
        """Whether any logits processing (penalties, logit_bias, min_tokens, bad_words) is set."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens or self.bad_words)

    @property
    def speculates(self) -> bool:
        """Whether the engine may speculate for this request: not where the logits processing depends on the
        tokens generated before each position, nor where a grammar's mask does."""
        return self.use_speculation and not self.adjusts_logits and self.structured_outputs is None


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: object) -> bool:
    """A number that float32 and float64 arithmetic can take: not NaN, infinite, or an int too large for a float."""
    try:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(float(value))
    except OverflowError:
        return False


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name} {message}")
