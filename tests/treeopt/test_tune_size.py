"""Choosing the tree size from a cost curve, and the per-device tuned tree that loading picks up."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from helpers.models import make_tiny_model
from helpers.treeopt import fresh_heads
from medusa import tuned_trees
from medusa.engine import EngineOptions
from medusa.errors import MedusaError
from medusa.model import MedusaModel
from medusa.tree import Tree
from medusa.treeopt.tune import CostCurve, choose_tree, measure_step_seconds
from medusa.tuned_trees import (
    TUNED_FILE,
    BatchTree,
    ChainedTree,
    TunedTree,
    device_kind,
    read_tuned_trees,
    tuned_tree,
    write_tuned_tree,
)

EXPECTED = {1: 1.0, 2: 1.6, 4: 2.1, 8: 2.5, 16: 2.8, 32: 3.0}


def choose_size(expected: dict[int, float], cost: CostCurve, max_nodes: int | None = None):
    """The best heads' tree without a lookup chain: ``choose_tree`` over (nodes, 0) pairs."""
    return choose_tree({(n, 0): value for n, value in expected.items()}, cost, max_nodes)


def test_best_size_maximises_expected_tokens_per_second():
    # flat until 8 nodes, then steeper: tokens/s 100, 160, 200, 227, 200, 150
    gpu_like = CostCurve({1: 0.010, 2: 0.010, 4: 0.0105, 8: 0.011, 16: 0.014, 32: 0.020})
    choice = choose_size(EXPECTED, gpu_like)
    assert choice.nodes == 8
    assert choice.expected_tokens_per_second == pytest.approx(2.5 / 0.011)
    assert choice.tokens_per_second[16] == pytest.approx(200)
    # free nodes: the biggest tree; nodes that cost their full price: no tree at all
    assert choose_size(EXPECTED, CostCurve({n: 0.01 for n in EXPECTED})).nodes == 32
    assert choose_size(EXPECTED, CostCurve({n: 0.01 * n for n in EXPECTED})).nodes == 1
    # a cap on the size, and ties going to the smaller tree
    assert choose_size(EXPECTED, gpu_like, max_nodes=4).nodes == 4
    assert choose_size({1: 1.0, 2: 2.0}, CostCurve({1: 1.0, 2: 2.0})).nodes == 1


def test_only_sizes_on_both_curves_are_candidates():
    assert choose_size(EXPECTED, CostCurve({3: 0.001, 8: 0.011, 500: 0.001})).nodes == 8
    with pytest.raises(MedusaError, match="shares no tree size"):
        choose_size(EXPECTED, CostCurve({3: 0.01}))


def test_cost_curves_load_in_both_formats(tmp_path):
    ours = tmp_path / "ours.json"
    CostCurve({1: 0.01, 4: 0.02}, "NVIDIA H100 80GB HBM3").save(ours)
    assert CostCurve.load(ours) == CostCurve({1: 0.01, 4: 0.02}, "NVIDIA H100 80GB HBM3")
    bench = tmp_path / "bench.json"
    bench.write_text(
        json.dumps(
            {
                "meta": {"device": "Intel(R) Xeon(R)", "device_type": "cpu"},
                "points": [{"nodes": 1, "median_ms": 5.0}, {"nodes": 8, "median_ms": 7.5}],
            }
        )
    )
    assert CostCurve.load(bench) == CostCurve({1: 0.005, 8: 0.0075}, "cpu")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"points": [{"nodes": 0, "seconds": 1.0}]}))
    with pytest.raises(MedusaError, match="nodes must be a positive integer"):
        CostCurve.load(bad)
    bad.write_text(json.dumps({"nodes": [1]}))
    with pytest.raises(MedusaError, match='must be {"points"'):
        CostCurve.load(bad)


