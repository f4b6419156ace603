"""Incremental detokenization with stop strings."""

from __future__ import annotations

# Prompt tokens decoded with the output so that tokenizers that mark word starts (SentencePiece) keep spaces.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool,
        stop_strings: list[str], include_stop_str_in_output: bool,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop_strings = stop_strings
        self.include_stop = include_stop_str_in_output
        self.tokens = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.text = ""
        self.stopped = False  # a stop string ended the text
        # Text that could still be the start of a stop string is held back until it is ruled out.
        self.holdback = max((len(s) for s in stop_strings), default=1) - 1

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special_tokens)

    def update(self, token: int) -> str | None:
        """Add one generated token; returns the stop string if the text now contains one."""
        self.tokens.append(token)
        prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset:])
        # A trailing U+FFFD means an incomplete UTF-8 sequence: wait for the next token.
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        search_from = max(0, len(self.text) - self.holdback)
        self.text += full[len(prefix):]
        for stop in self.stop_strings:
            index = self.text.find(stop, search_from)
            if index != -1:
                self.text = self.text[: index + len(stop) if self.include_stop else index]
                self.stopped = True
                return stop
        return None

    def flush(self) -> None:
        """At the end of generation, emit what was held back as a possibly incomplete character."""
        if not self.stopped:
            prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
            self.text += self._decode(self.tokens[self.prefix_offset:])[len(prefix):]
            self.prefix_offset = self.read_offset = len(self.tokens)

    def visible_text(self, finished: bool) -> str:
        if finished or not self.holdback:
            return self.text
        return self.text[: max(0, len(self.text) - self.holdback)]
