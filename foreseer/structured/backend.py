"""What the engine needs of a grammar library: compile a spec, match tokens, and mask logits with a bitmask."""

from __future__ import annotations

import collections
from typing import Protocol

import torch

from foreseer.sampling_params import StructuredOutputsParams

COMPILED_GRAMMARS_KEPT = 256  # compiled grammars cached by spec (a schema compiles in milliseconds; a hit is free)


class GrammarMatcher(Protocol):
    """One sequence's position in a compiled grammar."""

    def accept_token(self, token: int) -> bool:
        """Advance by `token`; False (and no change) where the grammar forbids it."""

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        """Write into row `index` of `bitmask` which tokens may come next (at the grammar's end: only EOS)."""

    def reset(self) -> None:
        """Back to the grammar's start."""


class GrammarBackend(Protocol):
    """A grammar library bound to one tokenizer. Bitmasks are int32 [rows, ceil(vocab / 32)]: bit j of word k
    allows token 32k + j (xgrammar's and llguidance's layout)."""

    def compile(self, spec: StructuredOutputsParams) -> object:
        """The compiled grammar; ValueError with the library's message where it refuses the spec."""

    def matcher(self, compiled: object) -> GrammarMatcher: ...

    def allocate_bitmask(self, rows: int) -> torch.Tensor: ...

    def apply_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        """Set the logits of the tokens each row's bitmask forbids to -inf, in place; the others stay as they are."""


class GrammarCompiler:
    """Compiles specs with a backend, caching the compiled grammars by spec."""

    def __init__(self, backend: GrammarBackend) -> None:
        self.backend = backend
        self._compiled: collections.OrderedDict[tuple[str, str], object] = collections.OrderedDict()

    def matcher(self, spec: StructuredOutputsParams) -> SequenceGrammar:
        """A fresh matcher for one sequence; ValueError naming structured_outputs where the spec does not compile."""
        key = spec.key
        compiled = self._compiled.get(key)
        if compiled is None:
            try:
                compiled = self.backend.compile(spec)
            except (ValueError, RuntimeError) as error:  # xgrammar raises RuntimeError for a bad regex or grammar
                raise ValueError(f"SamplingParams.structured_outputs {spec.kind} does not compile: {error}") from None
            self._compiled[key] = compiled
            if len(self._compiled) > COMPILED_GRAMMARS_KEPT:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(key)
        return SequenceGrammar(self.backend, self.backend.matcher(compiled))


class SequenceGrammar:
    """A sequence's matcher, kept a function of its generated tokens: before each mask it consumes the tokens it
    has not seen, and starts over where they are not what it saw (a step run again after a fault)."""

    def __init__(self, backend: GrammarBackend, matcher: GrammarMatcher) -> None:
        self.backend = backend
        self.matcher = matcher
        self.consumed: list[int] = []

    def fill_bitmask(self, output_token_ids: list[int], bitmask: torch.Tensor, index: int) -> None:
        """Row `index` of `bitmask`: the tokens the grammar allows after `output_token_ids`. ValueError where the
        grammar forbids one of them."""
        if output_token_ids[:len(self.consumed)] != self.consumed:
            self.matcher.reset()
            self.consumed = []
        for token in output_token_ids[len(self.consumed):]:
            if not self.matcher.accept_token(token):
                raise ValueError(f"token {token} is not allowed by the request's structured_outputs grammar")
            self.consumed.append(token)
        self.matcher.fill_next_token_bitmask(bitmask, index)
