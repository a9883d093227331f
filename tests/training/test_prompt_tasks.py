"""Context-grounded prompts from a pool's answers: the tasks, the documents, determinism, bad input."""

from __future__ import annotations

import json

import pytest

from medusa.cli import main
from medusa.errors import MedusaError
from medusa.training.data import read_prompts
from medusa.training.prompt_tasks import (
    ARTICLE,
    TASKS,
    TOPIC_TEMPLATES,
    PromptTaskConfig,
    clean_document,
    default_topics_path,
    make_prompts,
    read_topics,
)

POOL = [
    {
        "question": "Tom has 3 apples and buys 4 more. How many now?",
        "answer": "Tom buys 4 apples, so he has 3 + 4 = <<3+4=7>>7 apples. "
        "That is the number he has after shopping.\n#### 7",
    },
    {
        "instruction": "Describe a lighthouse keeper's morning.",
        "input": "",
        "response": "The keeper climbs the spiral stairs before dawn, trims the wick, polishes the great lens and "
        "writes the weather in the log while gulls circle the gallery outside.",
    },
    {
        "instruction": "Write a Python function that reverses a string.",
        "input": "",
        "response": 'def reverse(text):\n    """Return text backwards."""\n    return text[::-1]\n\n'
        "print(reverse('medusa'))  # prints 'asudem' and shows slicing with a negative step",
    },
    {"instruction": "Say hi.", "input": "", "response": "Hi!"},  # too short to be a document
]


def write_pool(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in POOL) + "{not json\n")
    return path


def config(path, **overrides):
    settings = {
        "data": [str(path)],
        "count": 8,
        "min_document_chars": 100,
        "documents_per_question": 2,
        "max_prompt_chars": 1200,
    } | overrides
    return PromptTaskConfig(**settings)


def test_gsm8k_markup_is_removed_from_documents():
    assert clean_document("a = <<2*3=6>>6 so\n#### 6") == "a = 6 so\nThe answer is 6."


def test_every_task_quotes_pool_answers_and_reads_back_as_a_prompt(tmp_path):
    path = write_pool(tmp_path)
    result = make_prompts(config(path))
    assert [p["task"] for p in result.prompts] == list(TASKS) * 2  # the tasks take turns
    assert result.sources == 3  # "Hi!" is too short to be a document
    assert result.skipped == [f"{path}:5: not valid JSON (Expecting property name enclosed in double quotes)"]
    documents = [clean_document(row.get("answer", row.get("response"))) for row in POOL[:3]]
    for prompt in result.prompts:
        text = prompt["prompt"]
        assert len(text) <= 1200
        assert any(document[:80] in text for document in documents), text
        assert "<<" not in text and "####" not in text
    qa = [p["prompt"] for p in result.prompts if p["task"] == "context-qa"]
    for text in qa:
        question = text.rsplit("Question: ", 1)[1]
        # the question's own answer is among the documents
        owner = next(row for row in POOL[:3] if row.get("question", row.get("instruction")) == question)
        assert clean_document(owner.get("answer", owner.get("response")))[:80] in text
        assert text.count("Document [") == 2
    out = tmp_path / "prompts.jsonl"
    out.write_text("".join(json.dumps(p) + "\n" for p in result.prompts))
    read = read_prompts([out])
    assert read.skipped == [] and len(read.items) == 8


