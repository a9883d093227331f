"""Reading conversations for the profile and prompts for evaluation, malformed lines included."""

from __future__ import annotations

import json

import pytest

from medusa.errors import MedusaError
from medusa.treeopt.data import read_profile_sequences, read_prompts
from treeopt_assets import tiny_tokenizer


def test_every_assistant_turn_becomes_a_sequence_starting_after_its_prompt(tmp_path):
    tokenizer = tiny_tokenizer()
    path = tmp_path / "data.jsonl"
    rows = [
        {"conversations": [{"from": "human", "value": "w1 w2"}, {"from": "gpt", "value": "w3 w4 w5"}]},
        "not json",
        {"messages": [{"role": "system", "content": "w9"}, {"role": "user", "content": "w1"},
                      {"role": "assistant", "content": "w6"}, {"role": "user", "content": "w7"},
                      {"role": "assistant", "content": "w8 w8"}]},
        {"conversations": [{"from": "human", "value": "w1"}]},
        [1, 2],
    ]
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n\n")
    sequences, report = read_profile_sequences([path], tokenizer)
    assert report.used == 2 and len(sequences) == 3
    assert [s.split(":")[1] for s in report.skipped] == ["2", "4", "5"]
    assert "not valid JSON" in report.skipped[0] and "no conversation with an assistant turn" in report.skipped[1]

    first = sequences[0]
    assert tokenizer.decode(first.token_ids[: first.response_start]) == "<|user|> w1 w2 </s> <|assistant|>"
    assert tokenizer.decode(first.token_ids[first.response_start :]) == "w3 w4 w5 </s>"
    second_turn = sequences[2]
    assert tokenizer.decode(second_turn.token_ids[second_turn.response_start :]) == "w8 w8 </s>"
    assert tokenizer.decode(second_turn.token_ids[:4]) == "<|system|> w9 </s> <|user|>"

    limited, _ = read_profile_sequences([path], tokenizer, limit=1)
    assert len(limited) == 1
    cut, cut_report = read_profile_sequences([path], tokenizer, max_length=7)
    assert [len(s.token_ids) for s in cut] == [7] and cut_report.used == 1


def test_prompts_come_from_spec_bench_conversations_and_instructions(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([
        {"question_id": 1, "turns": ["first", "second"]},
        {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]},
        {"instruction": "add", "input": "1 2"},
        {"question": "why?"},
        {"nothing": 1},
    ]))
    prompts, report = read_prompts([path])
    assert prompts == [
        [{"role": "user", "content": "first"}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        [{"role": "user", "content": "add\n\n1 2"}],
        [{"role": "user", "content": "why?"}],
    ]
    assert report.used == 4 and len(report.skipped) == 1 and "no prompt" in report.skipped[0]
    with pytest.raises(MedusaError, match="does not exist"):
        read_prompts([tmp_path / "missing.jsonl"])
