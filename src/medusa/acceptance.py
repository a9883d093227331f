"""Acceptance schemes: which of the tree's candidate paths the base model agrees with.

Each scheme turns the base model's logits at every tree node into one accepted path, how many tokens
beyond the root it keeps, and the base model's own next token after it. Everything stays on the device:
loops run over tree depth and sibling rank, never over the vocabulary, and never read a value back.

- ``greedy`` (temperature 0): the longest path that matches the base model's argmax. Lossless.
- ``rejection``: multi-candidate rejection sampling on the tree. Lossless: the answer follows exactly
  the base model's sampling distribution (temperature, top-k, top-p). See docs/sampling.md.
- ``typical``: the paper's typical acceptance (section 2.3.1). Faster at high temperature, not lossless.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from medusa.errors import MedusaError
from medusa.sampling import SamplingParams, sample
from medusa.tree import Tree

SCHEMES = ("auto", "greedy", "typical", "rejection")
DEFAULT_TYPICAL_EPS = 0.09  # the paper's hard threshold epsilon
DEFAULT_TYPICAL_DELTA = 0.3  # the paper's entropy-scaled threshold delta, sqrt(epsilon)


@dataclass
class Verdict:
    path: torch.Tensor  # [max_depth + 1] node ids from the root, padded
    accepted: torch.Tensor  # scalar long: tokens accepted beyond the root
    next_token: torch.Tensor  # scalar long: the base model's token after the last accepted node


class AcceptanceScheme(Protocol):
    name: str

    def first_token(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The base model's token from ``logits [vocab]``: the root of the next tree."""

    def accept(
        self, tree: Tree, tree_tokens: torch.Tensor, logits: torch.Tensor, generator: torch.Generator | None = None
    ) -> Verdict:
        """Choose a path given the tree's tokens ``[size]`` and the base logits at each node ``[size, vocab]``."""


