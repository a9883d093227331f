"""Acceptance schemes: which of the tree's candidate paths the base model agrees with.

Every row of a batch gets one accepted path, how many tokens beyond the root it keeps, and the base
model's own next token after it, by its own scheme: one function (``accept``) serves a batch whose rows
mix schemes and settings, with a leading batch dimension throughout. Everything stays on the device, with
no loop over rows or the vocabulary and no value read back.

- ``greedy`` (temperature 0): the longest path that matches the base model's argmax. Lossless.
- ``rejection``: multi-candidate rejection sampling on the tree. Lossless: the answer follows exactly
  the base model's sampling distribution (temperature, top-k, top-p). See docs/sampling.md.
- ``typical``: the paper's typical acceptance (section 2.3.1). Faster at high temperature, not lossless.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from medusa.errors import MedusaError
from medusa.sampling import GREEDY, REJECTION, TYPICAL, RowSampling, SamplingParams, perturbed_argmax
from medusa.tree import Tree

SCHEMES = ("auto", "greedy", "typical", "rejection")
DEFAULT_TYPICAL_EPS = 0.09  # the paper's hard threshold epsilon
DEFAULT_TYPICAL_DELTA = 0.3  # the paper's entropy-scaled threshold delta, sqrt(epsilon)


@dataclass
class Verdict:
    """Every row's verdict on its tree (the glossary: the *root* is the token the previous step chose, the
    *accepted* guesses are the tree tokens kept after it, the *next token* is the base model's own token after
    the last accepted node, which becomes the next tree's root)."""

    path: torch.Tensor  # [rows, max_depth + 1] node ids from the root, padded with 0 past the accepted ones
    accepted: torch.Tensor  # [rows] long: guesses accepted beyond the root
    next_token: torch.Tensor  # [rows] long


@dataclass(frozen=True)
class StepKind:
    """What a step's rows ask of acceptance, known on the host; each kind is its own captured graph, so a
    greedy batch never pays for sampling, nor a batch without top-k/top-p for the vocabulary sort."""

    sample: bool = False  # some row samples (rejection or typical)
    filtered: bool = False  # some row has top-k or top-p
    typical: bool = False  # some row uses typical acceptance
    logprobs: int = -1  # -1: no log-probabilities; k >= 0: each token's and the top k alternatives'

    @classmethod
    def of(cls, schemes: list[AcceptanceScheme], logprobs: int = -1) -> StepKind:
        sampling = [s.sampling for s in schemes if s.sampling is not None]
        return cls(
            sample=bool(sampling),
            filtered=any(p.top_k > 0 or p.top_p < 1 for p in sampling),
            typical=any(s.scheme_id == TYPICAL for s in schemes),
            logprobs=logprobs,
        )


@dataclass(frozen=True)
class GreedyAcceptance:
    """Keep the longest path whose every token is the base model's argmax at its parent: lossless greedy."""

    name = "greedy"
    scheme_id = GREEDY
    sampling = None
    eps = DEFAULT_TYPICAL_EPS
    delta = DEFAULT_TYPICAL_DELTA


@dataclass(frozen=True)
class RejectionAcceptance:
    """Lossless speculative sampling on a tree of deterministic candidates.

    Each position's token is sampled once, by the Gumbel-max trick with noise fixed by the row's seed and
    the position (``medusa.sampling``), and a candidate is accepted exactly when it equals that sample. At a
    node with target distribution p the children are thereby accepted with probability ``p(x_j)`` each,
    and when none is, the next token follows p without them: the same law as trying the children in rank
    order with ``p_res`` (the proof is in docs/sampling.md). The heads' probabilities never enter, as the
    candidates are a deterministic proposal; the lookup branch's tokens are one more sibling.
    """

    sampling: SamplingParams
    name = "rejection"
    scheme_id = REJECTION
    eps = DEFAULT_TYPICAL_EPS
    delta = DEFAULT_TYPICAL_DELTA


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
    scheme_id = TYPICAL

    def __post_init__(self) -> None:
        check_typical(self.eps, self.delta)


AcceptanceScheme = GreedyAcceptance | RejectionAcceptance | TypicalAcceptance


def target_tokens(
    logits: torch.Tensor, rows: RowSampling, positions: torch.Tensor, depths: torch.Tensor, kind: StepKind
) -> torch.Tensor:
    """Each node's sampled next token ``[rows, nodes]``: the argmax on greedy rows, else the argmax of the
    processed logits plus the Gumbel noise of the position the token would take.

    ``logits [rows, nodes, vocab]``; ``positions [rows, max_depth + 1]``: the position a token after a node
    of each depth takes; ``depths [nodes]``.
    """
    if not kind.sample:
        return logits.argmax(-1)
    processed = rows.process(logits, kind.filtered)  # [rows, nodes, vocab]
    return perturbed_argmax(processed, rows.scheme != GREEDY, rows.seed, positions, depths)


