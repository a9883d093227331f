"""``medusa tree profile | build | tune | evaluate`` end to end on a saved tiny model and its untrained heads."""

from __future__ import annotations

import json

import pytest

from helpers.treeopt import save_tiny_setup, tiny_tokenizer, write_conversations
from medusa.cli import main
from medusa.model import MedusaModel
from medusa.tree import Tree
from medusa.treeopt.profile import HeadProfile
from medusa.tuned_trees import TUNED_FILE, read_tuned_trees


def tuned_entries(heads_dir) -> dict[str, dict]:
    """The tuned trees as written on disk: the file format, not its reader, is what later releases must read."""
    return json.loads((heads_dir / TUNED_FILE).read_text())["devices"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    directory = tmp_path_factory.mktemp("treeopt-cli")
    model_dir, heads_dir, model = save_tiny_setup(directory, num_heads=3)
    data = write_conversations(directory / "distilled.jsonl", model, tiny_tokenizer(), count=3, new_tokens=24)
    return directory, model_dir, heads_dir, data


def test_profile_build_tune_evaluate(workspace, capsys):
    directory, model_dir, heads_dir, data = workspace
    common = ["--model", str(model_dir), "--heads", str(heads_dir), "--device", "cpu"]

    assert main(["tree", "profile", *common, "--data", str(data), "--topk", "4"]) == 0
    profile = HeadProfile.load(heads_dir / "tree_profile.json")
    assert (profile.num_heads, profile.topk, len(profile.accuracy), len(profile.accuracy[0])) == (3, 4, 3, 4)
    assert profile.samples > 0 and profile.heads_fingerprint.startswith("sha256:")
    assert profile.position_ranks.positions == profile.samples  # kept for the walk estimate
    assert "profiled 3 heads" in capsys.readouterr().out

    assert (
        main(["tree", "build", "--heads", str(heads_dir), "--nodes", "6", "--plot-dir", str(directory / "plots")]) == 0
    )
    out = capsys.readouterr().out
    tree = Tree.from_paths(json.loads((heads_dir / "tree.json").read_text())["paths"])
    assert tree.size <= 6 and "expected accepted tokens per step" in out
    assert (directory / "plots" / "accept_length.png").stat().st_size > 0
    assert (directory / f"plots/tree_{tree.size}.png").is_file()

    curve = directory / "curves" / "cost.json"  # a folder that does not exist yet is made, not a crash after timing
    assert (
        main(
            [
                "tree",
                "tune",
                *common,
                "--sizes",
                "1,2,4",
                "--context",
                "8",
                "--steps",
                "2",
                "--repeats",
                "1",
                "--save-cost-curve",
                str(curve),
                "--plot-dir",
                str(directory / "plots"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    entry = tuned_entries(heads_dir)["cpu"]
    assert "<- chosen" in out and entry["nodes"] in (1, 2, 3, 4) and entry["num_heads"] == 3
    assert entry["estimate"] == "walk"  # the default, since the profile has the walk data
    assert json.loads(curve.read_text())["device"] == "cpu"
    assert json.loads(curve.read_text())["head_type"] == "medusa"  # timed with these heads
    assert (directory / "plots" / "tokens_per_second_cpu.png").is_file()
    loaded = MedusaModel.from_pretrained(str(model_dir), heads=str(heads_dir), device="cpu")
    assert [list(p) for p in loaded.tree.paths] == entry["paths"]

    # a given cost curve is used as is: free nodes make the largest measured tree the best
    flat = directory / "flat.json"
    flat.write_text(json.dumps({"device": "Fancy GPU", "points": [{"nodes": n, "seconds": 0.01} for n in (1, 2, 4)]}))
    assert main(["tree", "tune", "--heads", str(heads_dir), "--cost-curve", str(flat)]) == 0
    assert tuned_entries(heads_dir)["Fancy GPU"]["nodes"] == 4
    # a size limit is kept with the choice it bounded
    assert main(["tree", "tune", "--heads", str(heads_dir), "--cost-curve", str(flat), "--max-nodes", "2"]) == 0
    assert {k: tuned_entries(heads_dir)["Fancy GPU"][k] for k in ("nodes", "max_nodes")} == {"nodes": 2, "max_nodes": 2}
    assert tuned_entries(heads_dir)["cpu"] == entry  # other devices are kept

    results = directory / "evaluate.json"
    assert (
        main(
            [
                "tree",
                "evaluate",
                *common,
                "--data",
                str(data),
                "--limit",
                "2",
                "--sizes",
                "4,8",
                "--default-trees",
                "--tuned",
                "--max-new-tokens",
                "8",
                "--output",
                str(results),
            ]
        )
        == 0
    )
    assert "% vs measured)" in capsys.readouterr().out  # what the estimate's error is relative to
    rows = {row["tree"]: row for row in json.loads(results.read_text())["results"]}
    assert set(rows) == {"greedy-4", "greedy-8", "default-8", "tuned"}
    assert all(row["mean_accepted"] >= 1 and row["new_tokens"] == 16 for row in rows.values())
    assert all(row["expected_walk"] >= 1 for row in rows.values())


def test_a_profile_without_walk_data_falls_back_to_joint(workspace, tmp_path, capsys):
    directory, model_dir, heads_dir, data = workspace
    old = tmp_path / "old.json"
    old.write_text(
        json.dumps(
            {
                "num_heads": 3,
                "topk": 4,
                "samples": 10,
                "accuracy": [[0.5, 0, 0, 0]] * 3,
                "path_counts": [[[0], 5], [[0, 0], 2]],
            }
        )
    )
    common = [
        "tree",
        "build",
        "--heads",
        str(heads_dir),
        "--profile",
        str(old),
        "--nodes",
        "3",
        "--output",
        str(tmp_path / "tree.json"),
    ]
    assert main(common) == 0
    captured = capsys.readouterr()
    assert "predates the walk estimate" in captured.err and "medusa tree profile" in captured.err
    assert "1.700 (joint)" in captured.out and "(walk)" not in captured.out
    assert main([*common, "--estimate", "walk"]) == 2
    assert "run `medusa tree profile` again" in capsys.readouterr().err


def test_mismatched_profile_or_heads_is_refused(workspace, tmp_path, capsys):
    directory, model_dir, heads_dir, data = workspace
    other = tmp_path / "profile.json"
    other.write_text(json.dumps({"num_heads": 2, "topk": 4, "samples": 10, "accuracy": [[0.5, 0, 0, 0]] * 2}))
    assert main(["tree", "build", "--heads", str(heads_dir), "--profile", str(other), "--nodes", "4"]) == 2
    assert "measured on 2 heads, but these heads have 3" in capsys.readouterr().err

    other.write_text(
        json.dumps(
            {
                "num_heads": 3,
                "topk": 4,
                "samples": 10,
                "accuracy": [[0.5, 0, 0, 0]] * 3,
                "heads_fingerprint": "sha256:0123456789abcdef",
            }
        )
    )
    assert main(["tree", "build", "--heads", str(heads_dir), "--profile", str(other), "--nodes", "4"]) == 2
    assert "other heads weights" in capsys.readouterr().err

    assert main(["tree", "build", "--heads", str(tmp_path / "none"), "--nodes", "4"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_sequential_heads_are_profiled_and_tuned_only_with_their_own_profile_and_cost_curve(
    workspace, tmp_path, capsys
):
    directory, model_dir, _, data = workspace
    base = MedusaModel.from_pretrained(str(model_dir), num_heads=3, head_type="sequential", device="cpu")
    heads_dir = tmp_path / "sequential"
    base.heads.save_pretrained(heads_dir)
    common = ["--model", str(model_dir), "--heads", str(heads_dir), "--device", "cpu"]
    assert main(["tree", "profile", *common, "--data", str(data), "--topk", "4"]) == 0
    assert json.loads((heads_dir / "tree_profile.json").read_text())["head_type"] == "sequential"
    capsys.readouterr()

    medusa_profile = tmp_path / "medusa_profile.json"  # names no head type: made for Medusa heads
    medusa_profile.write_text(json.dumps({"num_heads": 3, "topk": 4, "samples": 10, "accuracy": [[0.5, 0, 0, 0]] * 3}))
    assert main(["tree", "build", "--heads", str(heads_dir), "--profile", str(medusa_profile), "--nodes", "4"]) == 2
    assert "measured on medusa heads, but these heads are sequential" in capsys.readouterr().err

    points = [{"nodes": n, "seconds": 0.01} for n in (1, 4, 8)]
    curve = tmp_path / "curve.json"
    curve.write_text(json.dumps({"device": "Some GPU", "points": points}))  # timed with Medusa heads
    tune = ["tree", "tune", "--heads", str(heads_dir), "--cost-curve", str(curve), "--dry-run"]
    assert main(tune) == 2
    assert "cost curve" in (err := capsys.readouterr().err) and "measured with medusa heads" in err
    assert "--head-type sequential" in err
    curve.write_text(json.dumps({"device": "Some GPU", "head_type": "sequential", "points": points}))
    assert main(tune) == 0 and "<- chosen" in capsys.readouterr().out


def test_tune_and_evaluate_with_a_lookup_chain(workspace, tmp_path, capsys):
    directory, model_dir, heads_dir, data = workspace
    common = ["--model", str(model_dir), "--heads", str(heads_dir), "--device", "cpu"]
    profile_path = tmp_path / "profile.json"
    assert main(["tree", "profile", *common, "--data", str(data), "--topk", "4", "--output", str(profile_path)]) == 0
    assert "with a 10-node lookup chain besides (walk)" in capsys.readouterr().out
    assert HeadProfile.load(profile_path).position_ranks.lookup is not None

    heads = ["--heads", str(heads_dir), "--profile", str(profile_path)]
    curve = tmp_path / "curve.json"
    curve.write_text(json.dumps({"device": "Chain GPU", "points": [{"nodes": n, "seconds": 0.01} for n in (1, 4, 8)]}))
    assert main(["tree", "tune", *heads, "--cost-curve", str(curve), "--lookup", "4"]) == 0
    out = capsys.readouterr().out
    entry = tuned_entries(heads_dir)["Chain GPU"]
    assert "chain" in out and "best with a lookup chain" in out
    chained = entry["lookup"]
    assert chained["lookup"] == 4 and chained["nodes"] in (4, 8) and len(chained["paths"]) + 1 + 4 == chained["nodes"]
    assert entry["nodes"] == 8 and "lookup" not in Tree.from_paths(entry["paths"]).to_json()

    assert main(["tree", "tune", *heads, "--cost-curve", str(curve), "--lookup", "0"]) == 0
    assert "lookup" not in tuned_entries(heads_dir)["Chain GPU"] and "chain" not in capsys.readouterr().out
    assert main(["tree", "tune", *heads, "--cost-curve", str(curve), "--lookup", "99"]) == 2
    assert "--lookup must be auto or a number of nodes from 0 to 24, got 99" in capsys.readouterr().err

    results = tmp_path / "evaluate.json"
    assert (
        main(
            [
                "tree",
                "evaluate",
                *common,
                "--profile",
                str(profile_path),
                "--data",
                str(data),
                "--limit",
                "2",
                "--sizes",
                "4",
                "--lookup",
                "0,3",
                "--max-new-tokens",
                "8",
                "--output",
                str(results),
            ]
        )
        == 0
    )
    rows = {row["tree"]: row for row in json.loads(results.read_text())["results"]}
    assert (
        set(rows) == {"greedy-4", "greedy-4+lookup-3"}
        and rows["greedy-4+lookup-3"]["nodes"] == rows["greedy-4"]["nodes"] + 3
    )
    assert rows["greedy-4+lookup-3"]["expected_walk"] >= rows["greedy-4"]["expected_walk"]
    assert "expected_joint" not in rows["greedy-4+lookup-3"]
    assert main(["tree", "evaluate", *common, "--data", str(data), "--lookup", "2,x"]) == 2
    assert "--lookup must list chain lengths" in capsys.readouterr().err


def test_shipped_heads_are_never_written(workspace, tmp_path, monkeypatch, capsys):
    """profile, build and tune on the package's own heads write to the user's copy under the cache, which loading
    reads."""
    import hashlib
    import shutil

    import medusa.paths

    directory, model_dir, heads_dir, data = workspace
    shipped_root = tmp_path / "assets" / "heads"
    shipped = shipped_root / "smollm2-135m-instruct"
    shutil.copytree(heads_dir, shipped, ignore=shutil.ignore_patterns("tree*.json", "tuned_trees.json"))
    monkeypatch.setattr(medusa.paths, "SHIPPED_HEADS", shipped_root)
    monkeypatch.setenv("MEDUSA_CACHE_DIR", str(tmp_path / "cache"))
    user = tmp_path / "cache" / "heads" / "smollm2-135m-instruct"

    def snapshot() -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(shipped.iterdir())}

    before = snapshot()
    common = ["--model", str(model_dir), "--heads", str(shipped), "--device", "cpu"]
    assert main(["tree", "profile", *common, "--data", str(data), "--topk", "4"]) == 0
    assert main(["tree", "build", "--nodes", "4"]) == 0  # --heads left out: the shipped heads
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"device": "cpu", "points": [{"nodes": n, "seconds": 0.01 * n} for n in (1, 2, 4)]}))
    assert main(["tree", "tune", "--heads", str(shipped), "--cost-curve", str(flat)]) == 0
    err = capsys.readouterr().err
    assert snapshot() == before
    assert {p.name for p in user.iterdir()} == {"tree_profile.json", "tree.json", "tuned_trees.json"}
    assert f"writing tree.json to {user}" in err
    loaded = MedusaModel.from_pretrained(str(model_dir), heads=str(shipped), device="cpu")
    assert [list(p) for p in loaded.tree.paths] == read_tuned_trees(shipped)["cpu"].paths
    assert loaded.tree_choice.tuned and str(user) in loaded.tree_choice.origin


@pytest.mark.parametrize(
    "command, words",
    [
        ("profile", "tree_profile.json"),
        ("build", "greedy construction"),
        ("tune", "tuned_trees.json"),
        ("evaluate", "relative to the measured"),
    ],
)
def test_every_tree_command_describes_itself(command, words, capsys):
    with pytest.raises(SystemExit):
        main(["tree", command, "--help"])
    assert words in " ".join(capsys.readouterr().out.split())
