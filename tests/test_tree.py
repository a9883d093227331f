"""Tree buffers checked by hand on small trees, invariants on the default trees, and every way a tree is rejected."""

from __future__ import annotations

import json

import pytest
import torch

from medusa.errors import MedusaError
from medusa.tree import DEFAULT_TREE_SIZES, Tree, build_tree_from_accuracies, default_tree, load_tree

T, F = True, False


def test_three_node_tree_by_hand():
    tree = Tree.from_paths([[0], [1], [0, 0]])
    # nodes: 0 root, 1 [0], 2 [1], 3 [0, 0]
    assert tree.paths == ((0,), (1,), (0, 0))
    assert tree.size == 4 and tree.max_depth == 2 and tree.topk == 2
    assert tree.depths.tolist() == [0, 1, 1, 2]
    assert tree.parents.tolist() == [-1, 0, 0, 1]
    # candidates are [root, head0 top-2, head1 top-2]
    assert tree.candidate_index.tolist() == [0, 1, 2, 3]
    assert tree.attention_mask.tolist() == [
        [T, F, F, F],
        [T, T, F, F],
        [T, F, T, F],
        [T, T, F, T],
    ]
    assert tree.retrieve_paths.tolist() == [[0, 2, 0], [0, 1, 3]]
    assert tree.retrieve_valid.tolist() == [[T, T, F], [T, T, T]]


def test_deeper_tree_with_explicit_topk_by_hand():
    # Given out of order: nodes are sorted by depth, then by ranks.
    tree = Tree.from_paths([[0], [0, 0], [0, 0, 0], [2], [0, 1]], topk=3)
    # nodes: 0 root, 1 [0], 2 [2], 3 [0, 0], 4 [0, 1], 5 [0, 0, 0]
    assert tree.paths == ((0,), (2,), (0, 0), (0, 1), (0, 0, 0))
    assert tree.topk == 3 and tree.size == 6 and tree.max_depth == 3
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 3]
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1, 3]
    # 1 + depth_index * topk + rank: [0]->1, [2]->3, [0,0]->4, [0,1]->5, [0,0,0]->7
    assert tree.candidate_index.tolist() == [0, 1, 3, 4, 5, 7]
    assert tree.attention_mask.tolist() == [
        [T, F, F, F, F, F],
        [T, T, F, F, F, F],
        [T, F, T, F, F, F],
        [T, T, F, T, F, F],
        [T, T, F, F, T, F],
        [T, T, F, T, F, T],
    ]
    assert tree.retrieve_paths.tolist() == [[0, 2, 0, 0], [0, 1, 4, 0], [0, 1, 3, 5]]
    assert tree.retrieve_valid.tolist() == [[T, T, F, F], [T, T, T, F], [T, T, T, T]]


def test_root_only_tree_is_plain_decoding():
    tree = Tree.from_paths([])
    assert tree.size == 1 and tree.max_depth == 0 and tree.topk == 1
    assert tree.attention_mask.tolist() == [[True]]
    assert tree.depths.tolist() == [0] and tree.parents.tolist() == [-1]
    assert tree.candidate_index.tolist() == [0]
    assert tree.retrieve_paths.tolist() == [[0]] and tree.retrieve_valid.tolist() == [[True]]


@pytest.mark.parametrize("size", DEFAULT_TREE_SIZES)
def test_default_trees_have_their_size_and_consistent_buffers(size):
    tree = default_tree(size, num_heads=4)
    assert tree.size == size
    assert tree.attention_mask.shape == (size, size)
    assert 1 <= tree.max_depth <= 4
    # The mask is exactly "ancestor or self", following the parent links.
    for node in range(size):
        ancestors, walk = {node}, node
        while tree.parents[walk] >= 0:
            walk = int(tree.parents[walk])
            ancestors.add(walk)
        assert set(torch.nonzero(tree.attention_mask[node]).flatten().tolist()) == ancestors
        assert int(tree.depths[node]) == len(ancestors) - 1
    # Every node lies on some retrieval path, and each path walks parent to child.
    on_paths = set()
    for row, valid in zip(tree.retrieve_paths.tolist(), tree.retrieve_valid.tolist()):
        nodes = [n for n, v in zip(row, valid) if v]
        assert nodes[0] == 0
        assert all(int(tree.parents[child]) == parent for parent, child in zip(nodes, nodes[1:]))
        on_paths.update(nodes)
    assert on_paths == set(range(size))
    # Candidate indices address [root, head0 top-k, head1 top-k, ...].
    for node, path in enumerate(tree.paths, start=1):
        assert int(tree.candidate_index[node]) == 1 + (len(path) - 1) * tree.topk + path[-1]


def test_default_trees_grow_by_prefix():
    smaller = set(default_tree(16).paths)
    assert smaller <= set(default_tree(64).paths)


def test_greedy_construction_follows_accuracies():
    # Scores are products along the path: [0] 0.9, then [0, 0] 0.09 beats [1] 0.08, which beats [0, 1] 0.045.
    paths = build_tree_from_accuracies([[0.9, 0.08], [0.1, 0.05]], size=4)
    assert paths == [[0], [0, 0], [1]]


