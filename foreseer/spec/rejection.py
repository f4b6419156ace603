"""Verification of a draft chain against the target model's distributions at each of its positions.

Greedy: keep drafts while they equal the target's argmax, then the target's own token. Sampling:
speculative sampling (Leviathan et al. 2023; Chen et al. 2023): draft token d at position i is kept with
probability min(1, p_i(d) / q_i(d)); the first rejected one is replaced by a sample of the residual
max(0, p_i - q_i), and if all are kept one more token comes from p_k. The emitted tokens then follow the
target distribution exactly, whatever the draft.
"""

from __future__ import annotations

import torch


def accept_greedy(draft: list[int], target_argmax: list[int]) -> list[int]:
    """target_argmax has len(draft) + 1 entries; returns the accepted drafts followed by one target token."""
    emitted = []
    for drafted, target in zip(draft, target_argmax):
        emitted.append(target)
        if drafted != target:
            return emitted
    emitted.append(target_argmax[len(draft)])
    return emitted


def rejection_sample(
    target_probs: torch.Tensor, draft: list[int], draft_probs: torch.Tensor | None,
    generator: torch.Generator | None,
) -> list[int]:
    """target_probs: [k + 1, V]; draft_probs: [k, V], or None for a deterministic draft (q = one-hot).

    Returns the accepted drafts followed by one token drawn from the target (residual) distribution.
    """
    emitted = []
    for i, drafted in enumerate(draft):
        p = target_probs[i]
        q_drafted = 1.0 if draft_probs is None else float(draft_probs[i, drafted])
        if float(torch.rand((), generator=generator)) * q_drafted < float(p[drafted]):
            emitted.append(drafted)
            continue
        if draft_probs is None:
            residual = p.clone()
            residual[drafted] = 0.0
        else:
            residual = (p - draft_probs[i]).clamp_min(0.0)
            if float(residual.sum()) <= 0.0:  # p == q up to rounding: any rejection was rounding too
                residual = p
        emitted.append(int(torch.multinomial(residual, 1, generator=generator)[0]))
        return emitted
    emitted.append(int(torch.multinomial(target_probs[len(draft)], 1, generator=generator)[0]))
    return emitted
