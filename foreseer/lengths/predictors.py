"""Length predictors behind one interface: predict(prompts) -> the predicted longest answer, selectable by name."""

from __future__ import annotations

import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch

from foreseer.lengths.features import prompt_hidden_states
from foreseer.lengths.probe import ProbeHead, default_probe_dir
from foreseer.lengths.remaining import RemainingHead, default_head_dir
from foreseer.lora import LoRARequest
from foreseer.sampling_params import SamplingParams

# The paper's PiA instruction (Zheng et al., 2023), appended to the user's message.
MAX_TOKENS = 512  # the answer cap of the length datasets the shipped predictors learnt from
WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")
# Packaged model name -> directory of its trained length adapter under WEIGHTS_DIR.
SHIPPED_ADAPTERS = {"smollm2-135m-instruct": "smollm2-135m-instruct-length-lora"}
PIA_INSTRUCTION = (
    "Don't output the response for the above instruction. Instead, you need to predict the number of tokens in "
    "your response. Output only one number."
)
PIA_LIMIT = 8192  # a stated length above this is not an estimate but noise
# The length adapter's lora_int_id: far from the small ids users give their own adapters.
LENGTH_LORA_ID = 2**31 - 1
TOKENS_PER_WORD = 1.33  # when the model states words instead of tokens


def default_adapter_dir(model: str) -> str:
    """The shipped length adapter of a packaged model; ValueError if none is shipped."""
    if model not in SHIPPED_ADAPTERS:
        raise ValueError(f"no length adapter is shipped for model {model!r}; shipped: {', '.join(SHIPPED_ADAPTERS)} "
                         "(train one with `foreseer lengths train --predictor lora`)")
    return os.path.join(WEIGHTS_DIR, SHIPPED_ADAPTERS[model])


class LengthPredictor(ABC):
    """Predicts, before generation, the longest answer the model may give to each prompt."""

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def create(cls, llm, **options) -> LengthPredictor:
        """The predictor for this engine's model, from the registry's options."""

    @abstractmethod
    def predict(self, prompts: Sequence[Sequence[int]]) -> list[int]:
        """Chat-templated prompt token ids -> predicted maximum answer length in tokens, one per prompt."""

    def refine(self, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]) -> list[int] | None:
        """The whole answer's length predicted again once `outputs` (the answer so far) are generated; None if
        this predictor reads only the prompt."""
        return None


PREDICTORS: dict[str, type[LengthPredictor]] = {}


def register(cls: type[LengthPredictor]) -> type[LengthPredictor]:
    """Make a predictor selectable by its name (class decorator)."""
    if cls.name in PREDICTORS:
        raise ValueError(f"a length predictor named {cls.name!r} is already registered")
    PREDICTORS[cls.name] = cls
    return cls


def create_predictor(name: str, llm, **options) -> LengthPredictor:
    if name not in PREDICTORS:
        raise ValueError(f"unknown length predictor {name!r}; available: {', '.join(sorted(PREDICTORS))}")
    return PREDICTORS[name].create(llm, **options)


_NUMBER = r"(-?\d+(?:\.\d+)?(?:[eE]\d+)?)\s*([kK](?![a-zA-Z]))?"
_QUANTITY = re.compile(_NUMBER + r"(?:\s*(?:-|–|to)\s*" + _NUMBER + r")?")
_LIST_MARKER = re.compile(r"^[ \t]*\d+[.)][ \t]+(?=\S)", re.MULTILINE)
_UNIT = re.compile(r"\s*(tokens?|words?)\b", re.IGNORECASE)
_APPROXIMATELY = re.compile(r"(about|around|approximately|roughly|~|estimate[ds]?:?|length:?)\s*$", re.IGNORECASE)


def parse_pia_length(text: str, limit: int = PIA_LIMIT) -> int | None:
    """The answer length a model stated, in tokens, or None if it stated none or an absurd one.

    A number is a stated length if the reply starts with it, a unit follows it ("tokens", "words") or an
    approximation precedes it ("about"); other numbers (dates, versions, list items, "the answer is 1") are not.
    Robust to what small models write: thousands separators ("1,200"), "1.5k", ranges (the upper end, as the
    label is a maximum: "100-150 tokens" -> 150), words instead of tokens (converted), list numbering
    ("1. First, ..." is not a length). A number below 1 (negative included) or above `limit` is absurd.
    """
    cleaned = re.sub(r"(?<=\d),(?=\d{3}\b)", "", _LIST_MARKER.sub("", text))
    for match in _QUANTITY.finditer(cleaned):
        low = _value(*match.group(1, 2))
        high = _value(*match.group(3, 4)) if match.group(3) else low
        unit = _UNIT.match(cleaned, match.end())
        if not (unit or not cleaned[:match.start()].strip() or _APPROXIMATELY.search(cleaned[:match.start()])):
            continue
        value = high if high >= low else low  # "2023-01" is no range
        if unit and unit.group(1).lower().startswith("word"):
            value *= TOKENS_PER_WORD
        return round(value) if 1 <= value <= limit else None
    return None


