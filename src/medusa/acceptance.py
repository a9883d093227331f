"""Acceptance schemes: which of the tree's candidate paths the base model agrees with.

Each scheme turns the base model's logits at every tree node into one accepted path, how many tokens
beyond the root it keeps, and the base model's own next token after it. Everything stays on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from medusa.tree import Tree


@dataclass
class Verdict:
    path: torch.Tensor  # [max_depth + 1] node ids from the root, padded
    accepted: torch.Tensor  # scalar long: tokens accepted beyond the root
    next_token: torch.Tensor  # scalar long: the base model's token after the last accepted node


class AcceptanceScheme(Protocol):
    name: str

    def first_token(self, logits: torch.Tensor) -> torch.Tensor:
        """The base model's token from ``logits [vocab]``: the root of the next tree."""

    def accept(self, tree: Tree, tree_tokens: torch.Tensor, logits: torch.Tensor) -> Verdict:
        """Choose a path given the tree's tokens ``[size]`` and the base logits at each node ``[size, vocab]``."""


class GreedyAcceptance:
    """Keep the longest path whose every token is the base model's argmax at its parent: lossless greedy."""

    name = "greedy"

    def first_token(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)

    def accept(self, tree: Tree, tree_tokens: torch.Tensor, logits: torch.Tensor) -> Verdict:
        predicted = logits.argmax(-1)  # [size]
        candidates = tree_tokens[tree.retrieve_paths]  # [leaves, depth + 1]
        parent_prediction = predicted[tree.retrieve_paths]
        matches = (candidates[:, 1:] == parent_prediction[:, :-1]) & tree.retrieve_valid[:, 1:]
        accepted_per_path = matches.long().cumprod(dim=1).sum(dim=1)  # [leaves]
        best = accepted_per_path.argmax().view(1)  # indexing by 1-element tensors avoids host syncs
        path = tree.retrieve_paths.index_select(0, best)[0]
        accepted = accepted_per_path.index_select(0, best)[0]
        next_token = predicted.index_select(0, path.index_select(0, accepted.view(1)))[0]
        return Verdict(path=path, accepted=accepted, next_token=next_token)


def make_acceptance(name: str) -> AcceptanceScheme:
    schemes = {"greedy": GreedyAcceptance}
    if name not in schemes:
        from medusa.errors import MedusaError

        raise MedusaError(f"unknown acceptance scheme {name!r}; choose one of {', '.join(schemes)}")
    return schemes[name]()
