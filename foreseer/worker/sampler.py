"""Token sampling: logits processing (penalties, logit bias, min tokens, bad words), greedy, temperature, top-k,
top-p, min-p, per-request seeds, and top-N logprobs."""

from __future__ import annotations

import torch

from foreseer.core.draft_tree import DraftTree
from foreseer.core.output import RequestFault
from foreseer.core.request import Request
from foreseer.outputs import Logprob
from foreseer.worker.rejection import verify_greedy, verify_sampling

TokenLogprobs = list[tuple[float, dict[int, Logprob]]]  # per emitted token: its logprob, and the top-N beside it


class Sampler:
    def __init__(self, seed: int) -> None:
        # Requests without a seed of their own draw from the engine's generator, so whole runs repeat.
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(
        self, logits: torch.Tensor, requests: list[Request], drafts: list[DraftTree]
    ) -> tuple[list[list[int]], list[list[int]], dict[str, TokenLogprobs]]:
        """logits: [S, V] float32, 1 + len(drafts[i]) consecutive rows for request i: at its last token, then
        at each draft node. Returns each request's emitted tokens, its accepted draft nodes and, where asked,
        the emitted tokens' logprobs."""
        row_requests = [r for r, d in zip(requests, drafts) for _ in range(len(d) + 1)]
        adjusted = adjusted_logits(logits, row_requests)  # logprobs stay the model's own (vLLM's raw_logprobs)
        adjusted = grammar_masked_logits(adjusted, logits, row_requests)
        argmax = adjusted.argmax(dim=-1).tolist()
        random_rows = [i for i, r in enumerate(row_requests) if not r.params.greedy]
        probs = None
        if random_rows:
            probs = self.processed_probs(adjusted[random_rows], [row_requests[i] for i in random_rows])
            row_of = {row: i for i, row in enumerate(random_rows)}
        tokens, paths, logprobs = [], [], {}
        start = 0
        for request, draft in zip(requests, drafts):
            end = start + len(draft) + 1
            target = None if request.params.greedy else probs[row_of[start]:row_of[start] + len(draft) + 1]
            try:  # what fails here is this request's alone
                emitted, path, request_logprobs = self._emit(request, draft, logits[start:end], argmax[start:end],
                                                             target)
            except Exception as error:
                raise RequestFault([request.request_id], error) from error
            tokens.append(emitted)
            paths.append(path)
            if request_logprobs is not None:
                logprobs[request.request_id] = request_logprobs
            start = end
        return tokens, paths, logprobs

    def _emit(self, request: Request, draft: DraftTree, logits: torch.Tensor, argmax: list[int],
              target: torch.Tensor | None) -> tuple[list[int], list[int], TokenLogprobs | None]:
        """One request's emitted tokens, accepted draft nodes and (where asked) logprobs, from its rows."""
        if target is None:
            emitted, path = verify_greedy(draft, argmax)
        else:
            emitted, path = verify_sampling(draft, target, draft.probs, request.generator or self.generator)
        if request.params.logprobs is None:
            return emitted, path, None
        rows = [0] + [1 + node for node in path]  # the row each emitted token came from
        return emitted, path, [_logprobs(logits[row], token, request.params.logprobs)
                               for row, token in zip(rows, emitted)]

    @staticmethod
    def processed_probs(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        params = [r.params for r in requests]
        device = logits.device
        x = logits / torch.tensor([p.temperature for p in params], device=device)[:, None]
        top_k = torch.tensor([p.top_k for p in params], device=device)
        top_p = torch.tensor([p.top_p for p in params], device=device)
        min_p = torch.tensor([p.min_p for p in params], device=device)
        if bool((top_k > 0).any()) or bool((top_p < 1).any()):
            sorted_x, order = x.sort(dim=-1, descending=True)
            vocab = x.shape[-1]
            ranks = torch.arange(vocab, device=device)[None, :]
            remove = ranks >= torch.where(top_k > 0, top_k, vocab)[:, None]
            sorted_probs = sorted_x.masked_fill(remove, float("-inf")).softmax(dim=-1)
            # Drop a token once the tokens before it already cover top_p; the first always stays (a top_p that
            # float32 rounds to 0, such as 1e-50, would otherwise drop every token).
            remove |= (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p[:, None]
            remove[:, 0] = False
            x = x.scatter(-1, order, sorted_x.masked_fill(remove, float("-inf")))
        probs = x.softmax(dim=-1)
        if bool((min_p > 0).any()):
            probs = probs.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
        return probs


def adjusted_logits(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """The logits after each request's logits processing (SamplingParams.adjusts_logits), in vLLM's order:
    bad words and min tokens masked, logit bias added, then repetition, frequency and presence penalties.
    logits: [R, V], row i at the last token of requests[i] (such requests do not speculate, so their history is
    their tokens so far). Rows of requests without any processing are left as they are; so is `logits`."""
    rows = [i for i, r in enumerate(requests) if r.params.adjusts_logits]
    if not rows:
        return logits
    adjusted_requests = [requests[i] for i in rows]
    params = [r.params for r in adjusted_requests]
    vocab, device = logits.shape[-1], logits.device
    x = logits[rows]
    masked_rows, masked_tokens = [], []
    bias_rows, bias_tokens, bias_values = [], [], []
    for j, request in enumerate(adjusted_requests):
        masked = _bad_word_ends(request)
        if request.num_output_tokens < request.params.min_tokens:
            masked += [t for t in request.stop_token_ids if t < vocab]
        masked_rows += [j] * len(masked)
        masked_tokens += masked
        bias = request.params.logit_bias or {}
        bias_rows += [j] * len(bias)
        bias_tokens += bias.keys()
        bias_values += bias.values()
    x[masked_rows, masked_tokens] = float("-inf")
    x.index_put_((torch.tensor(bias_rows, dtype=torch.long, device=device),
                  torch.tensor(bias_tokens, dtype=torch.long, device=device)),
                 torch.tensor(bias_values, dtype=x.dtype, device=device), accumulate=True)
    # Token counts over a padded [R, V + 1] table: the pad token id V falls in the extra column, dropped after.
    prompt_counts = _token_counts([r.prompt_token_ids for r in adjusted_requests], vocab, device)
    output_counts = _token_counts([r.output_token_ids for r in adjusted_requests], vocab, device)
    repetition = torch.tensor([p.repetition_penalty for p in params], dtype=x.dtype, device=device)[:, None]
    penalty = torch.where((prompt_counts + output_counts) > 0, repetition, 1.0)
    x = torch.where(x > 0, x / penalty, x * penalty)
    x -= torch.tensor([p.frequency_penalty for p in params], dtype=x.dtype, device=device)[:, None] * output_counts
    x -= torch.tensor([p.presence_penalty for p in params], dtype=x.dtype, device=device)[:, None] * (
        output_counts > 0)
    if len(rows) == len(requests):
        return x
    logits = logits.clone()
    logits[rows] = x
    return logits


def grammar_masked_logits(adjusted: torch.Tensor, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """`adjusted` with the tokens each constrained request's grammar forbids at -inf: one bitmask for all of
    their rows. Row i is at the last token of requests[i] (constrained requests do not speculate). `logits` (the
    model's, which `adjusted` may be) is left as it is."""
    rows = [i for i, r in enumerate(requests) if r.grammar is not None]
    if not rows:
        return adjusted
    backend = requests[rows[0]].grammar.backend
    bitmask = backend.allocate_bitmask(len(rows))
    for j, i in enumerate(rows):
        request = requests[i]
        try:  # what fails here is this request's alone
            request.grammar.fill_bitmask(request.output_token_ids, bitmask, j)
        except Exception as error:
            raise RequestFault([request.request_id], error) from error
    if adjusted is logits:
        adjusted = logits.clone()
    masked = adjusted[rows]
    backend.apply_bitmask(masked, bitmask)
    adjusted[rows] = masked
    return adjusted


def _bad_word_ends(request: Request) -> list[int]:
    """The last token of each bad word whose other tokens end the generated tokens (vLLM's rule)."""
    output = request.output_token_ids
    return [word[-1] for word in request.bad_words_token_ids
            if len(word) <= len(output) + 1 and output[len(output) - len(word) + 1:] == word[:-1]]


def _token_counts(sequences: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(sequences), vocab] float32: how often each token occurs in each sequence."""
    longest = max(map(len, sequences))
    ids = torch.tensor([s + [vocab] * (longest - len(s)) for s in sequences], dtype=torch.long, device=device)
    counts = torch.zeros(len(sequences), vocab + 1, device=device)
    counts.scatter_add_(1, ids, torch.ones(ids.shape, device=device))
    return counts[:, :vocab]


def _logprobs(logits: torch.Tensor, token: int, num_top: int) -> tuple[float, dict[int, Logprob]]:
    """The sampled token's logprob under the model's raw distribution, and the top-N beside it."""
    logprobs = logits.log_softmax(dim=-1)
    chosen = float(logprobs[token])
    top: dict[int, Logprob] = {}
    if num_top:
        values, ids = logprobs.topk(num_top)
        top = {int(t): Logprob(float(v), rank + 1) for rank, (v, t) in enumerate(zip(values, ids))}
    if token not in top:
        top[token] = Logprob(chosen, int((logprobs > chosen).sum()) + 1)
    return chosen, top
