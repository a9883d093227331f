"""Loading Spec-Bench questions, choosing subsets, and building the turns' messages."""

from __future__ import annotations

import pytest

from helpers.bench import QUESTIONS
from helpers.models import SPEC_BENCH
from medusa.bench.specbench import (
    MT_BENCH_CATEGORIES,
    default_questions_path,
    load_questions,
    messages_as_text,
    select_questions,
    turn_messages,
)
from medusa.errors import MedusaError


def test_load_keeps_order_fields_and_turns(questions_file):
    questions = load_questions(questions_file)
    assert [q.question_id for q in questions] == [row["question_id"] for row in QUESTIONS]
    assert questions[0].category == "writing"
    assert questions[0].turns == ("Write a haiku about rain.", "Now make it rhyme.")
    assert len(questions[3].turns) == 1


def test_limit_counts_per_category_in_file_order(questions_file):
    chosen = select_questions(load_questions(questions_file), limit=1)
    assert [(q.category, q.question_id) for q in chosen] == [
        ("writing", 1),
        ("roleplay", 3),
        ("qa", 4),
        ("translation", 6),
    ]


def test_categories_select_and_mt_bench_means_its_eight(questions_file):
    questions = load_questions(questions_file)
    assert [q.question_id for q in select_questions(questions, ["qa"])] == [4, 5]
    assert [q.question_id for q in select_questions(questions, ["mt_bench"])] == [1, 2, 3]
    assert [q.question_id for q in select_questions(questions, ["translation", "writing"], limit=1)] == [1, 6]


def test_unknown_category_and_bad_limit_are_user_errors(questions_file):
    questions = load_questions(questions_file)
    with pytest.raises(MedusaError, match="unknown Spec-Bench category 'poetry'.*translation"):
        select_questions(questions, ["poetry"])
    with pytest.raises(MedusaError, match="limit"):
        select_questions(questions, limit=0)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"question_id": 1, "category": "qa"}\n', "needs the keys"),
        ("not json\n", "not valid JSON"),
        ('{"question_id": 1, "category": "qa", "turns": []}\n', "non-empty list"),
        ('{"question_id": 1, "category": "qa", "turns": ["a"]}\n' * 2, "appears twice"),
        ("\n", "holds no questions"),
    ],
)
def test_malformed_files_name_the_problem(tmp_path, content, message):
    path = tmp_path / "q.jsonl"
    path.write_text(content)
    with pytest.raises(MedusaError, match=message):
        load_questions(path)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(MedusaError, match="does not exist"):
        load_questions(tmp_path / "nope.jsonl")


def test_second_turn_carries_the_first_answer(questions_file):
    question = load_questions(questions_file)[0]
    assert turn_messages(question, 0, []) == [{"role": "user", "content": "Write a haiku about rain."}]
    messages = turn_messages(question, 1, ["Rain falls."])
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == "Rain falls." and messages[2]["content"] == "Now make it rhyme."
    assert messages_as_text(messages) == "Write a haiku about rain.\n\nRain falls.\n\nNow make it rhyme."
    with pytest.raises(MedusaError, match="needs the answers"):
        turn_messages(question, 1, [])
    with pytest.raises(MedusaError, match="no turn 2"):
        turn_messages(load_questions(questions_file)[3], 1, ["x"])


@pytest.mark.skipif(not SPEC_BENCH.is_file(), reason="the shared Spec-Bench file is not beside the checkout")
def test_default_path_is_the_shared_spec_bench():
    assert default_questions_path().resolve() == SPEC_BENCH.resolve()
    questions = load_questions(default_questions_path())
    assert len(questions) == 480
    assert len(select_questions(questions, ["mt_bench"])) == 80
    assert all(len(q.turns) == 2 for q in questions if q.category in MT_BENCH_CATEGORIES)
    assert len(select_questions(questions, limit=2)) == 2 * 13
