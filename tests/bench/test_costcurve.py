"""The cost curve on a tiny random shape on the CPU: trees of each size, the floor, the JSON and the plot."""

from __future__ import annotations

import json

import pytest
import torch

from medusa.bench.costcurve import (
    DEFAULT_SIZES,
    SHAPES,
    CostCurveConfig,
    cost_curve,
    parameter_bytes,
    random_model,
    tree_of_size,
    validate_cost_curve,
)
from medusa.cli import main
from medusa.engine import EngineOptions
from medusa.errors import MedusaError
from medusa.heads import MedusaHeads, MedusaHeadsConfig
from medusa.model import MedusaModel
from medusa.treeopt.tune import CostCurve


@pytest.mark.parametrize("num_heads", [4, 5])
def test_trees_of_every_default_size_up_to_256_nodes(num_heads):
    for size in DEFAULT_SIZES:
        tree = tree_of_size(size, num_heads)
        assert tree.size == size
        assert tree.max_depth <= num_heads
    assert tree_of_size(256, 5).max_depth == 5


def test_a_tree_beyond_what_the_prior_holds_is_a_user_error():
    assert tree_of_size(11, 1).size == 11  # one head, ten ranks
    with pytest.raises(MedusaError, match="cannot make a 12-node tree"):
        tree_of_size(12, 1)


