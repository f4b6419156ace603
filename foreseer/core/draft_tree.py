"""Draft tokens to verify after a request's last token: a chain, or a token tree (SpecInfer, Medusa)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DraftTree:
    """Nodes in topological order: parents[i] is the node that node i follows, -1 for the request's last
    token (the root). A chain has parents [-1, 0, 1, ...]; siblings are alternatives for the same position."""

    token_ids: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    # [n, V]: the distribution each node's token was sampled from; None for deterministic drafts
    probs: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.parents):
            raise ValueError("a draft tree needs one parent per token")
        if self.probs is not None and len(self.probs) != len(self.token_ids):
            raise ValueError("a draft tree needs one distribution per token, or none")
        if any(not -1 <= p < i for i, p in enumerate(self.parents)):
            raise ValueError("draft tree nodes must come after their parents")

    @classmethod
    def chain(cls, token_ids: list[int]) -> DraftTree:
        return cls(list(token_ids), list(range(-1, len(token_ids) - 1)))

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def is_chain(self) -> bool:
        return self.parents == list(range(-1, len(self) - 1))

    def depths(self) -> list[int]:
        """Depth of each node: 1 for the root's children."""
        depths: list[int] = []
        for parent in self.parents:
            depths.append(1 if parent < 0 else depths[parent] + 1)
        return depths

    def children(self, node: int) -> list[int]:
        """Children of `node` (-1: the root), in order."""
        return [i for i, p in enumerate(self.parents) if p == node]

    def subtree(self, nodes: list[int]) -> DraftTree:
        """The tree of the given nodes (each one's parent among them, or the root), renumbered in order."""
        nodes = sorted(nodes)
        index = {node: i for i, node in enumerate(nodes)}
        return DraftTree([self.token_ids[n] for n in nodes],
                         [-1 if self.parents[n] < 0 else index[self.parents[n]] for n in nodes],
                         None if self.probs is None else self.probs[nodes])

    def prefix(self, count: int) -> DraftTree:
        """The first `count` nodes: a tree too, since parents come first."""
        return DraftTree(self.token_ids[:count], self.parents[:count],
                         None if self.probs is None else self.probs[:count])

    def attention_mask(self, device: torch.device | None = None) -> torch.Tensor:
        """[n + 1, n + 1] bool over the root and the nodes: each sees the root, its ancestors and itself."""
        n = len(self)
        mask = torch.eye(n + 1, dtype=torch.bool)
        mask[:, 0] = True
        for i, parent in enumerate(self.parents):
            if parent >= 0:
                mask[i + 1] |= mask[parent + 1]
        return mask.to(device)

    @classmethod
    def merge(cls, chains: list[list[int]]) -> DraftTree:
        """A trie of token chains: shared prefixes become shared nodes."""
        tree = cls()
        for chain in chains:
            parent = -1
            for token in chain:
                child = next((c for c in tree.children(parent) if tree.token_ids[c] == token), None)
                if child is None:
                    tree.token_ids.append(token)
                    tree.parents.append(parent)
                    child = len(tree) - 1
                parent = child
        return tree
