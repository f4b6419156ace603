"""Structured outputs: grammars (JSON schema, regex, choice, EBNF) that mask the logits of constrained requests."""

from foreseer.structured.backend import GrammarBackend, GrammarCompiler, GrammarMatcher, SequenceGrammar

__all__ = ["GrammarBackend", "GrammarCompiler", "GrammarMatcher", "SequenceGrammar"]