def verify(tree: Tree, tree_tokens: torch.Tensor, targets: torch.Tensor) -> Verdict:
    """The longest path whose every token is its parent's target, per row (the first of equals).

    ``tree_tokens [rows, size]``, ``targets [rows, size]``. Lossless for greedy targets and for sampled ones.
    """
    candidates = tree_tokens[:, tree.retrieve_paths]  # [rows, leaves, depth + 1]
    parent_target = targets[:, tree.retrieve_paths]
    matches = (candidates[:, :, 1:] == parent_target[:, :, :-1]) & tree.retrieve_valid[None, :, 1:]
    accepted_per_path = matches.long().cumprod(dim=2).sum(dim=2)  # [rows, leaves]
    best = accepted_per_path.argmax(dim=1)  # [rows]
    return _verdict(tree, targets, best, accepted_per_path)


def _verdict(tree: Tree, targets: torch.Tensor, best: torch.Tensor, accepted_per_path: torch.Tensor) -> Verdict:
    path = tree.retrieve_paths.index_select(0, best)  # [rows, depth + 1]
    accepted = accepted_per_path.gather(1, best[:, None])[:, 0]
    last = path.gather(1, accepted[:, None])  # [rows, 1]
    next_token = targets.gather(1, last)[:, 0]
    valid = torch.arange(path.shape[1], device=path.device)[None, :] <= accepted[:, None]
    return Verdict(path=path * valid, accepted=accepted, next_token=next_token)


def typical_verdict(
    tree: Tree,
    tree_tokens: torch.Tensor,
    logits: torch.Tensor,
    rows: RowSampling,
    targets: torch.Tensor,
    filtered: bool,
) -> Verdict:
    """Typical acceptance per row: the longest path of typical tokens, ties to the likelier; the next token is
    the node's sampled target (a sample from p)."""
    probs = rows.process(logits, filtered).softmax(-1)  # [rows, size, vocab]
    entropy = -torch.special.xlogy(probs, probs).sum(-1)  # [rows, size]
    threshold = torch.minimum(rows.typical_delta[:, None] * torch.exp(-entropy), rows.typical_eps[:, None])
    parents = tree.parents.clamp_min(0)  # the root's -1 is replaced below
    chance = probs[:, parents].gather(2, tree_tokens[:, :, None])[:, :, 0]  # [rows, size]: p of each node's token
    # The root is always kept; an OR with a device mask, as writing a Python True would copy from the host.
    kept = (chance > threshold[:, parents]) | (tree.parents < 0)[None]
    on_path = kept[:, tree.retrieve_paths][:, :, 1:] & tree.retrieve_valid[None, :, 1:]  # [rows, leaves, depth]
    prefix = on_path.long().cumprod(dim=2)
    accepted_per_path = prefix.sum(dim=2)  # [rows, leaves]
    log_chance = chance.clamp_min(torch.finfo(chance.dtype).tiny).log()[:, tree.retrieve_paths][:, :, 1:]
    likelihood = (log_chance * prefix).sum(dim=2)
    longest = accepted_per_path == accepted_per_path.max(dim=1, keepdim=True).values
    best = torch.where(longest, likelihood, -math.inf).argmax(dim=1)
    return _verdict(tree, targets, best, accepted_per_path)


def accept(
    tree: Tree,
    tree_tokens: torch.Tensor,
    logits: torch.Tensor,
    rows: RowSampling,
    positions: torch.Tensor,
    kind: StepKind,
) -> Verdict:
    """Every row's verdict by its own scheme: greedy and rejection rows verify against their targets,
    typical rows by their thresholds. ``positions [rows, depth + 1]`` as ``target_tokens`` takes them."""
    targets = target_tokens(logits, rows, positions, tree.depths, kind)
    verdict = verify(tree, tree_tokens, targets)
    if not kind.typical:
        return verdict
    typical = typical_verdict(tree, tree_tokens, logits, rows, targets, kind.filtered)
    is_typical = rows.scheme == TYPICAL
    return Verdict(
        path=torch.where(is_typical[:, None], typical.path, verdict.path),
        accepted=torch.where(is_typical, typical.accepted, verdict.accepted),
        next_token=torch.where(is_typical, typical.next_token, verdict.next_token),
    )


def token_logprobs(
    logits: torch.Tensor, nodes: torch.Tensor, tokens: torch.Tensor, top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The base model's own log-probabilities (no temperature or filters) of ``tokens`` chosen at ``nodes``.

    ``logits [rows, size, vocab]``, ``nodes [rows, n]``, ``tokens [rows, n]`` -> ``(logprob [rows, n],
    top ids [rows, n, top], top logprobs [rows, n, top])``.
    """
    picked = logits.gather(1, nodes[:, :, None].expand(-1, -1, logits.shape[-1])).float().log_softmax(-1)
    chosen = picked.gather(2, tokens[:, :, None])[:, :, 0]
    best = picked.topk(top, dim=-1) if top > 0 else None
    if best is None:
        empty = torch.zeros(*tokens.shape, 0, device=logits.device)
        return chosen, empty.long(), empty
    return chosen, best.indices, best.values


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