def test_load_tree_forms_agree(tmp_path):
    tree = default_tree(16)
    file = tmp_path / "tree.json"
    file.write_text(tree.to_json())
    assert load_tree(str(file), 4).paths == tree.paths
    assert load_tree(file, 4).topk == tree.topk
    assert load_tree("16", 4).paths == tree.paths
    assert load_tree(json.dumps([list(p) for p in tree.paths]), 4).paths == tree.paths
    assert load_tree([list(p) for p in tree.paths], 4).paths == tree.paths
    assert load_tree(tree, 4) is tree
    assert load_tree(None, 4).size == 64


# ----- rejection: each mistake gets its own message ------------------------------------------------

INVALID_PATHS = [
    ("missing prefix", [[0], [1, 0]], {}, r"tree path \[1, 0\] needs its prefix \[1\], which is missing"),
    ("rank beyond top-k", [[0], [3]], {"topk": 2}, r"tree path \[3\] uses rank 3, beyond top-2"),
    (
        "depth beyond heads",
        [[0], [0, 0], [0, 0, 0]],
        {"num_heads": 2},
        r"\[0, 0, 0\] is 3 deep but there are only 2 heads",
    ),
    ("duplicate path", [[0], [1], [0]], {}, r"tree path \[0\] appears twice"),
    ("negative rank", [[0], [-1]], {}, r"tree path \[-1\] must hold non-negative integer ranks"),
    ("fractional rank", [[0], [0.5]], {}, r"tree path \[0.5\] must hold non-negative integer ranks"),
    ("boolean rank", [[True]], {}, r"must hold non-negative integer ranks"),
    ("text rank", [["1"]], {}, r"must hold non-negative integer ranks"),
    ("empty path", [[0], []], {}, r"tree path \[\] must be a non-empty list of top-k ranks"),
    ("path not a list", [[0], 1], {}, r"tree path 1 must be a non-empty list of top-k ranks"),
    ("paths not a list", "[[0]]", {}, r"a tree is a list of paths, got str"),
    ("paths a number", 7, {}, r"a tree is a list of paths, got int"),
    ("bad topk", [[0]], {"topk": 0}, r"tree topk must be a positive integer, got 0"),
]


@pytest.mark.parametrize("paths, kwargs, message", [c[1:] for c in INVALID_PATHS], ids=[c[0] for c in INVALID_PATHS])
def test_invalid_paths_are_rejected(paths, kwargs, message):
    with pytest.raises(MedusaError, match=message):
        Tree.from_paths(paths, **kwargs)


def test_invalid_tree_messages_are_all_different():
    messages = set()
    for _, paths, kwargs, _ in INVALID_PATHS:
        with pytest.raises(MedusaError) as caught:
            Tree.from_paths(paths, **kwargs)
        messages.add(str(caught.value))
    assert len(messages) == len(INVALID_PATHS)


def test_tree_deeper_than_heads_is_rejected_when_loaded():
    with pytest.raises(MedusaError, match=r"is 3 deep but there are only 2 heads"):
        load_tree("[[0], [0, 0], [0, 0, 0]]", num_heads=2)
    with pytest.raises(MedusaError, match=r"tree is 3 deep but there are only 2 heads"):
        load_tree(Tree.from_paths([[0], [0, 0], [0, 0, 0]]), num_heads=2)


def test_bad_json_is_rejected():
    with pytest.raises(MedusaError, match=r"tree \[\[0\], \[1 is not valid JSON"):
        load_tree("[[0], [1", num_heads=4)


def test_bad_json_file_is_rejected(tmp_path):
    file = tmp_path / "tree.json"
    file.write_text("{not json")
    with pytest.raises(MedusaError, match=rf"tree {file} is not valid JSON"):
        load_tree(str(file), num_heads=4)


def test_json_object_without_paths_is_rejected(tmp_path):
    file = tmp_path / "tree.json"
    file.write_text(json.dumps({"topk": 2}))
    with pytest.raises(MedusaError, match=r"has no 'paths' list"):
        load_tree(file, num_heads=4)


def test_rank_beyond_topk_from_a_file_is_rejected(tmp_path):
    file = tmp_path / "tree.json"
    file.write_text(json.dumps({"topk": 2, "paths": [[0], [2]]}))
    with pytest.raises(MedusaError, match=r"uses rank 2, beyond top-2"):
        load_tree(file, num_heads=4)


def test_missing_file_is_rejected(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(
        MedusaError, match=r"is neither a default size \(8, 16, 32, 64\), a JSON list of paths, nor an existing file"
    ):
        load_tree(str(missing), num_heads=4)


def test_unknown_default_size_is_rejected():
    with pytest.raises(MedusaError, match=r"no default tree of 12 nodes; choose one of 8, 16, 32, 64"):
        load_tree("12", num_heads=4)


def test_tree_buffers_move_with_to():
    tree = default_tree(8).to("cpu")
    assert tree.paths == default_tree(8).paths
    assert tree.attention_mask.dtype == torch.bool and tree.retrieve_paths.dtype == torch.long
