"""Token sampling: greedy, temperature, top-k, top-p, min-p, per-request seeds, and top-N logprobs."""

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
        argmax = logits.argmax(dim=-1).tolist()
        random_rows = [i for i, r in enumerate(row_requests) if not r.params.greedy]
        probs = None
        if random_rows:
            probs = self.processed_probs(logits[random_rows], [row_requests[i] for i in random_rows])
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