def test_a_cost_curve_prices_only_the_head_type_it_was_measured_with(tmp_path):
    ours = tmp_path / "ours.json"
    CostCurve({1: 0.01, 4: 0.03}, "cpu", "sequential").save(ours)
    assert json.loads(ours.read_text())["head_type"] == "sequential"
    assert CostCurve.load(ours, head_type="sequential") == CostCurve({1: 0.01, 4: 0.03}, "cpu", "sequential")
    with pytest.raises(MedusaError, match="measured with sequential heads, but these heads are medusa"):
        CostCurve.load(ours, head_type="medusa")
    bench = tmp_path / "bench.json"
    meta = {"device": "H100", "device_type": "cuda", "heads": {"num_heads": 4, "head_type": "sequential"}}
    bench.write_text(json.dumps({"meta": meta, "points": [{"nodes": 1, "median_ms": 5.0}]}))
    assert CostCurve.load(bench, head_type="sequential").head_type == "sequential"
    old = tmp_path / "old.json"  # no head type: timed before sequential heads existed, so with Medusa heads
    old.write_text(json.dumps({"points": [{"nodes": 1, "seconds": 0.01}]}))
    assert CostCurve.load(old, head_type="medusa").head_type == "medusa"
    with pytest.raises(MedusaError, match=r"medusa bench --cost-curve --head-type sequential"):
        CostCurve.load(old, head_type="sequential")


def test_a_cost_curve_prices_heads_with_a_prefix_layer_only_if_timed_with_one(tmp_path):
    timed = tmp_path / "prefix.json"
    CostCurve({1: 0.01, 4: 0.03}, "cpu", "sequential", prefix_layer=True).save(timed)
    assert CostCurve.load(timed, head_type="sequential", prefix_layer=True).prefix_layer
    with pytest.raises(MedusaError, match="timed with a prefix layer, but these heads have none"):
        CostCurve.load(timed, head_type="sequential", prefix_layer=False)
    bench = tmp_path / "bench.json"
    meta = {"device_type": "cpu", "heads": {"head_type": "medusa", "prefix_layer": False}}
    bench.write_text(json.dumps({"meta": meta, "points": [{"nodes": 1, "median_ms": 5.0}]}))
    with pytest.raises(MedusaError, match=r"timed without a prefix layer.*medusa bench --cost-curve --prefix-layer"):
        CostCurve.load(bench, head_type="medusa", prefix_layer=True)
    old = tmp_path / "old.json"  # from before the prefix layer: timed without one
    old.write_text(json.dumps({"points": [{"nodes": 1, "seconds": 0.01}]}))
    assert not CostCurve.load(old, prefix_layer=False).prefix_layer


def test_tuned_trees_are_kept_per_device_kind(tmp_path):
    assert device_kind("cpu") == "cpu"
    write_tuned_tree(tmp_path, "cpu", TunedTree(nodes=3, topk=2, paths=[[0], [1]], num_heads=2))
    write_tuned_tree(tmp_path, "NVIDIA H100 80GB HBM3", TunedTree(nodes=2, topk=1, paths=[[0]], num_heads=2))
    assert set(read_tuned_trees(tmp_path)) == {"cpu", "NVIDIA H100 80GB HBM3"}
    assert tuned_tree(tmp_path, "cpu", num_heads=2).paths == ((0,), (1,))
    assert tuned_tree(tmp_path / "elsewhere", "cpu", num_heads=2) is None
    with pytest.raises(MedusaError, match="tuned for 2 heads, but these heads have 3"):
        tuned_tree(tmp_path, "cpu", num_heads=3)
    write_tuned_tree(tmp_path, "cpu", TunedTree(topk=2, paths=[[0], [1], [0, 0, 0]]))
    with pytest.raises(MedusaError, match=r"tuned tree for 'cpu'.*3 deep but there are only 2 heads"):
        tuned_tree(tmp_path, "cpu", num_heads=2)


def test_loading_heads_prefers_the_tree_tuned_for_this_device(tmp_path):
    base = make_tiny_model("llama")
    heads_dir = tmp_path / "heads"
    fresh_heads(base, num_heads=2).save_pretrained(heads_dir)
    (heads_dir / "tree.json").write_text(Tree.from_paths([[0], [0, 0]]).to_json())
    assert MedusaModel.from_pretrained(base, heads=heads_dir).tree.paths == ((0,), (0, 0))  # no tuned tree yet

    write_tuned_tree(heads_dir, "cpu", TunedTree(topk=3, paths=[[0], [1], [2], [0, 0]], num_heads=2))
    write_tuned_tree(heads_dir, "Some GPU", TunedTree(topk=1, paths=[[0]], num_heads=2))
    model = MedusaModel.from_pretrained(base, heads=heads_dir)
    assert model.tree.paths == ((0,), (1,), (2,), (0, 0)) and model.tree.topk == 3
    # an explicit tree wins
    assert MedusaModel.from_pretrained(base, heads=heads_dir, tree="8").tree.size == 8
    # a broken tuned file is reported, not ignored
    (heads_dir / TUNED_FILE).write_text("{not json")
    with pytest.raises(MedusaError, match="tuned trees .* is not valid JSON"):
        MedusaModel.from_pretrained(base, heads=heads_dir)


