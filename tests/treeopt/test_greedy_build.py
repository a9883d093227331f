"""The greedy construction and expected accepted lengths, checked by hand."""

from __future__ import annotations

import pytest

from medusa.errors import MedusaError
from medusa.tree import Tree, build_tree_from_accuracies, expected_accept_length
from medusa.treeopt.build import build_tree, expected_length, expected_lengths, greedy_order
from medusa.treeopt.profile import HeadProfile

# head k, rank r
TABLE = [[0.7, 0.2, 0.05], [0.5, 0.25, 0.1], [0.4, 0.2, 0.1]]


def table_profile(counts: dict | None = None, samples: int = 100) -> HeadProfile:
    return HeadProfile(num_heads=3, topk=3, accuracy=TABLE, samples=samples, path_counts=counts or {})


def test_greedy_tree_of_seven_nodes_matches_the_hand_computed_one():
    # chances: [0] .7, [0,0] .35, [1] .2, [0,1] .175, [0,0,0] .14, [1,0] .1, then .07s
    assert build_tree_from_accuracies(TABLE, 7) == [[0], [0, 0], [1], [0, 1], [0, 0, 0], [1, 0]]
    tree = build_tree(table_profile(), 7, "paper")
    assert tree.paths == ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))
    assert tree.topk == 2  # only the ranks it uses
    assert tree.size == 7


def test_expected_accept_length_is_one_plus_the_path_products():
    paths = [[0], [0, 0], [1], [0, 1], [0, 0, 0], [1, 0]]
    assert expected_accept_length(paths, TABLE) == pytest.approx(1 + 0.7 + 0.35 + 0.2 + 0.175 + 0.14 + 0.1)
    assert expected_accept_length([], TABLE) == 1.0
    assert expected_accept_length(Tree.from_paths([[2], [2, 2]]), TABLE) == pytest.approx(1 + 0.05 + 0.05 * 0.1)
    assert expected_length(table_profile(), paths, "paper") == pytest.approx(2.665)


def test_expected_lengths_of_every_size_are_prefix_sums_of_the_greedy_order():
    curve = expected_lengths(table_profile(), [1, 2, 3, 7], "paper")
    assert curve == pytest.approx({1: 1.0, 2: 1.7, 3: 2.05, 7: 2.665})


def test_joint_estimate_counts_whole_paths_and_ignores_the_products():
    # head 0 right at rank 0 in 60 of 100 positions; heads 0 and 1 right together (rank 0, rank 0) in 50.
    counts = {(0,): 60, (1,): 20, (0, 0): 50, (0, 0, 0): 45, (0, 1): 5, (1, 0): 2}
    profile = table_profile(counts)
    order = greedy_order(profile, 5, "joint")
    assert order == [((0,), 0.6), ((0, 0), 0.5), ((0, 0, 0), 0.45), ((1,), 0.2)]
    assert expected_length(profile, [p for p, _ in order], "joint") == pytest.approx(1 + 0.6 + 0.5 + 0.45 + 0.2)
    # a tree larger than the paths seen is filled in the paper's order, chance 0
    filled = greedy_order(profile, 9, "joint")
    assert [p for p, _ in filled[:6]] == [(0,), (0, 0), (0, 0, 0), (1,), (0, 1), (1, 0)]
    unseen = [tuple(p) for p in build_tree_from_accuracies(TABLE, 30) if tuple(p) not in counts]
    assert [p for p, _ in filled[6:]] == unseen[:2]  # next in the paper's order
    assert all(chance == 0 for _, chance in filled[6:])
    Tree.from_paths([p for p, _ in filled])  # prefix-closed


def test_tree_beyond_the_profile_is_refused():
    with pytest.raises(MedusaError, match="rank 3, but the profile measured only top-3"):
        expected_length(table_profile(), [[3]], "paper")
    with pytest.raises(MedusaError, match="4 deep but the profile has 3 heads"):
        expected_length(table_profile(), [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]], "joint")
    with pytest.raises(MedusaError, match="unknown estimate"):
        build_tree(table_profile(), 4, "magic")
    with pytest.raises(MedusaError, match="no positions"):
        build_tree(table_profile(samples=0), 4)