def _value(number: str, thousands: str | None) -> float:
    return float(number) * (1000 if thousands else 1)


def instruction_prompt(tokenizer, prompt: Sequence[int], instruction: str) -> list[int]:
    """The chat-templated prompt with `instruction` appended to its last user message (tokens spliced, so the
    question is not re-tokenized). Raises ValueError if the prompt does not end with the generation prompt."""
    suffix = _generation_suffix(tokenizer)
    if len(prompt) <= len(suffix) or list(prompt[-len(suffix):]) != suffix:
        raise ValueError("prompt does not end with the chat template's end of user turn and generation prompt")
    added = tokenizer.encode("\n\n" + instruction, add_special_tokens=False)
    return list(prompt[:-len(suffix)]) + added + suffix


def _generation_suffix(tokenizer) -> list[int]:
    """Tokens the chat template puts after a user message's content: the common tail of two renderings."""

    def render(text: str) -> list[int]:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"])

    a, b = render("A"), render("B")
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    if n == 0:
        raise ValueError("the chat template puts no fixed tokens after a user message")
    return a[len(a) - n:]


@register
class PiaPredictor(LengthPredictor):
    """Perception in Advance, prompt-only: the model is asked to state its answer's length before answering.

    Greedy, a few tokens; the statement is parsed with `parse_pia_length`, capped at max_length, and `default`
    stands in where the model stated no usable length. With `lora_request`, the question runs with that adapter
    (LoraPredictor)."""

    name = "pia"

    def __init__(self, llm, default: int = 256, max_length: int = MAX_TOKENS, instruction: str = PIA_INSTRUCTION,
                 max_tokens: int = 16, lora_request: LoRARequest | None = None) -> None:
        if not 1 <= default <= max_length:
            raise ValueError(f"default must be in [1, max_length={max_length}], got {default!r}")
        self.llm = llm
        self.default = default
        self.max_length = max_length
        self.instruction = instruction
        self.params = SamplingParams(temperature=0, max_tokens=max_tokens)
        self.lora_request = lora_request
        self.last_texts: list[str] = []  # the model's statements of the last predict call, for inspection

    @classmethod
    def create(cls, llm, **options) -> PiaPredictor:
        return cls(llm, **options)

    def predict(self, prompts: Sequence[Sequence[int]]) -> list[int]:
        asks = [instruction_prompt(self.llm.tokenizer, p, self.instruction) for p in prompts]
        adapter = {} if self.lora_request is None else {"lora_request": self.lora_request}
        outputs = self.llm.generate(asks, self.params, use_tqdm=False, **adapter)
        self.last_texts = [o.outputs[0].text for o in outputs]
        stated = [parse_pia_length(text) for text in self.last_texts]
        return [self.default if n is None else min(n, self.max_length) for n in stated]


# The lora predictor's length classes: upper edges in tokens, one letter each, and an open class above the last.
LENGTH_CLASS_EDGES = (32, 64, 128, 256, 512, 1024)
LENGTH_CLASS_LETTERS = "ABCDEFG"


def length_class_question(edges: Sequence[int] = LENGTH_CLASS_EDGES) -> str:
    """The lora predictor's question: which length class the answer falls in, as one letter."""
    letters = LENGTH_CLASS_LETTERS[:len(edges) + 1]
    classes = [f"{letters[0]} (up to {edges[0]} tokens)", *(f"{letter} (up to {edge})" for letter, edge in
                                                            zip(letters[1:], edges[1:])), f"{letters[-1]} (more)"]
    return (f"How long will your answer to the above be? Do not answer it; reply with one letter: "
            f"{', '.join(classes)}.")


def length_class(length: int, edges: Sequence[int] = LENGTH_CLASS_EDGES) -> int:
    """The class of an answer of `length` tokens: the first whose upper edge holds it, else the open one."""
    return next((k for k, edge in enumerate(edges) if length <= edge), len(edges))


