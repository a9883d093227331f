"""Trees from a head profile: the greedy construction, and the expected accepted length of any tree.

Two estimates of how often a node is accepted:
- ``paper``: the product of the heads' accuracies along the node's path (paper, section 2.1.2),
  which assumes the heads are right or wrong independently of each other;
- ``joint``: how often the whole path was right at once in the profile, which needs no such assumption.

Either way a node's chance never exceeds its parent's, so adding the most likely frontier node first
yields the best tree of every size for that estimate, and the greedy order of the largest tree lists
the smaller ones as its prefixes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from medusa.errors import MedusaError
from medusa.tree import Tree, build_tree_from_accuracies, expected_accept_length
from medusa.treeopt.profile import HeadProfile, joint_chance, paper_chance

ESTIMATES = ("joint", "paper")


def _check(profile: HeadProfile, estimate: str) -> None:
    if estimate not in ESTIMATES:
        raise MedusaError(f"unknown estimate {estimate!r}; choose one of {', '.join(ESTIMATES)}")
    if profile.samples == 0:
        raise MedusaError("the profile measured no positions: profile on conversations with longer assistant turns")


def greedy_order(profile: HeadProfile, max_nodes: int, estimate: str = "joint") -> list[tuple[tuple[int, ...], float]]:
    """The first ``max_nodes - 1`` non-root nodes in the order the greedy construction adds them, with their chances.

    With ``joint``, paths never seen right in the profile (chance 0) come last, in the paper's order.
    """
    _check(profile, estimate)
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


def expected_lengths(profile: HeadProfile, sizes: Iterable[int], estimate: str = "joint") -> dict[int, float]:
    """Expected tokens per step (root included) of the greedy tree of each size."""
    sizes = sorted(set(sizes))
    if not sizes:
        return {}
    order = greedy_order(profile, sizes[-1], estimate)
    totals = [1.0]
    for _, chance in order:
        totals.append(totals[-1] + chance)
    return {n: totals[min(n - 1, len(totals) - 1)] for n in sizes}


def expected_length(profile: HeadProfile, tree: Tree | Sequence[Sequence[int]], estimate: str = "joint") -> float:
    """Expected tokens per step of any tree (root included): 1 + the chances of its nodes."""
    _check(profile, estimate)
    paths = tree.paths if isinstance(tree, Tree) else [tuple(p) for p in tree]
    profile.check_paths(paths)
    if estimate == "paper":
        return expected_accept_length(paths, profile.accuracy)
    return 1.0 + sum(joint_chance(profile, path) for path in paths)


def node_chances(profile: HeadProfile, tree: Tree, estimate: str = "joint") -> dict[tuple[int, ...], float]:
    """Each node's chance of being accepted under the estimate (for drawing the tree)."""
    _check(profile, estimate)
    profile.check_paths(tree.paths)
    chance = joint_chance if estimate == "joint" else paper_chance
    return {path: chance(profile, path) for path in tree.paths}