@dataclass(frozen=True)
class GreedyAcceptance:
    """Keep the longest path whose every token is the base model's argmax at its parent: lossless greedy."""

    name = "greedy"

    def first_token(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return logits.argmax(-1)

    def accept(
        self, tree: Tree, tree_tokens: torch.Tensor, logits: torch.Tensor, generator: torch.Generator | None = None
    ) -> Verdict:
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


@dataclass(frozen=True)
class TypicalAcceptance:
    """The paper's typical acceptance: keep candidate x when ``p(x) > min(eps, delta * exp(-H(p)))``.

    ``p`` is the processed (tempered, top-k, top-p) base distribution at the candidate's parent and H
    its entropy: a confident base model demands a likely candidate, an unsure one accepts many. The root
    is always kept, the longest accepted path wins (ties: the likelier one) and the next token is
    sampled from ``p`` at its last node. NOT lossless: it skews answers towards typical tokens and
    cannot reproduce the base model's sampling distribution; use ``RejectionAcceptance`` for that.
    """

    sampling: SamplingParams
    eps: float = DEFAULT_TYPICAL_EPS
    delta: float = DEFAULT_TYPICAL_DELTA
    name = "typical"

    def __post_init__(self) -> None:
        check_typical(self.eps, self.delta)

    def first_token(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return sample(self.sampling.probabilities(logits), generator)

    def accept(
        self, tree: Tree, tree_tokens: torch.Tensor, logits: torch.Tensor, generator: torch.Generator | None = None
    ) -> Verdict:
        probs = self.sampling.probabilities(logits)  # [size, vocab]
        entropy = -torch.special.xlogy(probs, probs).sum(-1)  # [size]
        threshold = torch.clamp(self.delta * torch.exp(-entropy), max=self.eps)  # [size]
        parents = tree.parents.clamp_min(0)  # the root's -1 is replaced below
        chance = probs[parents, tree_tokens]  # [size]: p at the parent of each node's own token
        # The root is always kept; an OR with a device mask, as writing a Python True would copy from the
        # host, which a CUDA graph cannot capture.
        kept = (chance > threshold[parents]) | (tree.parents < 0)
        on_path = kept[tree.retrieve_paths][:, 1:] & tree.retrieve_valid[:, 1:]  # [leaves, depth]
        accepted_per_path = on_path.long().cumprod(dim=1).sum(dim=1)  # [leaves]
        log_chance = chance.clamp_min(torch.finfo(chance.dtype).tiny).log()[tree.retrieve_paths][:, 1:]
        likelihood = (log_chance * on_path.long().cumprod(dim=1)).sum(dim=1)  # of the accepted prefix
        longest = accepted_per_path == accepted_per_path.max()
        best = torch.where(longest, likelihood, -math.inf).argmax().view(1)
        path = tree.retrieve_paths.index_select(0, best)[0]
        accepted = accepted_per_path.index_select(0, best)[0]
        last = path.index_select(0, accepted.view(1))
        next_token = sample(probs.index_select(0, last), generator)[0]
        return Verdict(path=path, accepted=accepted, next_token=next_token)


@dataclass(frozen=True)
class RejectionAcceptance:
    """Lossless speculative sampling on a tree of deterministic candidates.

    At an accepted node with target distribution p the children are tried in rank order: child token x
    is accepted with probability ``p_res(x)``, where ``p_res`` starts as p and loses each rejected
    token (zeroed, renormalised). When every child is rejected (or there is none) the next token is
    drawn from ``p_res``. Each emitted token therefore has exactly the distribution p given the ones
    before it; the proof is in docs/sampling.md. The candidates are the heads' top-k, a deterministic
    proposal, so min(1, p/q) has q one-hot on each candidate and the heads' probabilities do not enter.
    The lookup branch's tokens (copied from earlier text) are deterministic too, and are simply one more
    sibling, tried after the heads' (a token both propose counts once).
    """

    sampling: SamplingParams
    name = "rejection"

    def first_token(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return sample(self.sampling.probabilities(logits), generator)

    def accept(
        self, tree: Tree, tree_tokens: torch.Tensor, logits: torch.Tensor, generator: torch.Generator | None = None
    ) -> Verdict:
        path, accepted, next_token = self.sample_paths(tree, tree_tokens, logits, generator, samples=1)
        return Verdict(path=path[0], accepted=accepted[0], next_token=next_token[0])

    def sample_paths(
        self,
        tree: Tree,
        tree_tokens: torch.Tensor,
        logits: torch.Tensor,
        generator: torch.Generator | None,
        samples: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``samples`` independent verdicts on the same tree: ``(paths [samples, depth + 1], accepted
        [samples], next tokens [samples])``. The decoder asks for one; tests ask for thousands at once."""
        probs = self.sampling.probabilities(logits)  # [size, vocab]
        children = children_by_rank(tree)  # [size, max_children], -1 where a rank has no child
        device = probs.device
        uniforms = torch.rand(samples, tree.max_depth, tree.max_children, generator=generator, device=device)
        node = torch.zeros(samples, dtype=torch.long, device=device)
        walking = torch.ones(samples, dtype=torch.bool, device=device)
        accepted = torch.zeros(samples, dtype=torch.long, device=device)
        path = [node]
        for depth in range(tree.max_depth):
            row = probs.index_select(0, node)  # [samples, vocab]: p at each sample's current node
            kids, exists, p_kids = self._children(children, tree_tokens, row, node)
            chance = self.child_chances(p_kids, row.sum(-1, keepdim=True))
            hit = (uniforms[:, depth] < chance) & exists & walking[:, None]  # [samples, topk]
            found = hit.any(dim=1)
            first = hit.long().argmax(dim=1, keepdim=True)  # the first accepted rank: siblings go in order
            node = torch.where(found, kids.gather(1, first)[:, 0], node)
            walking = walking & found
            accepted = accepted + found.long()
            path.append(torch.where(found, node, 0))
        # Every child of the last accepted node was tried and rejected (a leaf has none).
        row = probs.index_select(0, node)
        kids, exists, _ = self._children(children, tree_tokens, row, node)
        next_token = sample(self.residual(row, tree_tokens[kids], exists), generator)
        return torch.stack(path, dim=1), accepted, next_token

    def _children(
        self, children: torch.Tensor, tree_tokens: torch.Tensor, row: torch.Tensor, node: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For each sample's node: its children ``[samples, topk]``, which exist, and p (``row``) of their tokens.

        A token repeated among siblings (possible with hand-made proposals, not with a head's top-k)
        counts once: after its first rejection its residual probability is 0.
        """
        kids = children.index_select(0, node)
        exists = kids >= 0
        kids = kids.clamp_min(0)
        tokens = tree_tokens[kids]
        ranks = torch.arange(kids.shape[1], device=kids.device)
        earlier = (tokens[:, :, None] == tokens[:, None, :]) & exists[:, None, :] & (ranks[None, :] < ranks[:, None])
        first_of_token = ~earlier.any(dim=2)
        p_kids = row.gather(1, tokens) * (exists & first_of_token)
        return kids, exists, p_kids

    def child_chances(self, p_kids: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        """Probability of accepting each child ``[samples, topk]`` once every earlier sibling is rejected:
        ``p(x_j) / (1 - p(x_1) - ... - p(x_{j-1}))``, which is ``p_res(x_j)``."""
        remaining = total - (p_kids.cumsum(dim=1) - p_kids)
        return (p_kids / remaining.clamp_min(torch.finfo(p_kids.dtype).tiny)).clamp(max=1.0)

    def residual(self, row: torch.Tensor, rejected_tokens: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        """``p_res``: ``row [samples, vocab]`` without the rejected tokens (unnormalised; sampling does not care)."""
        hits = torch.zeros_like(row).scatter_add_(1, rejected_tokens, rejected.to(row.dtype))
        residual = row.masked_fill(hits > 0, 0.0)
        # In exact arithmetic some mass is left; rounding may leave none after a near-certain rejection.
        return torch.where(residual.sum(-1, keepdim=True) > 0, residual, row)


def children_by_rank(tree: Tree) -> torch.Tensor:
    """``[size, max_children]`` long: the child of each node at each sibling rank, -1 where there is none.

    Siblings are tried in this order: the heads' top-k by rank, then the lookup child.
    """
    size, width = tree.size, tree.max_children
    device = tree.parents.device
    table = torch.full((size * width,), -1, dtype=torch.long, device=device)
    if size > 1:
        table.scatter_(0, tree.parents[1:] * width + tree.sibling_rank[1:], torch.arange(1, size, device=device))
    return table.view(size, width)


def check_typical(eps: float, delta: float) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise MedusaError(f"typical acceptance eps must lie in (0, 1) (default {DEFAULT_TYPICAL_EPS}), got {eps!r}")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not math.isfinite(delta) or delta < 0:
        raise MedusaError(
            f"typical acceptance delta must be a finite number >= 0 (default {DEFAULT_TYPICAL_DELTA}), got {delta!r}"
        )


def make_acceptance(
    name: str = "auto",
    sampling: SamplingParams | None = None,
    typical_eps: float = DEFAULT_TYPICAL_EPS,
    typical_delta: float = DEFAULT_TYPICAL_DELTA,
) -> AcceptanceScheme:
    """The scheme for a name and sampling settings.

    Temperature 0 runs greedy whatever the name: it is the limit of both sampling schemes (the tempered
    distribution becomes one-hot on the argmax). ``auto`` is greedy at temperature 0, rejection above.
    Asking for ``greedy`` with a temperature above 0 is refused, as it would silently ignore the temperature.
    """
    sampling = sampling or SamplingParams()
    if name not in SCHEMES:
        raise MedusaError(f"unknown acceptance scheme {name!r}; choose one of {', '.join(SCHEMES)}")
    check_typical(typical_eps, typical_delta)
    if sampling.greedy:
        return GreedyAcceptance()
    if name == "greedy":
        raise MedusaError(
            f"acceptance 'greedy' needs temperature 0, got temperature {sampling.temperature}; "
            "use 'rejection' (lossless sampling), 'typical' or 'auto', or set temperature 0"
        )
    if name == "typical":
        return TypicalAcceptance(sampling, typical_eps, typical_delta)
    return RejectionAcceptance(sampling)