def class_token_ids(tokenizer, edges: Sequence[int] = LENGTH_CLASS_EDGES) -> list[int]:
    """The token of each class letter; ValueError if the tokenizer splits a letter."""
    ids = [tokenizer.encode(letter, add_special_tokens=False) for letter in LENGTH_CLASS_LETTERS[:len(edges) + 1]]
    if any(len(i) != 1 for i in ids):
        raise ValueError("the tokenizer has no single token for each length-class letter")
    return [i[0] for i in ids]


def class_lengths(edges: Sequence[int] = LENGTH_CLASS_EDGES) -> list[float]:
    """A length standing for each class: the geometric middle of its edges (the open class: 1.5x its lower one)."""
    lower = [1, *edges]
    return [(low * high) ** 0.5 for low, high in zip(lower, edges)] + [1.5 * edges[-1]]


@register
class LoraPredictor(LengthPredictor):
    """The paper's instruction-tuned predictor (Zheng et al., 2023), as a classifier: the model itself with a LoRA
    adapter trained to answer `length_class_question` with the letter of its answer's length class (trained by
    foreseer/training/lengths/lora.py, with a censored likelihood). It reads the letters' probabilities from one
    token's logprobs, so the prediction is a distribution's mean, not one class for every prompt. The engine serves
    the adapter beside the base model, in the same batches as user requests; it needs LLM(..., enable_lora=True)."""

    name = "lora"
    NUM_LOGPROBS = 20  # the letters' share is read from the top tokens; a letter not among them counts as 0

    def __init__(self, llm, adapter_dir: str, default: int = 256, max_length: int = 4096,
                 lora_int_id: int = LENGTH_LORA_ID) -> None:
        _require_lora(llm)
        if not 1 <= default <= max_length:
            raise ValueError(f"default must be in [1, max_length={max_length}], got {default!r}")
        self.lora_request = LoRARequest("length-predictor", lora_int_id, adapter_dir)
        llm.engine.load_lora(self.lora_request)  # a bad adapter fails here, not as rejected requests later
        self.llm = llm
        self.adapter_dir = adapter_dir
        self.default = default  # where no letter is among the top tokens
        self.max_length = max_length
        self.question = length_class_question()
        self.letter_ids = class_token_ids(llm.tokenizer)
        self.lengths = torch.tensor(class_lengths())
        self.params = SamplingParams(temperature=0, max_tokens=1, logprobs=self.NUM_LOGPROBS)
        self.last_probabilities: list[torch.Tensor | None] = []  # per prompt of the last call, for inspection

    @classmethod
    def create(cls, llm, weights_dir: str | None = None, **options) -> LoraPredictor:
        """The adapter in weights_dir, by default the one shipped for the engine's model."""
        _require_lora(llm)
        return cls(llm, weights_dir or default_adapter_dir(llm.engine.config.model), **options)

    def class_probabilities(self, prompts: Sequence[Sequence[int]]) -> list[torch.Tensor | None]:
        """Per prompt, the length classes' probabilities (normalized over the letters), or None if no letter is
        among the top tokens."""
        asks = [instruction_prompt(self.llm.tokenizer, p, self.question) for p in prompts]
        outputs = self.llm.generate(asks, self.params, use_tqdm=False, lora_request=self.lora_request)
        probabilities = []
        for output in outputs:
            top = output.outputs[0].logprobs[0]
            mass = torch.tensor([math.exp(top[i].logprob) if i in top else 0.0 for i in self.letter_ids])
            probabilities.append(mass / mass.sum() if mass.sum() > 0 else None)
        return probabilities

    def predict(self, prompts: Sequence[Sequence[int]]) -> list[int]:
        self.last_probabilities = self.class_probabilities(prompts)
        return [self.default if p is None else min(max(round(float(p @ self.lengths)), 1), self.max_length)
                for p in self.last_probabilities]


def _require_lora(llm) -> None:
    if not llm.engine.config.lora.enable_lora:
        raise ValueError("the lora length predictor needs LLM(..., enable_lora=True) (CLI: --enable-lora)")


@register
class ConstantPredictor(LengthPredictor):
    """The same length for every prompt: the baseline any predictor must beat."""

    name = "constant"

    def __init__(self, value: int = 256) -> None:
        if value < 1:
            raise ValueError(f"value must be >= 1, got {value!r}")
        self.value = value

    @classmethod
    def create(cls, llm, **options) -> ConstantPredictor:
        return cls(**options)

    def predict(self, prompts: Sequence[Sequence[int]]) -> list[int]:
        return [self.value] * len(prompts)


