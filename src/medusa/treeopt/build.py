"""Trees from a head profile: the greedy construction, and the expected accepted length of any tree.

Three estimates of a tree's expected tokens per step:
- ``paper``: 1 + for each node the product of the heads' accuracies along its path (paper, section
  2.1.2), which assumes the heads are right or wrong independently of each other;
- ``joint``: 1 + for each node how often its whole path was right at once in the profile, which needs no
  such assumption. It is the mean of ``1 + a(t)`` over *all* profiled positions t (``a(t)``: the tree
  tokens a step started at t accepts);
- ``walk`` (the default for reporting and tuning): the mean over the positions decoding actually starts
  steps at, found by replaying the walk t -> t + 1 + a(t) over the profiled answers
  (``medusa.treeopt.walk``). Steps stride over easy text and crawl through hard text, so they sample
  hard positions more often than a uniform mean does: on the greedy answers to 30 unseen prompts the
  replayed walk gave exactly the measured tokens per step, while the uniform mean over the same
  positions was 8-13% higher (docs/tree-optimisation.md). It needs the profile's per-position ranks.

A tree with a lookup branch (``Tree.lookup``) accepts, at each position, the longer of its heads' path
and its lookup chain; only ``walk`` can say how long that is, from the profile's per-position lookup
depths, so a lookup branch needs the walk estimate.

For the first two a node's chance never exceeds its parent's, so adding the most likely frontier node
first yields the best tree of every size for that estimate, and the greedy order of the largest tree
lists the smaller ones as its prefixes. ``walk`` has no per-node chance to be greedy about (which
positions a step starts at depends on the whole tree), so its trees are built in the ``joint`` order:
the node adding the most accepted tokens over all positions is, to first order, also the one adding
the most over the positions the walk visits, and that order keeps the trees of all sizes nested.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from medusa.errors import MedusaError
from medusa.tree import Tree, build_tree_from_accuracies, expected_accept_length
from medusa.treeopt.profile import HeadProfile, joint_chance, paper_chance
from medusa.treeopt.walk import accepted_depths, nested_depths, node_ids, visited_positions, walk_lengths

ESTIMATES = ("walk", "joint", "paper")


def has_walk(profile: HeadProfile) -> bool:
    """Whether the profile keeps the per-position ranks the walk estimate needs (older profiles do not)."""
    return profile.position_ranks is not None and profile.position_ranks.positions > 0


def available_estimates(profile: HeadProfile) -> tuple[str, ...]:
    """The estimates this profile can give: all three, or ``joint`` and ``paper`` without per-position ranks."""
    return ESTIMATES if has_walk(profile) else tuple(name for name in ESTIMATES if name != "walk")


def default_estimate(profile: HeadProfile) -> str:
    """``walk`` when the profile allows it, else ``joint``."""
    return "walk" if has_walk(profile) else "joint"


def _check(profile: HeadProfile, estimate: str) -> None:
    if estimate not in ESTIMATES:
        raise MedusaError(f"unknown estimate {estimate!r}; choose one of {', '.join(ESTIMATES)}")
    if profile.samples == 0:
        raise MedusaError("the profile measured no positions: profile on conversations with longer assistant turns")
    if estimate == "walk" and not has_walk(profile):
        raise MedusaError(
            "the walk estimate needs the per-position ranks that `medusa tree profile` now keeps, and this profile "
            "has none (it was made before them): run `medusa tree profile` again, or use --estimate joint"
        )


def has_lookup(profile: HeadProfile) -> bool:
    """Whether the profile measured the lookup branch at its positions (profiles before it did not)."""
    return has_walk(profile) and profile.position_ranks.lookup is not None


def _lookup_depths(profile: HeadProfile, estimate: str, lookup: int) -> np.ndarray | None:
    """``[positions]``: tokens a lookup chain of ``lookup`` nodes accepts at each profiled position (None: no chain)."""
    if lookup == 0:
        return None
    if estimate != "walk":
        raise MedusaError(f"a tree with a lookup branch can only be estimated by the walk estimate, not {estimate!r}")
    if not has_lookup(profile):
        raise MedusaError(
            "this profile did not measure the lookup branch (it was made before the lookup was profiled): run "
            "`medusa tree profile` again, or leave the lookup branch out"
        )
    return np.minimum(profile.position_ranks.lookup, lookup)


def greedy_order(profile: HeadProfile, max_nodes: int, estimate: str = "joint") -> list[tuple[tuple[int, ...], float]]:
    """The first ``max_nodes - 1`` non-root nodes in the order the greedy construction adds them, with their chances.

    With ``joint``, paths never seen right in the profile (chance 0) come last, in the paper's order.
    ``walk`` uses the ``joint`` order and chances (see the module's docstring).
    """
    _check(profile, estimate)
    if estimate == "walk":
        estimate = "joint"
    if max_nodes < 1:
        raise MedusaError(f"a tree has at least 1 node (the root), got {max_nodes}")
    wanted = max_nodes - 1
    if estimate == "paper":
        return [(tuple(p), paper_chance(profile, p)) for p in build_tree_from_accuracies(profile.accuracy, max_nodes)]
    seen = sorted(
        ((path, count) for path, count in profile.path_counts.items() if count > 0),
        key=lambda item: (-item[1], len(item[0]), item[0]),  # a path never precedes its prefix
    )[:wanted]
    order = [(path, count / profile.samples) for path, count in seen]
    chosen = {path for path, _ in order}
    for path in build_tree_from_accuracies(profile.accuracy, max_nodes + len(chosen)):
        if len(order) >= wanted:
            break
        if tuple(path) not in chosen:
            chosen.add(tuple(path))
            order.append((tuple(path), 0.0))
    return order


def build_tree(profile: HeadProfile, nodes: int, estimate: str = "joint") -> Tree:
    """The greedy tree of ``nodes`` nodes (root included); it uses only the top-k ranks it needs."""
    order = greedy_order(profile, nodes, estimate)
    return Tree.from_paths([path for path, _ in order], num_heads=profile.num_heads)


def expected_lengths(
    profile: HeadProfile, sizes: Iterable[int], estimate: str = "joint", lookup: int = 0
) -> dict[int, float]:
    """Expected tokens per step (root included) of the greedy tree of each size (built in ``estimate``'s order),
    each with a lookup chain of ``lookup`` nodes besides its ``size`` nodes (walk estimate only)."""
    return {n: value for (n, _), value in expected_grid(profile, sizes, [lookup], estimate).items()}


def expected_grid(
    profile: HeadProfile, sizes: Iterable[int], lookups: Iterable[int], estimate: str = "walk"
) -> dict[tuple[int, int], float]:
    """Expected tokens per step for every pair (greedy tree of ``size`` nodes, lookup chain of ``lookup`` nodes)."""
    _check(profile, estimate)
    sizes, lookups = sorted(set(sizes)), sorted(set(lookups))
    if not sizes or not lookups:
        return {}
    order = greedy_order(profile, sizes[-1], estimate)
    if estimate == "walk":
        walk = profile.position_ranks
        nodes = node_ids(walk.ranks, [path for path, _ in order], profile.topk)
        chains = {lookup: _lookup_depths(profile, estimate, lookup) for lookup in lookups}
        lengths: dict[tuple[int, int], float] = {}
        for start in range(0, len(sizes), 32):  # bounds the memory of the depths
            chunk = sizes[start : start + 32]
            heads_depths = nested_depths(nodes, chunk)  # once per chunk, whatever chain is beside the tree
            for lookup, chain in chains.items():
                depths = (
                    heads_depths
                    if chain is None
                    else np.maximum(heads_depths, chain[None, :].astype(heads_depths.dtype))
                )
                lengths |= {(n, lookup): value for n, value in zip(chunk, walk_lengths(depths, walk.segments).tolist())}
        return lengths
    if lookups != [0]:
        _lookup_depths(profile, estimate, max(lookups))  # refused, with the reason
    totals = [1.0]
    for _, chance in order:
        totals.append(totals[-1] + chance)
    return {(n, 0): totals[min(n - 1, len(totals) - 1)] for n in sizes}


def expected_length(profile: HeadProfile, tree: Tree | Sequence[Sequence[int]], estimate: str = "joint") -> float:
    """Expected tokens per step of any tree (root included): 1 + the chances of its nodes; a tree's lookup
    branch counts under the walk estimate."""
    _check(profile, estimate)
    paths = tree.paths if isinstance(tree, Tree) else [tuple(p) for p in tree]
    profile.check_paths(paths)
    chain = _lookup_depths(profile, estimate, tree.lookup if isinstance(tree, Tree) else 0)
    if estimate == "paper":
        return expected_accept_length(paths, profile.accuracy)
    if estimate == "walk":
        walk = profile.position_ranks
        depths = accepted_depths(walk.ranks, paths, profile.topk)
        if chain is not None:
            depths = np.maximum(depths, chain)
        return float(walk_lengths(depths, walk.segments)[0])
    return 1.0 + sum(joint_chance(profile, path) for path in paths)


def node_chances(profile: HeadProfile, tree: Tree, estimate: str = "joint") -> dict[tuple[int, ...], float]:
    """Each node's chance of being accepted under the estimate (for drawing the tree).

    For ``walk``: the share of the steps the walk takes with this tree (lookup branch included) in which
    the node's guess is right.
    """
    _check(profile, estimate)
    profile.check_paths(tree.paths)
    chain = _lookup_depths(profile, estimate, tree.lookup)
    if estimate == "walk":
        walk = profile.position_ranks
        paths = sorted(tree.paths, key=len)
        nodes = node_ids(walk.ranks, paths, profile.topk)
        depths = (nodes >= 0).sum(axis=1)
        steps = nodes[visited_positions(depths if chain is None else np.maximum(depths, chain), walk.segments)]
        accepted = np.bincount(steps[steps >= 0], minlength=len(paths) + 1)
        return {path: float(accepted[i + 1] / max(len(steps), 1)) for i, path in enumerate(paths)}
    chance = joint_chance if estimate == "joint" else paper_chance
    return {path: chance(profile, path) for path in tree.paths}
