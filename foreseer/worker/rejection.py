"""Verification of a draft tree (a chain is the simplest tree) against the target model's distributions.

Greedy: from the root, follow the child whose token is the target's argmax; where none is, the target's
token ends the step. Sampling: multi-step speculative sampling (SpecInfer, Miao et al. 2024; for a chain,
Leviathan et al. 2023 and Chen et al. 2023): at each node the children are tried in turn; child c, drawn
from draft distribution q, is accepted with probability min(1, p(c) / q(c)); a rejection replaces p by the
normalised residual max(0, p - q) before the next child, and if all are rejected one token is drawn from
what is left. The emitted tokens then follow the target distribution exactly, whatever the draft.
"""

from __future__ import annotations

import torch

from foreseer.core.draft_tree import DraftTree


def verify_greedy(tree: DraftTree, target_argmax: list[int]) -> tuple[list[int], list[int]]:
    """target_argmax: the target's token at the root and at each node (len(tree) + 1 entries).

    Returns the emitted tokens (accepted nodes' tokens, then the target's own) and the accepted nodes.
    """
    emitted, path, node = [], [], -1
    while True:
        token = target_argmax[node + 1]
        emitted.append(token)
        node = next((c for c in tree.children(node) if tree.token_ids[c] == token), None)
        if node is None:
            return emitted, path
        path.append(node)


def verify_sampling(
    tree: DraftTree, target_probs: torch.Tensor, draft_probs: torch.Tensor | None, generator: torch.Generator | None,
) -> tuple[list[int], list[int]]:
    """target_probs: [len(tree) + 1, V] at the root and each node; draft_probs: [len(tree), V], the
    distribution each node's token was drawn from, or None for deterministic drafts (q = one-hot).

    Returns the emitted tokens and the accepted nodes, as `verify_greedy` does.
    """
    emitted, path, node = [], [], -1
    while True:
        p = target_probs[node + 1]
        accepted = None
        for child in tree.children(node):
            token = tree.token_ids[child]
            q_token = 1.0 if draft_probs is None else float(draft_probs[child, token])
            if float(torch.rand((), generator=generator)) * q_token * float(p.sum()) < float(p[token]):
                accepted = child
                break
            if draft_probs is None:
                residual = p.clone()
                residual[token] = 0.0
            else:
                residual = (p / p.sum() - draft_probs[child]).clamp_min(0.0)
            # Nothing left (p was all on the rejected side): the rejection was rounding, keep p.
            p = residual if float(residual.sum()) > 0.0 else p
        if accepted is None:
            emitted.append(int(torch.multinomial(p, 1, generator=generator)[0]))
            return emitted, path
        emitted.append(tree.token_ids[accepted])
        path.append(accepted)
        node = accepted