def test_a_gpu_without_a_tree_of_its_own_borrows_another_gpus(tmp_path, monkeypatch):
    """The shipped heads are tuned on the GPUs this project was lent: an H200 without its own entry decodes with the
    H100's trees (lookup chain and per-bucket trees included), says so, and takes its own entry once tuned."""
    kinds = {"cuda": "NVIDIA H200", "cpu": "cpu"}
    monkeypatch.setattr(tuned_trees, "device_kind", lambda device: kinds[torch.device(device).type])
    h100 = TunedTree(
        topk=2,
        paths=[[0], [1], [0, 0]],
        num_heads=2,
        chained=ChainedTree(paths=[[0]], lookup=3),
        batches={8: BatchTree(paths=[[0]], lookup=2)},
    )
    write_tuned_tree(tmp_path, "NVIDIA H100 80GB HBM3", h100)
    (tmp_path / "tree.json").write_text(Tree.from_paths([[0], [0, 0]]).to_json())
    choice = tuned_trees.choose_tree(tmp_path, "cuda", num_heads=2)
    assert (choice.tree.paths, choice.tree.lookup) == (((0,),), 3)
    assert choice.heads_tree.paths == ((0,), (1,), (0, 0))
    assert {bucket: (tree.paths, tree.lookup) for bucket, tree in choice.batch_trees.items()} == {8: (((0,),), 2)}
    assert not choice.tuned
    assert "'NVIDIA H100 80GB HBM3'" in choice.origin and "no tree is tuned for 'NVIDIA H200'" in choice.origin
    # a CPU never takes a GPU's tree: every node costs it time
    assert tuned_trees.choose_tree(tmp_path, "cpu", num_heads=2).tree.paths == ((0,), (0, 0))
    # its own entry, once tuned, wins
    write_tuned_tree(tmp_path, "NVIDIA H200", TunedTree(topk=1, paths=[[0], [0, 0]], num_heads=2))
    choice = tuned_trees.choose_tree(tmp_path, "cuda", num_heads=2)
    assert choice.tuned and choice.tree.paths == ((0,), (0, 0)) and choice.batch_trees == {}


def test_step_timing_runs_the_real_decoder(tmp_path):
    base = make_tiny_model("llama")
    model = MedusaModel.from_pretrained(base, heads=fresh_heads(base, num_heads=2))
    seconds = measure_step_seconds(model, Tree.from_paths([[0], [1], [0, 0]]), context=8, steps=3, repeats=1)
    assert 0 < seconds < 1


def test_a_one_node_tree_decodes_plainly_without_running_the_heads():
    base = make_tiny_model("llama")
    model = MedusaModel.from_pretrained(base, heads=fresh_heads(base, num_heads=2), tree=[])
    engine = model.engine(EngineOptions(), max_length=8)
    assert engine.decoder.heads is None and engine.decoder.trees[1].size == 1
    plain = model.generate([5, 6, 7], max_new_tokens=6, use_heads=False).token_ids
    assert model.generate([5, 6, 7], max_new_tokens=6).token_ids == plain


