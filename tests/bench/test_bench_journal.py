"""A stopped benchmark keeps what it measured: the journal, the partial report, and ``--resume``."""

from __future__ import annotations

import json
import os
import signal

import pytest

from helpers.bench import run_bench
from medusa.bench import runner
from medusa.bench.journal import Journal, journal_path, load_journal
from medusa.bench.report import validate_report
from medusa.bench.runner import BenchConfig, Record, Sample, planned_runs
from medusa.bench.specbench import load_questions, select_questions
from medusa.errors import MedusaError

SETTINGS = {"model": "tiny", "device": "cpu", "max_new_tokens": 12, "methods": ["autoregressive"]}


def record(question_id: int, tokens: list[int]) -> Record:
    sample = Sample(token_ids=tokens, prefill_seconds=0.25, decode_seconds=1.5, steps=len(tokens), accepted=len(tokens))
    return Record(question_id, "qa", 1, 7, {"autoregressive": sample})


def test_journal_keeps_records_and_drops_only_a_line_cut_short(tmp_path):
    path = tmp_path / "records.jsonl"
    journal = Journal(path, SETTINGS)
    journal.append(record(4, [5, 6, 7]))
    journal.append(record(5, [8]))
    with path.open("a") as handle:
        handle.write('{"id": 6, "category": "qa", "tu')  # killed while writing the third record
    records, notes = load_journal(path, SETTINGS)
    assert records == [record(4, [5, 6, 7]), record(5, [8])]
    assert notes == [f"{path}, line 4: cut short (the run stopped while writing it); that prompt runs again"]
    # A new journal that keeps them replaces the file whole, the torn line gone.
    Journal(path, SETTINGS, records)
    assert load_journal(path, SETTINGS) == (records, [])


def test_journal_refuses_other_settings_and_malformed_lines(tmp_path):
    path = tmp_path / "records.jsonl"
    journal = Journal(path, SETTINGS)
    journal.append(record(4, [5]))
    with pytest.raises(
        MedusaError,
        match=r"measured with max_new_tokens=12, this run has max_new_tokens=256 "
        r"\(also differing: methods\)",
    ):
        load_journal(path, {**SETTINGS, "max_new_tokens": 256, "methods": ["medusa"]})
    path.write_text(path.read_text().replace('"token_ids": [5]', '"token_ids": "five"') + json.dumps({"id": 5}) + "\n")
    with pytest.raises(MedusaError, match=r"records.jsonl, line 2: malformed record"):
        load_journal(path, SETTINGS)
    path.write_text("")
    with pytest.raises(MedusaError, match="is empty: it is not a benchmark journal"):
        load_journal(path, SETTINGS)
    path.write_text('{"questions": 3}\n')
    with pytest.raises(MedusaError, match="line 1: not a benchmark journal's settings line"):
        load_journal(path, SETTINGS)


def test_planned_runs_leave_out_questions_already_measured(questions_file):
    questions = select_questions(load_questions(questions_file), limit=1)  # ids 1, 3, 4, 6
    config = BenchConfig(turns=1, warmup=1, methods=("autoregressive", "medusa"))
    assert planned_runs(questions, config) == 2 + 4 * 2
    assert planned_runs(questions, config, done=[record(1, [5]), record(4, [5])]) == 2 + 2 * 2
    # a question counts as measured only when every turn the run takes is there
    assert planned_runs(questions, BenchConfig(turns=2, warmup=0, methods=("medusa",)), done=[record(1, [5])]) == 6
    done = [record(q.question_id, [5]) for q in questions]
    assert planned_runs(questions, config, done=done) == 0  # nothing left: not even the warm-up


def bench(tiny_model_dir, questions_file, output, *extra):
    return run_bench(
        tiny_model_dir, questions_file, output, "--methods", "autoregressive,medusa", "--keep-tokens", *extra
    )


@pytest.fixture
def generations(monkeypatch):
    """Our decoders' generations, in order; set ``generations.stop_at = N`` to SIGTERM the process at the Nth."""

    class Generations(list):
        stop_at: int | None = None

    made = Generations()
    original_run = runner.OurDecoder.run

    def counted_run(self, prompt_ids):
        made.append(self.name)
        if made.stop_at and len(made) == made.stop_at:
            os.kill(os.getpid(), signal.SIGTERM)  # as `timeout` does; the generation in progress is lost
        return original_run(self, prompt_ids)

    monkeypatch.setattr(runner.OurDecoder, "run", counted_run)
    return made


