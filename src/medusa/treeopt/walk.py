"""The walk estimate: replay greedy decoding's walk over the profiled answers, for any tree.

A step started at position t accepts the root and the deepest tree path whose every node was right
there: ``1 + a(t)`` tokens, where ``a(t)`` is read off the profile's per-position ranks. The next step
starts at ``t + 1 + a(t)``. So decoding strides over easy stretches (large ``a``) in few steps and takes
one step per token through hard ones (``a = 0``): the positions where steps start are not a uniform
sample of the text, hard positions are over-represented. Measured tokens per step is

    tokens / steps = sum over visited t of (1 + a(t)) / number of visited t,

which is lower than the mean of ``1 + a(t)`` over all positions (the ``joint`` estimate) whenever
``a`` varies from one stretch of text to the next. Walking the profiled answers the way decoding does
gives the former directly: on the profiled text itself it is exactly what greedy decoding with the
tree would measure (up to where the answer ends).

Everything here is vectorised with numpy: ranks to accepted depths by a few table look-ups per head,
and the walk over all answers and all trees at once, one array operation per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def node_ids(ranks: np.ndarray, paths: Sequence[Sequence[int]], topk: int) -> np.ndarray:
    """``[positions, heads]``: at each position, the number (1-based, in the order of ``paths``) of the tree
    node that is right at each depth, or -1 where no node of the tree is.

    ``paths`` must be prefix-closed, each path after its prefix (a tree's nodes in any order that
    lists parents first, such as the greedy order).
    """
    ranks = np.asarray(ranks)
    child = np.full((len(paths) + 1, topk), -1, dtype=np.int64)  # node, rank -> child node (root: 0)
    number = {(): 0}
    for index, path in enumerate(paths, start=1):
        path = tuple(path)
        parent = number.get(path[:-1])
        if parent is None:
            raise ValueError(f"path {list(path)} comes before its parent (or has none)")
        child[parent, path[-1]] = index
        number[path] = index
    nodes = np.full(ranks.shape, -1, dtype=np.int64)
    current = np.zeros(ranks.shape[0], dtype=np.int64)
    for depth in range(ranks.shape[1]):
        rank = ranks[:, depth].astype(np.int64)
        right = (current >= 0) & (rank >= 0) & (rank < topk)
        current = np.where(right, child[np.maximum(current, 0), np.clip(rank, 0, topk - 1)], -1)
        nodes[:, depth] = current
    return nodes


def accepted_depths(ranks: np.ndarray, paths: Sequence[Sequence[int]], topk: int) -> np.ndarray:
    """``[positions]``: how many tree tokens after the root a step started at each position accepts."""
    ordered = sorted((tuple(p) for p in paths), key=len)
    return (node_ids(ranks, ordered, topk) >= 0).sum(axis=1)


def nested_depths(nodes: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """``[len(sizes), positions]`` int8: accepted depths for the trees made of the root and the first
    ``n - 1`` nodes of an order (the greedy order), for each ``n`` in ``sizes``, from that order's
    ``node_ids``: a node belongs to the tree of ``n`` nodes when its number is below ``n``."""
    limits = np.asarray(sizes, dtype=np.int64)[:, None] - 1
    depths = np.zeros((len(limits), nodes.shape[0]), dtype=np.int8)
    for depth in range(nodes.shape[1]):
        number = nodes[:, depth][None, :]
        depths += (number >= 1) & (number <= limits)
    return depths


def walk_steps(depths: np.ndarray, segments: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Replay decoding over each segment (a run of consecutive positions, one answer), for each tree.

    ``depths``: ``[trees, positions]`` (or ``[positions]``) accepted depths. Each segment's walk starts at
    its first position and ends once it steps past its last. Returns ``(tokens, steps)``, each ``[trees]``:
    tokens accepted (the last step counts whole, as decoding counts it) and steps taken, over all segments.
    """
    depths = np.atleast_2d(np.asarray(depths))
    trees, positions = depths.shape
    lengths = np.asarray(segments, dtype=np.int64)
    if lengths.sum() != positions:
        raise ValueError(f"segments add up to {lengths.sum()} positions, the depths have {positions}")
    ends = np.cumsum(lengths)
    starts = ends - lengths
    # one walker per (tree, segment), kept in flat arrays that shrink as walkers finish
    tree = np.repeat(np.arange(trees), len(lengths))
    position = np.tile(starts, trees)
    end = np.tile(ends, trees)
    flat = depths.reshape(-1)
    tokens = np.zeros(trees, dtype=np.int64)
    steps = np.zeros(trees, dtype=np.int64)
    while tree.size:
        accepted = 1 + flat[tree * positions + position].astype(np.int64)
        tokens += np.bincount(tree, weights=accepted, minlength=trees).astype(np.int64)
        steps += np.bincount(tree, minlength=trees)
        position = position + accepted
        going = position < end
        tree, position, end = tree[going], position[going], end[going]
    return tokens, steps


def walk_lengths(depths: np.ndarray, segments: Sequence[int]) -> np.ndarray:
    """``[trees]``: tokens per step (root included) of each tree's walk."""
    tokens, steps = walk_steps(depths, segments)
    return tokens / np.maximum(steps, 1)


def visited_positions(depths: np.ndarray, segments: Sequence[int]) -> np.ndarray:
    """``[positions]`` bool: where one tree's walk (``depths`` ``[positions]``) starts its steps."""
    depths = np.asarray(depths, dtype=np.int64)
    lengths = np.asarray(segments, dtype=np.int64)
    ends = np.cumsum(lengths)
    position, end = ends - lengths, ends
    seen = np.zeros(depths.shape[0], dtype=bool)
    while position.size:
        seen[position] = True
        position = position + 1 + depths[position]
        going = position < end
        position, end = position[going], end[going]
    return seen
