"""Sparse candidate trees (paper, section 2.1.2) as tensors computed once.

A tree is a set of paths; each path lists, per depth, which top-k rank of that depth's head it takes:
``[0]`` is head 0's best guess, ``[0, 1]`` is head 1's second guess after it. Node 0 is the root, the
base model's own next token; the other nodes are the paths, ordered by depth. A tree may also carry a
lookup branch: a chain of ``lookup`` nodes under the root whose tokens are copied from earlier text
(``medusa.lookup``), after the heads' nodes. The decoding loop only indexes the buffers built here.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from medusa.errors import MedusaError
from medusa.files import parse_json

# Probability that head k's rank-r guess is the right token, a generic prior shaped like the head
# accuracies the paper reports. Only used to lay out the default trees; `medusa tree` builds trees
# from measured accuracies instead.
GENERIC_HEAD_ACCURACY: tuple[tuple[float, ...], ...] = (
    (0.62, 0.12, 0.05, 0.03, 0.02, 0.015, 0.012, 0.01, 0.008, 0.007),
    (0.40, 0.10, 0.05, 0.03, 0.02, 0.015, 0.012, 0.01, 0.008, 0.007),
    (0.30, 0.08, 0.04, 0.03, 0.02, 0.015, 0.012, 0.01, 0.008, 0.007),
    (0.24, 0.07, 0.04, 0.03, 0.02, 0.015, 0.012, 0.01, 0.008, 0.007),
    (0.20, 0.06, 0.035, 0.025, 0.02, 0.015, 0.012, 0.01, 0.008, 0.007),
)

DEFAULT_TREE_SIZES = (8, 16, 32, 64)


@dataclass(frozen=True)
class DepthExpansion:
    """One depth of a tree grown by sequential heads: head ``depth`` runs once per parent with children, on the
    tokens from the root down to that parent, and its top-k fill the children's nodes."""

    ancestors: torch.Tensor  # [parents, depth + 1] long: node ids from the root to each parent
    children: torch.Tensor  # [children] long: the node ids this depth fills
    source: torch.Tensor  # [children] long: index into the parents' top-k, flattened as parent * topk + rank


