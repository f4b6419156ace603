"""The grammar backend on xgrammar: of xgrammar and llguidance, the faster to mask on the CPU (docs/api.md)."""

from __future__ import annotations

import json

import torch
import xgrammar

from foreseer.sampling_params import StructuredOutputsParams


class XGrammarBackend:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: set[int]) -> None:
        """`tokenizer`: a transformers tokenizer; `vocab_size`: the model's (the logits' width); at a grammar's end
        only `eos_token_ids` are allowed."""
        self.vocab_size = vocab_size
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=sorted(eos_token_ids))
        # Its own cache off: GrammarCompiler caches by spec.
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)

    def compile(self, spec: StructuredOutputsParams) -> xgrammar.CompiledGrammar:
        # Compact JSON (any_whitespace=False): with free whitespace, small models can pad forever.
        if spec.json is not None:
            schema = spec.json if isinstance(spec.json, str) else json.dumps(spec.json)
            return self.compiler.compile_json_schema(schema, any_whitespace=False)
        if spec.json_object:
            return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if spec.regex is not None:
            return self.compiler.compile_regex(spec.regex)
        if spec.choice is not None:
            alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice)
            return self.compiler.compile_grammar(f"root ::= {alternatives}")
        return self.compiler.compile_grammar(spec.grammar)

    def matcher(self, compiled: xgrammar.CompiledGrammar) -> xgrammar.GrammarMatcher:
        return xgrammar.GrammarMatcher(compiled)

    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        return xgrammar.allocate_token_bitmask(rows, self.vocab_size)

    def apply_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True))
