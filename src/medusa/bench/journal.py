"""The benchmark's journal: each finished prompt is appended to ``records.jsonl`` as soon as it is measured.

A long benchmark can be stopped before it writes its report: a time limit, a machine taken back, Ctrl-C.
Its prompts are then not lost: the journal holds every one that finished, ``medusa bench --resume``
continues from there, and the interrupted run still writes a report of what it has. The first line
holds the run's settings, so a resumed run cannot mix in prompts measured another way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from medusa.bench.report import question_rows
from medusa.bench.runner import Record, Sample
from medusa.bench.specbench import Question
from medusa.errors import MedusaError
from medusa.files import append_text, write_text

JOURNAL_NAME = "records.jsonl"
REPORT_NAME = "bench.json"
# Settings (keys of the report's meta) that must match for a run to resume a journal.
RESUME_SETTINGS = (
    "model",
    "dtype",
    "device",
    "heads",
    "heads_source",
    "tree_size",
    "lookup_tree_size",
    "max_new_tokens",
    "turns",
    "methods",
    "cuda_graphs",
    "compile",
    "prompt_lookup_num_tokens",
    "lookup_nodes",
    "transformers_limit_per_category",
    "questions_file",
)


def journal_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / JOURNAL_NAME


def record_to_json(record: Record) -> dict:
    """The record as a row of the report's ``questions``, token ids included."""
    return question_rows([record], keep_tokens=True)[0]


def record_from_json(raw: dict) -> Record:
    """The inverse of ``record_to_json``; ``KeyError``/``TypeError``/``ValueError`` on a malformed row."""
    record = Record(raw["id"], str(raw["category"]), int(raw["turn"]), int(raw["prompt_tokens"]))
    for name, sample in raw["methods"].items():
        record.samples[name] = Sample(
            token_ids=[int(token) for token in sample["token_ids"]],
            prefill_seconds=float(sample["prefill_seconds"]),
            decode_seconds=float(sample["decode_seconds"]),
            steps=int(sample["steps"]),
            accepted=int(sample["accepted"]),
        )
    return record


def resume_settings(meta: dict) -> dict:
    return {key: meta.get(key) for key in RESUME_SETTINGS}


class Journal:
    """Appends records to ``path``, each line flushed to disk before the next prompt starts."""

    def __init__(self, path: Path, settings: dict, records: Sequence[Record] = ()) -> None:
        """Start a journal at ``path`` holding ``settings`` and the ``records`` kept from an earlier one."""
        lines = [json.dumps({"settings": settings})] + [json.dumps(record_to_json(record)) for record in records]
        write_text(path, "".join(line + "\n" for line in lines))  # the earlier journal stays whole until the new one is
        self.path = path

    def append(self, record: Record) -> None:
        append_text(self.path, json.dumps(record_to_json(record)) + "\n")

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def load_journal(path: Path, settings: dict) -> tuple[list[Record], list[str]]:
    """The records of an earlier run with the same ``settings``, and notes on what was dropped.

    A last line cut short (the run was killed while writing it) is dropped with a note; any other
    malformed line, or settings that differ, is an error naming it.
    """
    lines = path.read_text().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise MedusaError(f"{path} is empty: it is not a benchmark journal (remove it to start afresh)")
    try:
        header = json.loads(lines[0])
        recorded = header["settings"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise MedusaError(
            f"{path}, line 1: not a benchmark journal's settings line (remove it to start afresh)"
        ) from None
    differing = [key for key in RESUME_SETTINGS if recorded.get(key) != settings.get(key)]
    if differing:
        key = differing[0]
        raise MedusaError(
            f"cannot resume {path}: it was measured with {key}={recorded.get(key)!r}, this run has "
            f"{key}={settings.get(key)!r}"
            + (f" (also differing: {', '.join(differing[1:])})" if differing[1:] else "")
            + "; use the same settings, or another --output-dir"
        )
    records: list[Record] = []
    notes: list[str] = []
    for number, line in enumerate(lines[1:], start=2):
        try:
            records.append(record_from_json(json.loads(line)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
            if number == len(lines):
                notes.append(
                    f"{path}, line {number}: cut short (the run stopped while writing it); that prompt runs again"
                )
                break
            raise MedusaError(
                f"{path}, line {number}: malformed record ({error}); the journal cannot be resumed"
            ) from None
    return records, notes


def refuse_unfinished(output_dir: str | Path, resume: bool) -> None:
    """Refuse to start afresh over an unfinished run's journal (its prompts would be lost): before the model loads."""
    path = journal_path(output_dir)
    if path.is_file() and not resume:
        raise MedusaError(
            f"{path} holds the prompts of a benchmark that stopped before its end; pass --resume to continue "
            f"it, or choose another --output-dir (remove the file to discard them)"
        )


# What a finished report must share with a run for that run, resumed, to have nothing left to measure.
SELECTION = ("categories", "limit_per_category")


def finished_report(output_dir: str | Path, meta: dict) -> Path | None:
    """The report in ``output_dir`` when it is a finished run of ``meta``'s settings and questions: resuming it
    has nothing left to do. A finished run removes its journal, so without this a script that resumes the same
    command in every call would measure a finished run all over again."""
    path = Path(output_dir) / REPORT_NAME
    if not path.is_file():
        return None
    try:
        earlier = json.loads(path.read_text(encoding="utf-8")).get("meta")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None  # not a report this run could reuse: it runs, and writes one
    if not isinstance(earlier, dict) or earlier.get("complete") is not True:
        return None
    wanted = json.loads(json.dumps({key: meta.get(key) for key in (*RESUME_SETTINGS, *SELECTION)}))
    return path if all(earlier.get(key) == value for key, value in wanted.items()) else None


def start_journal(output_dir: str | Path, meta: dict, resume: bool) -> tuple[Journal, list[Record], list[str]]:
    """The journal of this run, the records it keeps from an earlier run (when resuming), and notes to show."""
    path = journal_path(output_dir)
    settings = resume_settings(meta)
    done: list[Record] = []
    notes: list[str] = []
    if resume and path.is_file():
        done, notes = load_journal(path, settings)
        notes.append(f"resuming {path}: {len(done)} prompts already measured")
    elif resume:
        notes.append(f"nothing to resume in {Path(output_dir)} (no {path.name}): starting afresh")
    return Journal(path, settings, done), done, notes


def with_earlier(records: Sequence[Record], done: Sequence[Record], questions: Sequence[Question]) -> list[Record]:
    """A stopped run's records and the earlier run's for the chosen questions it had not reached, in question order."""
    order = {question.question_id: index for index, question in enumerate(questions)}
    seen = {(record.question_id, record.turn) for record in records}
    earlier = [r for r in done if r.question_id in order and (r.question_id, r.turn) not in seen]
    return sorted([*records, *earlier], key=lambda record: (order[record.question_id], record.turn))


def unreported(records: Sequence[Record], done: Sequence[Record]) -> list[Record]:
    """The earlier run's records of questions this run did not select (the journal keeps them)."""
    reported = {(record.question_id, record.turn) for record in records}
    return [record for record in done if (record.question_id, record.turn) not in reported]
