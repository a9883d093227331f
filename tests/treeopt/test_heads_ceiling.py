"""``scripts/heads_ceiling.py``: the ceiling of any tree, and its per-category table weighted as Spec-Bench's 480."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from medusa.treeopt.profile import PositionRanks

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "heads_ceiling.py"


def load_script():
    spec = importlib.util.spec_from_file_location("heads_ceiling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_top_k_tree_accepts_down_to_the_first_head_whose_rank_is_k_or_worse():
    script = load_script()
    ranks = PositionRanks(np.array([[0, 1, 3, -1], [2, 0, 0, 0], [-1, -1, -1, -1]], dtype=np.int16), np.array([3]))
    assert script.ceiling_depths(ranks, 1).tolist() == [1, 0, 0]
    assert script.ceiling_depths(ranks, 2).tolist() == [2, 0, 0]
    assert script.ceiling_depths(ranks, 3).tolist() == [2, 4, 0]
    assert script.ceiling_depths(ranks, 4).tolist() == [3, 4, 0]


def test_the_category_table_weighs_each_category_as_the_480_questions_do(capsys):
    script = load_script()
    # one writing answer where every head is right (5 tokens a step: 2 steps over 10 positions), one translation
    # answer where none is (1 token a step: 10 steps)
    hit, miss = np.zeros((10, 4), dtype=np.int16), np.full((10, 4), -1, dtype=np.int16)
    ranks = PositionRanks(np.concatenate([hit, miss]), np.array([10, 10]))
    script.category_table(ranks, ["writing", "translation"], {"top-1": script.ceiling_depths(ranks, 1)})
    rows = {
        line.split(" | ")[0].strip("| "): line.split(" | ")[-1].strip("| ")
        for line in capsys.readouterr().out.splitlines()
    }
    assert rows["writing"] == "5.00" and rows["translation"] == "1.00"
    assert rows["all, as profiled"] == f"{20 / 12:.2f}"
    # writing counts 10 of the 480 and translation 80: (10 * 10 + 80 * 10) tokens over (10 * 2 + 80 * 10) steps
    assert rows["weighted as Spec-Bench's 480"] == f"{900 / 820:.2f}"


def test_a_lookup_chain_beside_the_tree_accepts_the_longer_of_the_two():
    script = load_script()
    ranks = PositionRanks(np.zeros((3, 4), dtype=np.int16), np.array([3]), lookup=np.array([3, 0, 1], dtype=np.uint8))
    assert script.with_chain(np.array([0, 2, 1]), ranks, 2).tolist() == [2, 2, 1]  # the chain's 3 cut to its 2 nodes
    without = PositionRanks(np.zeros((3, 4), dtype=np.int16), np.array([3]))
    with pytest.raises(SystemExit, match="did not measure the lookup branch"):
        script.with_chain(np.array([0, 2, 1]), without, 2)