class KnownLengthPredictor(LengthPredictor):
    """The oracle: lengths already known for each prompt (e.g. from an earlier run), for upper-bound studies."""

    name = "oracle"

    def __init__(self, lengths: dict[tuple[int, ...], int]) -> None:
        self.lengths = lengths

    @classmethod
    def create(cls, llm, **options) -> KnownLengthPredictor:
        raise ValueError("the oracle predictor needs the known lengths: build KnownLengthPredictor(lengths)")

    def predict(self, prompts: Sequence[Sequence[int]]) -> list[int]:
        missing = sum(tuple(p) not in self.lengths for p in prompts)
        if missing:
            raise ValueError(f"the oracle knows no length for {missing} of these prompts")
        return [self.lengths[tuple(p)] for p in prompts]


@register
class ProbePredictor(LengthPredictor):
    """A small head on the model's hidden state at the end of prefill (foreseer/lengths/probe.py)."""

    name = "probe"

    def __init__(self, llm, head: ProbeHead, quantile: float | None = None) -> None:
        if head.config.hidden_size != llm.engine.model_config.hidden_size:
            raise ValueError(f"probe is for hidden size {head.config.hidden_size}, the model has "
                             f"{llm.engine.model_config.hidden_size}")
        if quantile is not None and (head.config.kind != "buckets" or not 0 < quantile < 1):
            raise ValueError(f"quantile must be in (0, 1) and needs a buckets probe; got {quantile!r} for a "
                             f"{head.config.kind} probe")
        self.llm = llm
        self.head = head
        self.quantile = quantile  # None: the length most likely within the probe's tolerance; else an upper quantile

    @classmethod
    def create(cls, llm, weights_dir: str | None = None, quantile: float | None = None) -> ProbePredictor:
        """The probe in weights_dir, by default the one shipped for the engine's model."""
        directory = weights_dir or default_probe_dir(llm.engine.config.model)
        return cls(llm, ProbeHead.load(directory, llm.engine.model_config.hidden_size), quantile)

    def predict(self, prompts: Sequence[Sequence[int]]) -> list[int]:
        return self.predict_from_hidden(prompt_hidden_states(self.llm.engine, prompts), [len(p) for p in prompts])

    def predict_from_hidden(self, hidden: torch.Tensor, prompt_lengths: Sequence[int]) -> list[int]:
        """From hidden states the engine's prefill already computed: the whole cost of the probe at serving time."""
        return self.head.predict(hidden, torch.tensor(prompt_lengths), self.quantile)


@register
class RemainingPredictor(LengthPredictor):
    """The remaining-length head (foreseer/lengths/remaining.py) before generation: one prefill per prompt, the
    head read at its last token; `refine` reads it again after part of the answer."""

    name = "remaining"

    def __init__(self, llm, head: RemainingHead, quantile: float | None = None) -> None:
        if head.config.hidden_size != llm.engine.model_config.hidden_size:
            raise ValueError(f"remaining-length head is for hidden size {head.config.hidden_size}, the model has "
                             f"{llm.engine.model_config.hidden_size}")
        if quantile is not None and not 0 < quantile < 1:
            raise ValueError(f"quantile must be in (0, 1), got {quantile!r}")
        self.llm = llm
        self.head = head
        self.quantile = quantile  # None: the mean of the predicted distribution; else that upper quantile

    @classmethod
    def create(cls, llm, weights_dir: str | None = None, quantile: float | None = None) -> RemainingPredictor:
        """The head in weights_dir, by default the one shipped for the engine's model."""
        directory = weights_dir or default_head_dir(llm.engine.config.model)
        return cls(llm, RemainingHead.load(directory, llm.engine.model_config.hidden_size), quantile)

    def predict(self, prompts: Sequence[Sequence[int]]) -> list[int]:
        return self.refine(prompts, [[] for _ in prompts])

    def refine(self, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]) -> list[int]:
        sequences = [list(p) + list(o) for p, o in zip(prompts, outputs)]
        hidden = prompt_hidden_states(self.llm.engine, sequences, layer=self.head.config.layer)
        generated = torch.tensor([len(o) for o in outputs])
        estimates = self.head.predict(hidden, generated, torch.tensor([len(p) for p in prompts]))
        cap = self.head.config.edges[-1]
        return [max(round(len(o) + (e.mean(len(o), cap) if self.quantile is None
                                    else e.quantile(self.quantile, len(o), cap))), 1)
                for o, e in zip(outputs, estimates)]