@dataclass(frozen=True)
class Tree:
    """Buffers for one tree. ``size`` counts the root, so it is the number of tokens verified per step."""

    paths: tuple[tuple[int, ...], ...]  # node order, root excluded
    topk: int
    attention_mask: torch.Tensor  # [size, size] bool: node i sees node j (an ancestor or itself)
    depths: torch.Tensor  # [size] long, root 0
    parents: torch.Tensor  # [size] long, root -1
    # [size] long into [root, lookup guesses (lookup of them), head0 top-k, head1 top-k, ...]
    candidate_index: torch.Tensor
    retrieve_paths: torch.Tensor  # [leaves, max_depth + 1] long: node ids root to leaf, padded with 0
    retrieve_valid: torch.Tensor  # [leaves, max_depth + 1] bool: False on padding
    # [size] long: each node's place among its siblings, its top-k rank (the lookup child comes after rank topk - 1)
    sibling_rank: torch.Tensor
    lookup: int = 0  # nodes of the lookup chain under the root

    @property
    def size(self) -> int:
        return len(self.paths) + self.lookup + 1

    @property
    def max_depth(self) -> int:
        return max(max((len(p) for p in self.paths), default=0), self.lookup)

    @property
    def max_children(self) -> int:
        """Columns of a node-by-sibling-rank table: the top-k, and one more for the lookup child."""
        return self.topk + (1 if self.lookup else 0)

    @classmethod
    def from_paths(
        cls, paths: Sequence[Sequence[int]], topk: int | None = None, num_heads: int | None = None, lookup: int = 0
    ) -> Tree:
        normalised = _validate_paths(paths, topk, num_heads)
        if isinstance(lookup, bool) or not isinstance(lookup, int) or lookup < 0:
            raise MedusaError(f"lookup must be a number of nodes, 0 or more, got {lookup!r}")
        needed_topk = 1 + max((max(p) for p in normalised), default=0)
        topk = needed_topk if topk is None else topk
        ordered = sorted(normalised, key=lambda p: (len(p), p))
        node_of = {(): 0} | {path: i + 1 for i, path in enumerate(ordered)}
        heads_size = len(ordered) + 1
        size = heads_size + lookup

        depths = torch.zeros(size, dtype=torch.long)
        parents = torch.full((size,), -1, dtype=torch.long)
        candidate_index = torch.zeros(size, dtype=torch.long)
        sibling_rank = torch.zeros(size, dtype=torch.long)
        mask = torch.eye(size, dtype=torch.bool)
        for path, node in node_of.items():
            if not path:
                continue
            depths[node] = len(path)
            parents[node] = node_of[path[:-1]]
            candidate_index[node] = 1 + lookup + (len(path) - 1) * topk + path[-1]
            sibling_rank[node] = path[-1]
            for cut in range(len(path)):
                mask[node, node_of[path[:cut]]] = True
        chain = [0] + list(range(heads_size, size))  # the root, then the lookup nodes by depth
        for depth in range(1, lookup + 1):
            node = chain[depth]
            depths[node] = depth
            parents[node] = chain[depth - 1]
            candidate_index[node] = depth  # the depth-th lookup guess
            sibling_rank[node] = topk if depth == 1 else 0  # after the root's head children; alone below
            mask[node, chain[:depth]] = True

        has_child = {path[:-1] for path in ordered}
        leaves = [
            [node_of[leaf[:cut]] for cut in range(len(leaf) + 1)]
            for leaf in [()] + ordered
            if leaf not in has_child and not (leaf == () and lookup)
        ]
        if lookup:
            leaves.append(chain)
        width = max(len(leaf) for leaf in leaves)
        retrieve = torch.zeros(len(leaves), width, dtype=torch.long)
        valid = torch.zeros(len(leaves), width, dtype=torch.bool)
        for row, leaf in enumerate(leaves):
            retrieve[row, : len(leaf)] = torch.tensor(leaf)
            valid[row, : len(leaf)] = True
        return cls(tuple(ordered), topk, mask, depths, parents, candidate_index, retrieve, valid, sibling_rank, lookup)

    def with_lookup(self, lookup: int) -> Tree:
        """The same head paths with a lookup chain of ``lookup`` nodes (0: none)."""
        if lookup == self.lookup:
            return self
        return Tree.from_paths(self.paths, self.topk, lookup=lookup).to(self.attention_mask.device)

    def first_nodes(self, size: int) -> Tree:
        """The tree cut to its first ``size`` nodes: the root, then head paths in depth order (each path's parent
        comes before it, so any cut is a tree), then the lookup chain's first nodes if room is left."""
        size = max(1, size)
        if size >= self.size:
            return self
        heads_nodes = min(len(self.paths), size - 1)
        lookup = min(self.lookup, size - 1 - heads_nodes)
        return Tree.from_paths(self.paths[:heads_nodes], self.topk, lookup=lookup).to(self.attention_mask.device)

    def expansion(self) -> tuple[DepthExpansion, ...]:
        """How sequential heads grow this tree's head nodes, one depth at a time (``DepthExpansion``)."""
        node_of = {(): 0} | {path: i + 1 for i, path in enumerate(self.paths)}
        steps = []
        for depth in range(max((len(p) for p in self.paths), default=0)):
            children = [path for path in self.paths if len(path) == depth + 1]
            parents = sorted({path[:-1] for path in children}, key=lambda p: node_of[p])
            slot = {parent: index for index, parent in enumerate(parents)}
            ancestors = [[node_of[parent[:cut]] for cut in range(depth + 1)] for parent in parents]
            device = self.depths.device
            steps.append(
                DepthExpansion(
                    torch.tensor(ancestors, dtype=torch.long, device=device),
                    torch.tensor([node_of[c] for c in children], dtype=torch.long, device=device),
                    torch.tensor([slot[c[:-1]] * self.topk + c[-1] for c in children], dtype=torch.long, device=device),
                )
            )
        return tuple(steps)

    def check_heads(self, num_heads: int) -> None:
        """The head paths must not be deeper than the heads; the lookup chain may be (it needs no head)."""
        deepest = max((len(p) for p in self.paths), default=0)
        if deepest > num_heads:
            raise MedusaError(f"tree is {deepest} deep but there are only {num_heads} heads")

    def to(self, device: torch.device | str) -> Tree:
        return Tree(
            self.paths,
            self.topk,
            *(
                t.to(device)
                for t in (
                    self.attention_mask,
                    self.depths,
                    self.parents,
                    self.candidate_index,
                    self.retrieve_paths,
                    self.retrieve_valid,
                    self.sibling_rank,
                )
            ),
            self.lookup,
        )

    def to_json(self) -> str:
        return json.dumps({"topk": self.topk, "paths": [list(p) for p in self.paths]})


def _validate_paths(paths: Sequence[Sequence[int]], topk: int | None, num_heads: int | None) -> list[tuple[int, ...]]:
    if isinstance(paths, (str, bytes)) or not isinstance(paths, Sequence):
        raise MedusaError(f"a tree is a list of paths, got {type(paths).__name__}")
    if topk is not None and (not isinstance(topk, int) or topk < 1):
        raise MedusaError(f"tree topk must be a positive integer, got {topk!r}")
    result: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()
    for path in paths:
        if isinstance(path, (str, bytes)) or not isinstance(path, Sequence) or len(path) == 0:
            raise MedusaError(f"tree path {path!r} must be a non-empty list of top-k ranks")
        if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in path):
            raise MedusaError(f"tree path {list(path)} must hold non-negative integer ranks")
        key = tuple(path)
        if key in seen:
            raise MedusaError(f"tree path {list(path)} appears twice")
        if topk is not None and max(key) >= topk:
            raise MedusaError(f"tree path {list(path)} uses rank {max(key)}, beyond top-{topk}")
        if num_heads is not None and len(key) > num_heads:
            raise MedusaError(f"tree path {list(path)} is {len(key)} deep but there are only {num_heads} heads")
        seen.add(key)
        result.append(key)
    for key in result:
        if len(key) > 1 and key[:-1] not in seen:
            raise MedusaError(f"tree path {list(key)} needs its prefix {list(key[:-1])}, which is missing")
    return result


