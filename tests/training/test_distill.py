"""Self-distillation: rows in ShareGPT shape, and a killed run resumed neither duplicates nor drops rows."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.training import make_base
from medusa.cli import main
from medusa.training.config import DistillConfig
from medusa.training.data import read_prompts
from medusa.training.distill import distill, plan, sample_prompts


@pytest.fixture
def prompt_files(tmp_path):
    jsonl = tmp_path / "questions.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"question": f"q{i}?" * (i % 4 + 1), "answer": "x"}) + "\n" for i in range(6)) + "oops\n"
    )
    array = tmp_path / "instructions.json"
    array.write_text(json.dumps([{"instruction": f"do {i}", "input": "", "response": "y"} for i in range(5)]))
    return [str(jsonl), str(array)]


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_killed_distillation_resumes_without_duplicates_or_gaps(tmp_path, tokenizer, prompt_files):
    model = make_base(tokenizer)
    output = tmp_path / "out" / "distilled.jsonl"
    config = DistillConfig(data=prompt_files, output=str(output), max_new_tokens=4, batch_size=3, device="cpu")
    work = plan(config, tokenizer)
    assert work.total == 11 and work.done == 0 and len(work.pending) == 11
    assert len(work.skipped) == 1 and "questions.jsonl:7" in work.skipped[0]
    lengths = [len(ids) for _, ids in work.pending]
    assert lengths == sorted(lengths, reverse=True)  # 11 prompts fit in one window: sorted by length
    for batch in distill(config, work, model, tokenizer):  # "killed" after the first batch is written...
        assert batch.rows == 3 and batch.new_tokens > 0
        break
    with output.open("a") as handle:  # ...and halfway through writing the second
        handle.write('{"id": "' + work.pending[3][0].id + '", "conversations": [{"from": "hu')
    resumed = plan(config, tokenizer)
    assert resumed.repaired and resumed.done == 3 and len(resumed.pending) == 8
    assert sum(batch.rows for batch in distill(config, resumed, model, tokenizer)) == 8
    rows = read_rows(output)
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)) == 11
    assert set(ids) == {p.id for p in read_prompts(prompt_files).items}
    finished = plan(config, tokenizer)
    assert finished.done == 11 and finished.pending == []
    row = rows[0]
    assert [turn["from"] for turn in row["conversations"]] == ["human", "gpt"] and row["finish"] in ("stop", "length")


def test_answers_are_the_models_greedy_continuation(tmp_path, tokenizer, prompt_files):
    model = make_base(tokenizer)
    config = DistillConfig(
        data=prompt_files[1:], output=str(tmp_path / "d.jsonl"), max_new_tokens=6, batch_size=4, limit=3
    )
    work = plan(config, tokenizer)
    list(distill(config, work, model, tokenizer))
    for (prompt, ids), row in zip(work.pending, read_rows(tmp_path / "d.jsonl")):
        expected = []
        sequence = torch.tensor([ids])
        with torch.no_grad():
            for _ in range(6):  # unpadded, one sequence: the left-padded batch must give the same tokens
                token = model(sequence).logits[0, -1].argmax().item()
                if token == tokenizer.eos_token_id:
                    break
                expected.append(token)
                sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
        assert row["conversations"][-1]["value"] == tokenizer.decode(expected, skip_special_tokens=True)
        assert row["id"] == prompt.id


def test_limit_takes_a_stable_sample_across_files(prompt_files):
    prompts = read_prompts(prompt_files).items
    sample = sample_prompts(prompts, 5, seed=0)
    assert len(sample) == 5 and sample == sample_prompts(list(reversed(prompts)), 5, seed=0)[::-1]
    assert {p.where.split(":")[0] for p in sample_prompts(prompts, 8, seed=0)} == set(prompt_files)


def test_cli_distills_then_trains_from_a_model_directory(tmp_path, tokenizer, prompt_files, capsys):
    model_dir = tmp_path / "tiny"
    make_base(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    distilled = tmp_path / "distilled.jsonl"
    assert (
        main(
            [
                "distill",
                "--model",
                str(model_dir),
                "--data",
                ",".join(prompt_files),
                "--output",
                str(distilled),
                "--max-new-tokens",
                "6",
                "--batch-size",
                "4",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert len(read_rows(distilled)) == 11
    assert "skipped 1 records" in capsys.readouterr().err
    out = tmp_path / "run"
    train = ["train", "--model", str(model_dir), "--data", str(distilled), "--output", str(out)]
    train += ["--max-steps", "2", "--num-heads", "2", "--batch-size", "4", "--eval-fraction", "0.2", "--device", "cpu"]
    assert main(train) == 0
    printed = capsys.readouterr().out
    assert "head 0 (token t+2): top-1" in printed and "head 1 (token t+3)" in printed
    assert (out / "heads" / "medusa_heads.safetensors").is_file() and (out / "head_accuracy.json").is_file()
    assert main(train) == 2
    assert "--resume" in capsys.readouterr().err
    # A resume with another warm-up or head decay is refused, naming the setting and its flag.
    for flag, value, setting in (("--warmup-steps", "1", "warmup_steps"), ("--head-decay", "0.5", "head_weight_decay")):
        assert main([*train, "--resume", flag, value]) == 2
        assert f"{setting} was" in (error := capsys.readouterr().err) and f"set by {flag}" in error


def test_a_rerun_with_other_answer_settings_is_refused_naming_the_setting(tmp_path, tokenizer, prompt_files, capsys):
    model_dir = tmp_path / "tiny"
    make_base(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    distilled = tmp_path / "distilled.jsonl"
    args = [
        "distill",
        "--model",
        str(model_dir),
        "--data",
        prompt_files[1],
        "--output",
        str(distilled),
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--limit",
        "2",
    ]
    assert main([*args, "--max-new-tokens", "4"]) == 0
    rows = distilled.read_text()
    assert main([*args, "--max-new-tokens", "6", "--limit", "4"]) == 2
    err = capsys.readouterr().err
    assert "--max-new-tokens 4" in err and "this run has 6" in err and "another --output" in err
    assert distilled.read_text() == rows  # nothing appended
    assert main([*args, "--max-new-tokens", "4", "--limit", "4"]) == 0  # the same settings continue: more prompts
    assert len(read_rows(distilled)) == 4
