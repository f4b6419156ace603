"""Benchmark prompts from a ShareGPT-format JSON file (first human turn of each conversation)."""

from __future__ import annotations

import json
import os

DEFAULT_DATASET = os.path.join("..", "shared", "datasets", "sharegpt_first_turns.json")


def _conversations(path: str) -> list[list[dict]]:
    """Each conversation's turns."""
    if not os.path.isfile(path):
        raise ValueError(f"dataset {path!r} not found")
    with open(path) as f:
        return [conversation.get("conversations") or [] for conversation in json.load(f)]


def load_sharegpt_turns(path: str, role: str) -> list[str]:
    """The first `role` turn ("human" or "gpt") of each conversation that has a non-empty one."""
    texts = []
    for turns in _conversations(path):
        text = next((t.get("value", "") for t in turns if t.get("from") == role), "").strip()
        if text:
            texts.append(text)
    return texts


def load_sharegpt_pairs(path: str, num: int) -> list[tuple[str, str]]:
    """(first human turn, first answer after it) of the first `num` conversations that have both."""
    pairs = []
    for turns in _conversations(path):
        first = next((i for i, t in enumerate(turns) if t.get("from") == "human" and t.get("value", "").strip()),
                     None)
        answer = None if first is None else next(
            (t["value"].strip() for t in turns[first + 1:] if t.get("from") == "gpt" and t.get("value", "").strip()),
            None)
        if answer is not None:
            pairs.append((turns[first]["value"].strip(), answer))
            if len(pairs) == num:
                return pairs
    raise ValueError(f"dataset {path!r} has {len(pairs)} conversations with a question and an answer; {num} asked for")


def load_sharegpt_questions(path: str, num: int, skip: int = 0) -> list[str]:
    """The first human turn of conversations `skip` .. `skip + num` that have one."""
    questions = load_sharegpt_turns(path, "human")
    if len(questions) < skip + num:
        raise ValueError(f"dataset {path!r} has {len(questions)} usable prompts; {skip + num} asked for")
    return questions[skip:skip + num]


def chat_prompt_ids(tokenizer, question: str, max_prompt_tokens: int) -> list[int]:
    """The chat-templated prompt, the question shortened so that the whole prompt fits max_prompt_tokens."""

    def render(text: str) -> list[int]:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"])

    ids = render(question)
    content = tokenizer.encode(question, add_special_tokens=False)
    keep = len(content) - (len(ids) - max_prompt_tokens)
    while len(ids) > max_prompt_tokens:
        ids = render(tokenizer.decode(content[:keep]))
        keep -= 1
    return ids


def sharegpt_answer_budgets(tokenizer, path: str, num: int, skip: int, max_tokens_cap: int
                            ) -> list[tuple[str, str, int]]:
    """(id, question, max_tokens) for ShareGPT conversations skip .. skip + num that have a question and an answer,
    exact repeats of an earlier question dropped: max_tokens is the answer's length in this tokenizer's tokens, at
    most max_tokens_cap (the serving benchmarks' workload: each request asks for about what ShareGPT's answer had)."""
    seen: set[str] = set()
    budgets = []
    for index, (question, answer) in enumerate(load_sharegpt_pairs(path, skip + num)):
        if question in seen:
            continue
        seen.add(question)
        if index >= skip:
            length = len(tokenizer.encode(answer, add_special_tokens=False))
            budgets.append((f"sharegpt-{index}", question, max(1, min(length, max_tokens_cap))))
    return budgets