def build_tree_from_accuracies(accuracy: Sequence[Sequence[float]], size: int) -> list[list[int]]:
    """The paper's greedy construction: add the frontier node with the highest product of accuracies.

    ``accuracy[k][r]`` is how often head k's rank-r guess is right; ``size`` counts the root.
    """
    if size < 1:
        raise MedusaError(f"tree size must be at least 1, got {size}")
    depth_limit = len(accuracy)
    frontier: list[tuple[float, tuple[int, ...]]] = []

    def push_children(path: tuple[int, ...], score: float) -> None:
        if len(path) >= depth_limit:
            return
        for rank, p in enumerate(accuracy[len(path)]):
            heapq.heappush(frontier, (-score * p, path + (rank,)))

    push_children((), 1.0)
    chosen: list[list[int]] = []
    while frontier and len(chosen) < size - 1:
        negative_score, path = heapq.heappop(frontier)
        chosen.append(list(path))
        push_children(path, -negative_score)
    return chosen


def expected_accept_length(paths: Sequence[Sequence[int]] | Tree, accuracy: Sequence[Sequence[float]]) -> float:
    """The paper's estimate of tokens committed per step: 1 (the base token) plus, for every node, the
    product of the accuracies along its path.

    It treats the heads as independent; in practice they are not (an easy stretch of text makes every
    head right at once), which ``medusa.treeopt`` measures instead when it can.
    """
    total = 1.0
    for path in paths.paths if isinstance(paths, Tree) else paths:
        if len(path) > len(accuracy):
            raise MedusaError(
                f"tree path {list(path)} is {len(path)} deep but the accuracy table has {len(accuracy)} heads"
            )
        chance = 1.0
        for depth, rank in enumerate(path):
            if rank >= len(accuracy[depth]):
                raise MedusaError(
                    f"tree path {list(path)} uses rank {rank}, but the accuracy table has only "
                    f"top-{len(accuracy[depth])} for head {depth}"
                )
            chance *= accuracy[depth][rank]
        total += chance
    return total


def default_tree(size: int = 64, num_heads: int = 4) -> Tree:
    """A tree of ``size`` nodes for ``num_heads`` heads, laid out from a generic accuracy prior."""
    if size not in DEFAULT_TREE_SIZES:
        raise MedusaError(f"no default tree of {size} nodes; choose one of {', '.join(map(str, DEFAULT_TREE_SIZES))}")
    prior = GENERIC_HEAD_ACCURACY[:num_heads]
    return Tree.from_paths(build_tree_from_accuracies(prior, size))


TreeSpec = Tree | int | str | Path | Sequence[Sequence[int]] | None


def load_tree(spec: TreeSpec, num_heads: int) -> Tree:
    """A tree from a default size (64 or "64"), a JSON file, a JSON list of paths, or paths: the forms
    ``--tree`` takes on the command line are the forms the Python API takes."""
    if spec is None:
        tree = default_tree(64 if num_heads >= 1 else 8, num_heads)
    elif isinstance(spec, Tree):
        tree = spec
    elif isinstance(spec, int) and not isinstance(spec, bool):
        tree = default_tree(spec, num_heads)
    elif isinstance(spec, (str, Path)):
        text = str(spec).strip()
        if text.isdigit():
            tree = default_tree(int(text), num_heads)
        elif text.startswith("["):
            tree = _tree_from_json(text, str(spec), num_heads)
        else:
            path = Path(text)
            if not path.is_file():
                raise MedusaError(
                    f"tree {text!r} is neither a default size ({', '.join(map(str, DEFAULT_TREE_SIZES))}), "
                    "a JSON list of paths, nor an existing file"
                )
            tree = _tree_from_json(path.read_text(), str(path), num_heads)
    else:
        tree = Tree.from_paths(spec, num_heads=num_heads)
    tree.check_heads(num_heads)
    return tree


def _tree_from_json(text: str, origin: str, num_heads: int) -> Tree:
    raw = parse_json(text, f"tree {origin}")
    if isinstance(raw, dict):
        if "paths" not in raw:
            raise MedusaError(f"tree {origin} has no 'paths' list")
        return Tree.from_paths(raw["paths"], topk=raw.get("topk"), num_heads=num_heads)
    return Tree.from_paths(raw, num_heads=num_heads)
