"""Reading held-out conversations for the profile and prompts for evaluation, malformed lines included."""

from __future__ import annotations

import json

import pytest

from helpers.treeopt import tiny_tokenizer
from medusa.errors import MedusaError
from medusa.treeopt.data import read_evaluation_prompts, read_profile_examples


def test_conversations_are_tokenised_with_their_answers_marked(tmp_path):
    tokenizer = tiny_tokenizer()
    path = tmp_path / "data.jsonl"
    rows = [
        {"conversations": [{"from": "human", "value": "w1 w2"}, {"from": "gpt", "value": "w3 w4 w5"}]},
        "not json",
        {
            "messages": [
                {"role": "user", "content": "w1"},
                {"role": "assistant", "content": "w6"},
                {"role": "user", "content": "w7"},
                {"role": "assistant", "content": "w8 w8"},
            ]
        },
        {"conversations": [{"from": "human", "value": "w1"}]},
        {"prompt": "w5", "response": "w9"},
    ]
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n")
    examples, skipped = read_profile_examples([path], tokenizer)
    assert len(examples) == 3
    assert [line.split(":")[1] for line in skipped] == ["2", "4"]
    first = examples[0]
    answer = [token for token, marked in zip(first.input_ids, first.loss_mask) if marked]
    assert tokenizer.decode(answer) == "w3 w4 w5 </s>"
    assert tokenizer.decode(first.input_ids[: first.loss_mask.index(True)]) == "<|user|> w1 w2 </s> <|assistant|>"
    second = examples[1]
    assert tokenizer.decode([t for t, m in zip(second.input_ids, second.loss_mask) if m]) == "w6 </s> w8 w8 </s>"

    assert len(read_profile_examples([path], tokenizer, limit=1)[0]) == 1
    # --offset skips records (those the heads were trained on, say)
    later, _ = read_profile_examples([path], tokenizer, offset=1)  # records that parse as JSON
    assert [e.where.split(":")[1] for e in later] == ["3", "5"]


def test_prompts_come_from_spec_bench_conversations_and_instructions(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(
        json.dumps(
            [
                {"question_id": 1, "category": "writing", "turns": ["first", "second"]},
                {"question_id": 2, "category": "writing", "turns": ["again"]},
                {"question_id": 3, "category": "qa", "turns": ["why?"]},
                {
                    "conversations": [
                        {"from": "system", "value": "be brief"},
                        {"from": "human", "value": "hi"},
                        {"from": "gpt", "value": "x"},
                    ]
                },
                {"instruction": "add", "input": "1 2"},
                {"nothing": 1},
                {"question_id": 4, "turns": []},
            ]
        )
    )
    prompts, skipped = read_evaluation_prompts([path])
    assert prompts == [
        [{"role": "user", "content": "first"}],
        [{"role": "user", "content": "again"}],
        [{"role": "user", "content": "why?"}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        [{"role": "user", "content": "add\n\n1 2"}],
    ]
    assert len(skipped) == 2 and "'turns' must be" in skipped[1]
    # the limit counts per category, so every Spec-Bench task stays represented
    limited, _ = read_evaluation_prompts([path], limit=1)
    assert [p[-1]["content"] for p in limited] == ["first", "why?", "hi"]
    with pytest.raises(MedusaError, match="does not exist"):
        read_evaluation_prompts([tmp_path / "missing.jsonl"])
