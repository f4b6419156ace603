"""Medusa-1 drafting: each head reads the target's final hidden state of a request's last token and, through
the target's own lm_head, guesses the token one position further; their top choices form a token tree."""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING

import torch

from foreseer.config import SpeculativeConfig
from foreseer.core.draft_tree import DraftTree
from foreseer.spec.medusa import MedusaHeads, shipped_heads_dir
from foreseer.spec.proposer import DraftProposer

if TYPE_CHECKING:
    from foreseer.core.block_manager import BlockManager
    from foreseer.core.request import Request
    from foreseer.worker.model_runner import ModelRunner


def tree_choices(width: int, depth: int) -> list[tuple[int, ...]]:
    """Paths of top-k ranks (one per depth) whose product of (rank + 1) is at most `width`, parents first:
    the likely paths of a Medusa tree (width 1: the chain of top-1 guesses)."""
    choices = []
    for length in range(1, depth + 1):
        for ranks in itertools.product(range(width), repeat=length):
            if math.prod(r + 1 for r in ranks) <= width:
                choices.append(ranks)
    return choices


class MedusaProposer(DraftProposer):
    name = "medusa"
    needs_hidden_states = True

    def __init__(self, config: SpeculativeConfig, heads: MedusaHeads, lm_head) -> None:
        self.heads = heads
        self.lm_head = lm_head  # hidden [N, H] -> logits [N, V]
        self.width = config.tree_width
        self.choices = tree_choices(config.tree_width, min(config.num_speculative_tokens, heads.num_heads))

    @classmethod
    def create(cls, config: SpeculativeConfig, runner: ModelRunner, block_manager: BlockManager) -> MedusaProposer:
        directory = config.medusa_heads or shipped_heads_dir(runner.config.model)
        if directory is None:
            raise ValueError(f"no Medusa heads ship for {runner.config.model!r}; give speculative_config.medusa_heads "
                             "(train them with `foreseer spec train-medusa`)")
        heads = MedusaHeads.load(directory, runner.model_config.hidden_size, runner.dtype, runner.device)
        return cls(config, heads, runner.model.compute_logits)

    @torch.inference_mode()
    def propose(self, requests: list[Request], max_lengths: list[int], hidden_states) -> list[DraftTree]:
        known = [i for i, h in enumerate(hidden_states) if h is not None and max_lengths[i] > 0]
        trees = [DraftTree() for _ in requests]
        if not known:
            return trees
        # Only the heads of the positions asked for: each head's guess costs an lm_head, as much as a fifth of a step.
        depth = min(max(max_lengths[i] for i in known), self.heads.num_heads)
        guesses = self.heads(torch.stack([hidden_states[i] for i in known]), depth)  # [depth, N, H]
        logits = self.lm_head(guesses.flatten(0, 1)).view(guesses.shape[0], len(known), -1)
        top = logits.topk(self.width, dim=-1).indices.tolist()  # [heads][N][width]
        for n, i in enumerate(known):
            node_of: dict[tuple[int, ...], int] = {}
            tree = trees[i]
            for ranks in self.choices:
                if len(ranks) > max_lengths[i]:
                    continue
                node_of[ranks] = len(tree)
                tree.token_ids.append(top[len(ranks) - 1][n][ranks[-1]])
                tree.parents.append(node_of[ranks[:-1]] if len(ranks) > 1 else -1)
        return trees