def test_a_lookup_chain_is_chosen_when_its_nodes_pay_on_the_cost_curve():
    # (heads' tree nodes, chain nodes) -> tokens per step; the cost depends on the total only
    expected = {(8, 0): 2.5, (16, 0): 2.8, (4, 4): 2.6, (8, 8): 3.4, (12, 4): 3.0, (1, 8): 2.0, (4, 12): 3.3}
    flat = CostCurve({8: 0.010, 16: 0.011})
    choice = choose_tree(expected, flat)
    assert (choice.nodes, choice.lookup, choice.total_nodes) == (8, 8, 16)
    assert choice.expected_tokens_per_second == pytest.approx(3.4 / 0.011)
    assert choice.tokens_per_second == pytest.approx({8: 250, 16: 2.8 / 0.011})  # heads' trees alone
    assert choice.lookup_tokens_per_second[16] == (8, pytest.approx(3.4 / 0.011))  # the best chain of 16 nodes
    assert choice.lookup_tokens_per_second[8] == (4, pytest.approx(260))
    # where every node costs its full price, the chain does not pay either
    steep = CostCurve({1: 0.01, 8: 0.08, 9: 0.09, 16: 0.16})
    assert choose_tree(expected | {(1, 0): 1.0}, steep).total_nodes == 1
    # ties go to fewer nodes, then to the shorter chain
    assert choose_tree({(4, 4): 2.0, (8, 0): 2.0, (2, 2): 1.0}, CostCurve({4: 0.01, 8: 0.02})).lookup == 2
    assert (lambda c: (c.nodes, c.lookup))(choose_tree({(4, 4): 2.0, (8, 0): 2.0}, flat)) == (8, 0)


def test_the_tuned_lookup_tree_drives_decoding_and_lookup_0_takes_the_plain_one(tmp_path):
    base = make_tiny_model("llama")
    heads_dir = tmp_path / "heads"
    fresh_heads(base, num_heads=2).save_pretrained(heads_dir)
    entry = TunedTree(
        topk=2, paths=[[0], [1], [0, 0]], num_heads=2, chained=ChainedTree(topk=1, paths=[[0]], lookup=6, nodes=8)
    )
    write_tuned_tree(heads_dir, "cpu", entry)
    assert tuned_tree(heads_dir, "cpu", num_heads=2).lookup == 0
    chained = tuned_tree(heads_dir, "cpu", num_heads=2, chained=True)
    assert (chained.paths, chained.lookup, chained.size) == (((0,),), 6, 8)

    model = MedusaModel.from_pretrained(base, heads=heads_dir)
    assert model.tree.lookup == 6 and model.heads_tree.paths == ((0,), (1,), (0, 0)) and model.heads_tree.lookup == 0
    assert model.tree_for(EngineOptions()).lookup == 6
    plain = model.tree_for(EngineOptions(lookup=0))
    assert (plain.paths, plain.lookup) == (((0,), (1,), (0, 0)), 0)
    assert model.tree_for(EngineOptions(lookup=3)).lookup == 3
    assert model.tree_for(EngineOptions(use_heads=False)).size == 1
    assert model.tree_for(EngineOptions(lookup=0), rows=4).paths == ((0,), (1,), (0, 0))
    # every tree decodes the same greedy text
    reference = model.generate([5, 6, 7], max_new_tokens=12, use_heads=False).token_ids
    for lookup in (None, 0, 3):
        assert model.generate([5, 6, 7], max_new_tokens=12, lookup=lookup).token_ids == reference

    write_tuned_tree(heads_dir, "cpu", replace(entry, chained=ChainedTree(paths=[[0]], lookup=40)))
    with pytest.raises(MedusaError, match=r"its lookup tree.*lookup nodes must be an integer from 0"):
        tuned_tree(heads_dir, "cpu", num_heads=2, chained=True)


def test_the_shipped_tuned_trees_read_and_write_back_unchanged(tmp_path):
    """The file format is the dataclass's: every entry written by earlier tuners reads and writes back as it was."""
    from medusa.loading import DEFAULT_MODEL_NAME
    from medusa.model import shipped_heads_directory

    shipped = shipped_heads_directory(DEFAULT_MODEL_NAME)
    written = json.loads((shipped / TUNED_FILE).read_text())["devices"]
    for kind, tuned in read_tuned_trees(shipped).items():
        entry = tuned.to_json()
        assert {key: value for key, value in entry.items() if key in written[kind] or value is not None} == written[
            kind
        ]
        write_tuned_tree(tmp_path, kind, tuned)
    assert read_tuned_trees(tmp_path) == read_tuned_trees(shipped)
    copied, original = (tuned_tree(directory, "cpu", num_heads=4) for directory in (tmp_path, shipped))
    assert (copied.paths, copied.topk, copied.lookup) == (original.paths, original.topk, original.lookup)