def test_a_run_stopped_by_sigterm_writes_what_it_has_and_resume_finishes_it(
    tiny_model_dir, questions_file, tmp_path, one_thread, generations, capsys
):
    # Warm-up: 2 generations; questions 1 and 3: 4 more; the 7th (question 4) is stopped.
    generations.stop_at = 7
    assert bench(tiny_model_dir, questions_file, tmp_path) == 130
    err = capsys.readouterr().err
    assert "stopped after 2 prompts" in err
    # not a terminal: a line per finished generation, so a log shows how far the run got
    assert "] roleplay #3 turn 1: medusa" in err and "[6/10, " in err and "[7/10" not in err
    partial = json.loads((tmp_path / "bench.json").read_text())
    validate_report(partial)
    assert partial["meta"]["complete"] is False and [q["id"] for q in partial["questions"]] == [1, 3]
    journal = journal_path(tmp_path)
    assert [json.loads(line).get("id") for line in journal.read_text().splitlines()] == [None, 1, 3]

    # A fresh run into the same directory would lose them: refused, before the model is even loaded.
    generations.stop_at = None
    generations.clear()
    assert bench(tiny_model_dir, questions_file, tmp_path) == 2
    assert "holds the prompts of a benchmark that stopped before its end; pass --resume" in capsys.readouterr().err
    assert bench(tiny_model_dir, questions_file, tmp_path, "--resume", "--tree", "16") == 2
    assert "measured with tree_size=8, this run has tree_size=16" in capsys.readouterr().err
    assert generations == []

    assert bench(tiny_model_dir, questions_file, tmp_path, "--resume") == 0
    assert "resuming" in capsys.readouterr().err
    assert len(generations) == 2 + 2 * 2  # warm-up, then questions 4 and 6 only
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["meta"]["complete"] is True and [q["id"] for q in report["questions"]] == [1, 3, 4, 6]
    assert report["questions"][:2] == partial["questions"]  # the stopped run's measurements, kept as they were
    assert report["equality"]["compared"] == 4 and report["equality"]["mismatches"] == 0
    assert not journal.exists()  # the report holds everything now; the next run starts afresh
    assert bench(tiny_model_dir, questions_file, tmp_path, "--categories", "qa") == 0


def test_resuming_a_subset_keeps_the_journal_for_the_questions_it_left_out(
    tiny_model_dir, questions_file, tmp_path, one_thread, generations, capsys
):
    generations.stop_at = 7  # as above: questions 1 and 3 measured
    assert bench(tiny_model_dir, questions_file, tmp_path) == 130
    capsys.readouterr()
    generations.stop_at = None
    assert bench(tiny_model_dir, questions_file, tmp_path, "--resume", "--categories", "qa") == 0
    assert [q["id"] for q in json.loads((tmp_path / "bench.json").read_text())["questions"]] == [4]
    assert "it holds 2 prompts of questions this run did not select" in capsys.readouterr().err
    assert [json.loads(line).get("id") for line in journal_path(tmp_path).read_text().splitlines()] == [None, 1, 3, 4]
    # Stopped again before anything new: the partial report holds every chosen question measured so far.
    generations.clear()
    generations.stop_at = 1
    assert bench(tiny_model_dir, questions_file, tmp_path, "--resume") == 130
    assert "stopped after 3 prompts" in capsys.readouterr().err
    assert [q["id"] for q in json.loads((tmp_path / "bench.json").read_text())["questions"]] == [1, 3, 4]


def test_resuming_a_finished_run_leaves_it_as_it_is_unless_it_asks_for_other_questions(
    tiny_model_dir, questions_file, tmp_path, one_thread, generations, capsys
):
    assert bench(tiny_model_dir, questions_file, tmp_path, "--resume") == 0  # nothing to resume: a fresh run
    finished = (tmp_path / "bench.json").read_text()
    assert json.loads(finished)["meta"]["complete"] is True and not journal_path(tmp_path).exists()
    generations.clear()
    capsys.readouterr()
    assert bench(tiny_model_dir, questions_file, tmp_path, "--resume") == 0
    assert generations == [] and (tmp_path / "bench.json").read_text() == finished
    assert f"nothing to resume: {tmp_path / 'bench.json'} is a finished run" in capsys.readouterr().err
    # other questions, or other settings, are another run: measured (a fresh run replaces the report, as before)
    assert bench(tiny_model_dir, questions_file, tmp_path, "--resume", "--categories", "qa") == 0
    assert generations and [q["id"] for q in json.loads((tmp_path / "bench.json").read_text())["questions"]] == [4]
    generations.clear()
    assert bench(tiny_model_dir, questions_file, tmp_path, "--resume", "--categories", "qa", "--tree", "16") == 0
    assert generations