def test_random_shapes_have_their_published_sizes_and_requested_dtype():
    model = random_model("tiny", torch.device("cpu"), torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    assert model.config.hidden_size == SHAPES["tiny"]["hidden_size"]
    assert parameter_bytes(model) == 2 * sum(p.numel() for p in model.parameters())
    with pytest.raises(MedusaError, match="unknown shape 'gpt-5'"):
        random_model("gpt-5", torch.device("cpu"), torch.float32)


def test_tied_embeddings_count_once():
    model = random_model("tiny", torch.device("cpu"), torch.float32)
    untied = parameter_bytes(model)
    model.lm_head.weight = model.model.embed_tokens.weight
    hidden, vocab = SHAPES["tiny"]["hidden_size"], SHAPES["tiny"]["vocab_size"]
    assert parameter_bytes(model) == untied - 4 * hidden * vocab


def tiny_medusa(num_heads: int = 5) -> MedusaModel:
    base = random_model("tiny", torch.device("cpu"), torch.float32)
    heads = MedusaHeadsConfig(hidden_size=64, vocab_size=256, num_heads=num_heads, share_lm_head=True)
    return MedusaModel.from_pretrained(base, heads=heads)


def test_cost_curve_measures_each_size_against_the_floor(one_thread):
    config = CostCurveConfig(sizes=(16, 1, 4), context=32, repeats=3, warmup=1)
    messages = []
    result = cost_curve(tiny_medusa(), config, progress=messages.append)
    assert [p["nodes"] for p in result["points"]] == [1, 4, 16]
    assert [p["depth"] for p in result["points"]] == [0, tree_of_size(4, 5).max_depth, tree_of_size(16, 5).max_depth]
    assert result["points"][0]["x_one_token"] == 1.0
    assert result["weight_bytes"] == parameter_bytes(random_model("tiny", torch.device("cpu"), torch.float32))
    assert result["bandwidth_bytes_per_s"] > 0
    assert result["floor_ms"] == pytest.approx(1e3 * result["weight_bytes"] / result["bandwidth_bytes_per_s"])
    for point in result["points"]:
        assert 0 < point["min_ms"] <= point["p10_ms"] <= point["median_ms"] <= point["p90_ms"] <= point["max_ms"]
        assert point["x_floor"] == pytest.approx(point["median_ms"] / result["floor_ms"])
    assert len(messages) == 3


def test_cost_curve_with_a_lookup_chain_times_trees_holding_it(one_thread, monkeypatch):
    from medusa.bench import costcurve

    built = []
    real = MedusaModel.engine

    def spy(self, options=EngineOptions(), tree=None, max_rows=1, max_length=0):
        engine = real(self, options, tree, max_rows, max_length)
        built.append(engine.decoder.trees[1])
        return engine

    monkeypatch.setattr(MedusaModel, "engine", spy)
    config = CostCurveConfig(sizes=(5, 12), context=32, repeats=2, warmup=0, lookup=4)
    result = costcurve.cost_curve(tiny_medusa(), config)
    assert [(p["nodes"], p["lookup"], p["depth"]) for p in result["points"]] == [(5, 4, 4), (12, 4, 4)]
    assert [(tree.size, tree.lookup) for tree in built] == [(5, 4), (12, 4)]
    assert built[0].paths == () and len(built[1].paths) == 7  # 5 nodes: the root and the chain alone
    with pytest.raises(MedusaError, match="every tree size must exceed 4"):
        CostCurveConfig(sizes=(4, 8), lookup=4)
    with pytest.raises(MedusaError, match="lookup nodes must be an integer from 0"):
        CostCurveConfig(lookup=99)


def test_cost_curve_over_batch_sizes(one_thread):
    config = CostCurveConfig(sizes=(1, 4), context=16, repeats=2, warmup=0, batch_sizes=(1, 4))
    result = cost_curve(tiny_medusa(), config)
    assert [(p["batch"], p["nodes"]) for p in result["points"]] == [(1, 1), (1, 4), (4, 1), (4, 4)]
    assert all(
        p["x_one_token"]
        == pytest.approx(
            p["median_ms"]
            / next(q["median_ms"] for q in result["points"] if q["batch"] == p["batch"] and q["nodes"] == 1)
        )
        for p in result["points"]
    )
    with pytest.raises(MedusaError, match="batch sizes must be batch buckets"):
        CostCurveConfig(batch_sizes=(3,))


def test_cost_curve_steps_attend_over_the_span_its_step_sets(one_thread):
    for span_step, attended in ((128, 256), (None, 256 + 1)):
        config = CostCurveConfig(sizes=(1,), context=200, repeats=1, warmup=0, span_step=span_step)
        point = cost_curve(tiny_medusa(), config)["points"][0]
        assert point["attention_span"] == attended  # 201 slots in use at context 200; 256 slots and the root


def test_cost_curve_refuses_a_context_beyond_the_model():
    config = CostCurveConfig(sizes=(1, 8), context=SHAPES["tiny"]["max_position_embeddings"], repeats=1, warmup=0)
    with pytest.raises(MedusaError, match="exceeds the model's"):
        cost_curve(tiny_medusa(), config)


def test_config_checks():
    with pytest.raises(MedusaError, match="tree sizes"):
        CostCurveConfig(sizes=(0, 4))
    with pytest.raises(MedusaError, match="repeats"):
        CostCurveConfig(repeats=0)
    with pytest.raises(MedusaError, match="span_step must be a positive number of slots or None, got -4"):
        CostCurveConfig(span_step=-4)


def test_cost_curve_command_writes_json_and_png(tmp_path, one_thread, capsys):
    code = main(
        [
            "bench",
            "--cost-curve",
            "--shape",
            "tiny",
            "--sizes",
            "1,8",
            "--context",
            "16",
            "--repeats",
            "2",
            "--step-warmup",
            "1",
            "--device",
            "cpu",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert code == 0
    result = json.loads((tmp_path / "cost_curve.json").read_text())
    validate_cost_curve(result)
    assert result["meta"]["model"] == "tiny (random weights)" and result["meta"]["dtype"] == "float32"
    assert result["meta"]["context"] == 16 and result["meta"]["heads"]["share_lm_head"] is True
    assert result["meta"]["cuda_graphs"] is False  # what ran: the CPU steps eagerly
    assert [p["nodes"] for p in result["points"]] == [1, 8]
    assert (tmp_path / "cost_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "cost_curve.json" in capsys.readouterr().out
    assert result["meta"]["heads"]["head_type"] == "sequential"  # the default: the shipped heads' type
    assert main(["bench", "--cost-curve", "--sizes", "1,x"]) == 2
    assert "--sizes takes comma-separated" in capsys.readouterr().err


def test_the_cost_curve_of_sequential_heads_times_them_and_says_so(tmp_path, one_thread, capsys):
    argv = ["bench", "--cost-curve", "--shape", "tiny", "--sizes", "1,8", "--context", "16", "--repeats", "1"]
    argv += ["--step-warmup", "0", "--device", "cpu", "--head-type", "sequential", "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    result = json.loads((tmp_path / "cost_curve.json").read_text())
    assert result["meta"]["heads"]["head_type"] == "sequential"
    assert CostCurve.load(tmp_path / "cost_curve.json", head_type="sequential").points.keys() == {1, 8}
    with pytest.raises(MedusaError, match="measured with sequential heads"):
        CostCurve.load(tmp_path / "cost_curve.json", head_type="medusa")


def test_the_cost_curve_of_heads_with_a_prefix_layer_times_it_and_says_so(tmp_path, one_thread):
    argv = ["bench", "--cost-curve", "--shape", "tiny", "--sizes", "1,8", "--context", "16", "--repeats", "1"]
    argv += ["--step-warmup", "0", "--device", "cpu", "--head-type", "sequential", "--prefix-layer"]
    assert main([*argv, "--output-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "cost_curve.json").read_text())
    assert result["meta"]["heads"]["prefix_layer"] is True
    assert CostCurve.load(tmp_path / "cost_curve.json", head_type="sequential", prefix_layer=True).prefix_layer


def test_a_shapes_curve_times_trained_heads_from_their_directory(tmp_path, one_thread, capsys):
    """``--shape S --heads DIR``: the heads' own layers, type and prefix layer on a random base of their model's
    shape, so a device's curve for trained heads needs no copy of the model; heads of another size are refused."""
    base = random_model("tiny", torch.device("cpu"), torch.float32)
    trained = MedusaHeadsConfig(
        hidden_size=64, vocab_size=256, num_heads=3, num_layers=2, share_lm_head=True, head_type="medusa"
    )
    MedusaModel.from_pretrained(base, heads=trained).save_pretrained(tmp_path / "heads")
    argv = ["bench", "--cost-curve", "--shape", "tiny", "--heads", str(tmp_path / "heads"), "--sizes", "1,8"]
    argv += ["--context", "16", "--repeats", "1", "--step-warmup", "0", "--device", "cpu"]
    assert main([*argv, "--output-dir", str(tmp_path / "curve")]) == 0
    heads = json.loads((tmp_path / "curve" / "cost_curve.json").read_text())["meta"]["heads"]
    assert heads == {
        "num_heads": 3,
        "num_layers": 2,
        "share_lm_head": True,
        "head_type": "medusa",
        "prefix_layer": False,
    }  # the directory's heads, not the fresh ones --num-heads/--head-type would make (4, sequential)
    capsys.readouterr()
    assert main([*argv, "--prefix-layer", "--output-dir", str(tmp_path / "other")]) == 2
    assert "the heads in --heads carry their own" in capsys.readouterr().err
    small = MedusaHeadsConfig(hidden_size=32, vocab_size=256, num_heads=2)
    MedusaHeads(small).save_pretrained(tmp_path / "small")
    argv[argv.index(str(tmp_path / "heads"))] = str(tmp_path / "small")
    assert main([*argv, "--output-dir", str(tmp_path / "other")]) == 2
    assert "heads hidden size 32 does not match the base model's 64" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