def test_same_seed_same_prompts_other_seed_other_prompts(tmp_path):
    path = write_pool(tmp_path)
    assert make_prompts(config(path)).prompts == make_prompts(config(path)).prompts
    assert make_prompts(config(path)).prompts != make_prompts(config(path, seed=1)).prompts


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"tasks": ("summarize", "poem")}, "unknown prompt task(s) poem"),
        ({"tasks": ()}, "no prompt tasks"),
        ({"tasks": ("summarize", "summarize")}, "prompt task(s) summarize given more than once"),
        ({"count": 0}, "--count must be at least 1"),
        ({"documents_per_question": 0}, "documents per question must be at least 1"),
        ({"max_prompt_chars": 100}, "--max-prompt-chars must be at least 400"),
    ],
)
def test_bad_settings_are_refused(tmp_path, overrides, message):
    with pytest.raises(MedusaError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config(write_pool(tmp_path), **overrides)


def test_a_pool_without_enough_documents_is_refused(tmp_path):
    with pytest.raises(
        MedusaError, match="3 records have an answer of at least 100 characters; context prompts need at least 4"
    ):
        make_prompts(config(write_pool(tmp_path), documents_per_question=4))


def test_cli_writes_the_file_and_never_overwrites_one(tmp_path, capsys):
    path = write_pool(tmp_path)
    out = tmp_path / "out" / "prompts.jsonl"
    assert (
        main(
            [
                "prompts",
                "--data",
                str(path),
                "--output",
                str(out),
                "--count",
                "4",
                "--documents",
                "2",
                "--min-document-chars",
                "100",
                "--max-prompt-chars",
                "900",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["task"] for row in rows] == list(TASKS)
    assert "wrote 4 prompts" in capsys.readouterr().err
    out.write_text("precious\n")
    assert main(["prompts", "--data", str(path), "--output", str(out), "--count", "4"]) == 2
    assert "exists" in capsys.readouterr().err
    assert out.read_text() == "precious\n"
    assert not list(out.parent.glob(".*.tmp"))


# ----- topic prompts ----------------------------------------------------------------------------------


def write_topics(tmp_path, *topics):
    path = tmp_path / "topics.txt"
    path.write_text("# a comment\n\n" + "\n".join(topics) + "\n")
    return path


def test_topic_tasks_need_no_pool_and_fill_every_template_with_a_listed_topic(tmp_path):
    topics = write_topics(tmp_path, "volcanoes", "tea", "chess")
    result = make_prompts(PromptTaskConfig(data=[], count=12, tasks=("ask", "instruct", "article"), topics=str(topics)))
    assert [p["task"] for p in result.prompts] == ["ask", "instruct", "article"] * 4
    texts = [p["prompt"] for p in result.prompts]
    assert len(set(texts)) == 12  # distinct pairings, never a repeat
    for prompt in result.prompts:
        text = prompt["prompt"]
        assert "{" not in text and text[0].isupper()
        assert any(topic in text.lower() for topic in ("volcanoes", "tea", "chess")), text
        templates = TOPIC_TEMPLATES[prompt["task"]]
        assert any(text.lower().startswith(t.split("{")[0].lower()) for t in templates), text
    again = make_prompts(PromptTaskConfig(data=[], count=12, tasks=("ask", "instruct", "article"), topics=str(topics)))
    assert again.prompts == result.prompts


def test_the_packaged_topics_are_read_without_comments():
    topics = read_topics(default_topics_path())
    assert len(topics) > 200 and "photosynthesis" in topics
    assert not any(topic.startswith("#") or not topic for topic in topics)


def test_topic_and_document_tasks_mix(tmp_path):
    path = write_pool(tmp_path)
    result = make_prompts(
        config(path, tasks=("summarize", "ask"), count=4, topics=str(write_topics(tmp_path, "tea", "chess")))
    )
    assert [p["task"] for p in result.prompts] == ["summarize", "ask"] * 2
    assert result.sources == 3


def test_asking_more_topic_prompts_than_pairings_exist_is_refused(tmp_path):
    topics = write_topics(tmp_path, "tea", "chess")
    with pytest.raises(
        MedusaError,
        match=rf"200 'article' prompts asked for, but {len(ARTICLE)} templates x 2 topics make only {2 * len(ARTICLE)}",
    ):
        make_prompts(PromptTaskConfig(data=[], count=200, tasks=("article",), topics=str(topics)))


@pytest.mark.parametrize(
    "contents, message",
    [
        (None, "topics file .* does not exist"),
        ("# only a comment\ntea\n", "holds 1 topic\\(s\\); topic prompts need at least 2"),
    ],
)
def test_bad_topics_files_are_refused(tmp_path, contents, message):
    path = tmp_path / "topics.txt"
    if contents is not None:
        path.write_text(contents)
    with pytest.raises(MedusaError, match=message):
        make_prompts(PromptTaskConfig(data=[], count=2, tasks=("ask",), topics=str(path)))


def test_document_tasks_without_a_pool_are_refused_by_the_cli(tmp_path, capsys):
    out = tmp_path / "prompts.jsonl"
    assert main(["prompts", "--tasks", "ask,summarize", "--output", str(out), "--count", "4"]) == 2
    assert "tasks summarize need --data" in capsys.readouterr().err
    assert not out.exists()
    assert main(["prompts", "--tasks", "ask,article", "--output", str(out), "--count", "4"]) == 0
    assert [json.loads(line)["task"] for line in out.read_text().splitlines()] == ["ask", "article"] * 2


def test_no_document_repeats_within_a_prompt_and_a_small_pool_is_named(tmp_path, capsys):
    """Three documents of about 150 characters cannot fill a 1,200-character summary: each appears once, and
    the command says the pool was too small."""
    path = write_pool(tmp_path)
    result = make_prompts(config(path, count=30, tasks=("summarize", "key-points", "rewrite")))
    documents = [
        source
        for source in (clean_document(row.get("answer") or row.get("response")) for row in POOL)
        if len(source) >= 100
    ]
    for prompt in result.prompts:
        assert all(prompt["prompt"].count(document) <= 1 for document in documents), prompt["prompt"]
    assert result.short == 30
    out = tmp_path / "prompts.jsonl"
    assert (
        main(
            [
                "prompts",
                "--data",
                str(path),
                "--output",
                str(out),
                "--count",
                "3",
                "--tasks",
                "summarize",
                "--min-document-chars",
                "100",
                "--max-prompt-chars",
                "1200",
            ]
        )
        == 0
    )
    assert "note: 3 of 3 document prompts are shorter" in capsys.readouterr().err


def test_tasks_help_states_the_default(capsys):
    with pytest.raises(SystemExit):
        main(["prompts", "--help"])
    squeezed = "".join(capsys.readouterr().out.split())  # argparse wraps lines at hyphens too
    assert "Default:allfourdocumenttasks(summarize,key-points,rewrite,context-qa)" in squeezed
