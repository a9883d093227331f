"""``medusa bench`` end to end on a tiny saved model with a character tokenizer, and the runner's config."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from helpers.bench import run_bench
from medusa.bench.report import validate_report
from medusa.bench.runner import BenchConfig, encode_turn, planned_runs, resolve_cache_length
from medusa.bench.specbench import load_questions, select_questions, turn_messages
from medusa.cli import main
from medusa.errors import MedusaError
from medusa.model import MedusaModel


def test_bench_runs_all_methods_on_both_turns_and_writes_json_png_summary(
    tiny_model_dir, questions_file, tmp_path, one_thread, capsys
):
    assert run_bench(tiny_model_dir, questions_file, tmp_path, "--turns", "2") == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    validate_report(report)
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "| prompt-lookup |" in (tmp_path / "summary.md").read_text()
    assert list(report["methods"]) == [
        "autoregressive",
        "medusa",
        "hf-generate",
        "prompt-lookup",
        "medusa-lookup",
        "lookup",
    ]
    # One question per category; writing and roleplay have a second turn.
    rows = [(q["id"], q["turn"]) for q in report["questions"]]
    assert rows == [(1, 1), (1, 2), (3, 1), (3, 2), (4, 1), (6, 1)]
    first, second = report["questions"][0], report["questions"][1]
    assert second["prompt_tokens"] > first["prompt_tokens"]  # the first answer is part of the second prompt
    # Float32 on the CPU: Medusa and transformers are token for token our plain greedy decoding.
    assert report["equality"]["compared"] == 6
    assert report["equality"]["mismatches"] == 0 and report["equality"]["first_mismatch"] is None
    for method in ("hf-generate", "medusa-lookup", "lookup"):
        assert report["equality"]["others"][method] | {"first_mismatch": None} == {
            "reference": "autoregressive",
            "method": method,
            "compared": 6,
            "mismatches": 0,
            "first_mismatch": None,
        }
    for question in report["questions"]:
        tokens = {name: sample["tokens"] for name, sample in question["methods"].items()}
        assert tokens["autoregressive"] == tokens["medusa"] == tokens["hf-generate"] == tokens["lookup"]
        assert 1 <= tokens["autoregressive"] <= 12
    overall = {name: result["overall"] for name, result in report["methods"].items()}
    assert overall["autoregressive"]["mean_accepted"] == 1.0 and overall["hf-generate"]["mean_accepted"] == 1.0
    assert overall["autoregressive"]["speedup"] == pytest.approx(1.0)
    assert overall["medusa"]["steps"] <= overall["autoregressive"]["steps"]
    assert set(report["methods"]["medusa"]["per_category"]) == {"writing", "roleplay", "qa", "translation"}
    assert report["meta"]["tree_size"] == 8 and report["meta"]["max_new_tokens"] == 12
    assert report["meta"]["lookup_nodes"] == 10 and report["meta"]["lookup_tree_size"] == 18
    assert "medusa-lookup: 18 nodes, 10 of them a lookup chain" in (tmp_path / "summary.md").read_text()
    assert report["meta"]["heads_source"].startswith("untrained")
    # What ran, not what was asked: graphs (asked for by default) exist only on a GPU.
    assert report["meta"]["cuda_graphs"] is torch.cuda.is_available() and report["meta"]["compile"] is False
    out = capsys.readouterr().out
    assert "0 of 6 prompts differ" in out and "bench.json" in out


def test_bench_runs_a_subset_of_methods(tiny_model_dir, questions_file, tmp_path, one_thread):
    code = run_bench(
        tiny_model_dir, questions_file, tmp_path, "--methods", "hf-generate,autoregressive", "--categories", "qa"
    )
    assert code == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert list(report["methods"]) == ["hf-generate", "autoregressive"]
    assert [q["id"] for q in report["questions"]] == [4]
    assert report["equality"]["compared"] == 0
    assert report["equality"]["others"]["hf-generate"]["compared"] == 1


def test_user_mistakes_exit_2_with_a_message(tiny_model_dir, questions_file, tmp_path, capsys):
    assert run_bench(tiny_model_dir, questions_file, tmp_path, "--methods", "medusa,beam") == 2
    assert "unknown benchmark method(s) ['beam']" in capsys.readouterr().err
    assert run_bench(tiny_model_dir, questions_file, tmp_path, "--categories", "poetry") == 2
    assert "unknown Spec-Bench category 'poetry'" in capsys.readouterr().err
    assert run_bench(tiny_model_dir, questions_file, tmp_path, "--cache-length", "lots") == 2
    assert "--cache-length takes a number of slots, auto or none, got 'lots'" in capsys.readouterr().err
    assert run_bench(tiny_model_dir, questions_file, tmp_path, "--cache-length", "-3") == 2
    assert "cache_length must be a positive number of slots" in capsys.readouterr().err
    assert main(["bench", "--shape", "tiny"]) == 2
    assert "--shape only applies with --cost-curve" in capsys.readouterr().err


def test_config_checks_and_reference():
    assert BenchConfig().reference == "autoregressive"
    assert BenchConfig(methods=("hf-generate", "medusa")).reference == "hf-generate"
    for bad in (
        dict(turns=3),
        dict(methods=()),
        dict(methods=("medusa", "medusa")),
        dict(max_new_tokens=0),
        dict(warmup=-1),
        dict(lookup=-1),
        dict(lookup=99),
        dict(methods=("lookup",), lookup=0),
        dict(cache_length=0),
        dict(cache_length="big"),
        dict(cache_length=True),
    ):
        with pytest.raises(MedusaError):
            BenchConfig(**bad)


def test_auto_cache_length_fits_every_first_turn_only_when_compiling(tiny_model_dir, questions_file):
    model = MedusaModel.from_pretrained(str(tiny_model_dir))
    questions = load_questions(questions_file)
    assert resolve_cache_length(model, questions, BenchConfig()) is None  # not compiling: what each prompt needs
    assert resolve_cache_length(model, questions, BenchConfig(cache_length=700)) == 700
    longest = max(len(encode_turn(model, turn_messages(q, 0, []))) for q in questions)
    compiled = BenchConfig(compile=True, max_new_tokens=16, lookup=5)
    assert resolve_cache_length(model, questions, compiled) == longest + 16 + model.tree.size + 5
    assert resolve_cache_length(model, questions, replace(compiled, cache_length=None)) is None


def test_planned_runs_counts_warmup_and_second_turns(questions_file):
    questions = select_questions(load_questions(questions_file), limit=1)  # two of four have a second turn
    assert planned_runs(questions, BenchConfig(turns=1, warmup=2)) == (2 + 4) * 6  # six methods
    assert planned_runs(questions, BenchConfig(turns=2, warmup=0, methods=("medusa",))) == 6
    every = load_questions(questions_file)  # writing 1, 2; roleplay 3; qa 4, 5; translation 6
    config = BenchConfig(turns=1, warmup=1, methods=("autoregressive", "hf-generate"), transformers_limit=1)
    assert planned_runs(every, config) == 2 + 6 + 4


def test_transformers_methods_can_run_on_fewer_questions(tiny_model_dir, questions_file, tmp_path, one_thread):
    code = run_bench(
        tiny_model_dir,
        questions_file,
        tmp_path,
        "--limit",
        "2",
        "--transformers-limit",
        "1",
        "--categories",
        "writing,qa",
        "--methods",
        "autoregressive,hf-generate",
        "--warmup",
        "0",
    )
    assert code == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    ran = {q["id"]: sorted(q["methods"]) for q in report["questions"]}
    assert ran == {
        1: ["autoregressive", "hf-generate"],
        2: ["autoregressive"],
        4: ["autoregressive", "hf-generate"],
        5: ["autoregressive"],
    }
    assert report["methods"]["hf-generate"]["overall"]["prompts"] == 2
    assert report["methods"]["autoregressive"]["overall"]["prompts"] == 4
    assert report["meta"]["transformers_limit_per_category"] == 1


def test_runs_in_parts_merge_into_one_report(tiny_model_dir, questions_file, tmp_path, one_thread, capsys):
    for category in ("qa", "translation"):
        code = run_bench(
            tiny_model_dir,
            questions_file,
            tmp_path / category,
            "--categories",
            category,
            "--methods",
            "autoregressive,medusa",
            "--warmup",
            "0",
        )
        assert code == 0
    parts = [str(tmp_path / c / "bench.json") for c in ("qa", "translation")]
    assert main(["bench", "--merge", *parts, "--output-dir", str(tmp_path / "all")]) == 0
    merged = json.loads((tmp_path / "all" / "bench.json").read_text())
    assert [q["id"] for q in merged["questions"]] == [4, 6]
    assert set(merged["methods"]["medusa"]["per_category"]) == {"qa", "translation"}
    assert merged["equality"]["compared"] == 2 and merged["equality"]["mismatches"] == 0
    assert (tmp_path / "all" / "bench.png").is_file()
    capsys.readouterr()
    assert main(["bench", "--merge", parts[0], parts[0], "--output-dir", str(tmp_path / "bad")]) == 2
    assert "is in more than one report" in capsys.readouterr().err


def test_lookup_methods_run_the_chain_tuned_for_the_device_unless_told():
    from helpers.models import TINY_VOCAB, make_tiny_model
    from medusa.bench.runner import lookup_nodes
    from medusa.heads import MedusaHeads, MedusaHeadsConfig
    from medusa.tree import Tree

    base = make_tiny_model("llama")
    config = MedusaHeadsConfig(hidden_size=base.config.hidden_size, vocab_size=TINY_VOCAB, num_heads=2)
    heads = MedusaHeads(config, base_lm_head=base.get_output_embeddings())
    tuned = MedusaModel(base, None, heads, tree=Tree.from_paths([[0], [1]], lookup=6))
    assert lookup_nodes(tuned, BenchConfig()) == 6 and lookup_nodes(tuned, BenchConfig(lookup=3)) == 3
    assert lookup_nodes(MedusaModel(base, None, heads, tree=[[0]]), BenchConfig()) == 10  # none tuned: the default
