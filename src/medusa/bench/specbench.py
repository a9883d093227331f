"""Spec-Bench questions (Xia et al., 2024): loading, choosing a subset, and turning turns into prompts.

Spec-Bench is 480 questions in six tasks: 80 MT-bench rows (eight categories of ten, two turns each),
then translation, summarization, qa, math_reasoning and rag (80 each, one turn). A second turn is
asked after the first turn's answer, so its prompt depends on an answer: the runner feeds back one
method's answer to every method, so that all methods see the same prompt.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medusa.errors import MedusaError

MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
MT_BENCH = "mt_bench"  # accepted by --categories as all eight MT-bench categories


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    turns: tuple[str, ...]


def default_questions_path() -> Path:
    """``shared/data/spec_bench/question.jsonl`` beside the checkout (or inside it, or beside/inside the cwd)."""
    relative = Path("shared") / "data" / "spec_bench" / "question.jsonl"
    checkout, cwd = Path(__file__).resolve().parents[3], Path.cwd().resolve()
    candidates = [checkout.parent / relative, checkout / relative, cwd.parent / relative, cwd / relative]
    return next((path for path in candidates if path.is_file()), candidates[0])


def load_questions(path: str | Path) -> list[Question]:
    """Read a Spec-Bench ``question.jsonl``: one ``{"question_id", "category", "turns": [...]}`` per line."""
    path = Path(path)
    if not path.is_file():
        raise MedusaError(f"Spec-Bench questions file {path} does not exist (expected spec_bench/question.jsonl)")
    questions: list[Question] = []
    seen: set = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise MedusaError(f"{path}:{number} is not valid JSON: {error}") from None
        if not isinstance(row, dict) or not {"question_id", "category", "turns"} <= row.keys():
            raise MedusaError(f"{path}:{number} needs the keys question_id, category and turns")
        turns = row["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise MedusaError(f"{path}:{number}: turns must be a non-empty list of non-empty strings")
        if row["question_id"] in seen:
            raise MedusaError(f"{path}:{number}: question_id {row['question_id']!r} appears twice")
        seen.add(row["question_id"])
        questions.append(Question(row["question_id"], str(row["category"]), tuple(turns)))
    if not questions:
        raise MedusaError(f"Spec-Bench questions file {path} holds no questions")
    return questions


def categories_of(questions: Sequence[Question]) -> list[str]:
    """Categories in the order they first appear in the file."""
    return list(dict.fromkeys(q.category for q in questions))


def select_questions(
    questions: Sequence[Question], categories: Sequence[str] | None = None, limit: int | None = None
) -> list[Question]:
    """The questions of ``categories`` (all when None; ``mt_bench`` means its eight), the first ``limit`` of each.

    ``limit`` counts per category, in file order, so a subset keeps every category represented.
    """
    available = categories_of(questions)
    wanted = set(available)
    if categories:
        wanted = set()
        for name in categories:
            if name == MT_BENCH:
                wanted.update(c for c in available if c in MT_BENCH_CATEGORIES)
            elif name in available:
                wanted.add(name)
            else:
                raise MedusaError(
                    f"unknown Spec-Bench category {name!r}; choose among {', '.join(available + [MT_BENCH])}"
                )
    if limit is not None and (isinstance(limit, bool) or limit < 1):
        raise MedusaError(f"limit must be a positive number of questions per category, got {limit!r}")
    counts: dict[str, int] = {}
    chosen: list[Question] = []
    for question in questions:
        if question.category not in wanted:
            continue
        if limit is not None and counts.get(question.category, 0) >= limit:
            continue
        counts[question.category] = counts.get(question.category, 0) + 1
        chosen.append(question)
    return chosen


def turn_messages(question: Question, turn: int, earlier_answers: Sequence[str]) -> list[dict]:
    """Chat messages for ``turn`` (0-based): the earlier turns with their answers, then this turn."""
    if turn >= len(question.turns):
        raise MedusaError(f"question {question.question_id} has {len(question.turns)} turn(s), no turn {turn + 1}")
    if len(earlier_answers) < turn:
        raise MedusaError(f"turn {turn + 1} of question {question.question_id} needs the answers to the earlier turns")
    messages: list[dict] = []
    for index in range(turn):
        messages.append({"role": "user", "content": question.turns[index]})
        messages.append({"role": "assistant", "content": earlier_answers[index]})
    messages.append({"role": "user", "content": question.turns[turn]})
    return messages


def messages_as_text(messages: Sequence[dict]) -> str:
    """A plain-text conversation for tokenizers without a chat template."""
    return "\n\n".join(m["content"] for m in messages)
