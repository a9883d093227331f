"""Data readers: every record shape, JSON and JSONL, malformed lines, assistant-only labels, batching."""

from __future__ import annotations

import json

import pytest

from medusa.errors import MedusaError
from medusa.training.data import (
    Collator,
    LengthBatchSampler,
    encode_conversation,
    load_examples,
    prompt_id,
    read_prompts,
    split_held_out,
)

SHAPES = [
    (
        {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]},
        [{"role": "user", "content": "Hi?"}],
        "Hello.",
    ),
    (
        {
            "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Yo."},
            ]
        },
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi?"}],
        "Yo.",
    ),
    ({"instruction": "Add.", "input": "2 and 3", "output": "5"}, [{"role": "user", "content": "Add.\n\n2 and 3"}], "5"),
    ({"instruction": "Greet.", "input": "", "response": "Hello!"}, [{"role": "user", "content": "Greet."}], "Hello!"),
    ({"question": "2+2?", "answer": "4"}, [{"role": "user", "content": "2+2?"}], "4"),
]


def write_jsonl(path, rows, raw_lines=()):
    lines = [json.dumps(row) for row in rows] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def assistant_text(tokenizer, example):
    return tokenizer.decode([t for t, keep in zip(example.input_ids, example.loss_mask) if keep])


@pytest.mark.parametrize("suffix", ["jsonl", "json"])
def test_every_shape_reads_as_prompt_and_as_training_conversation(tmp_path, tokenizer, suffix):
    path = tmp_path / f"data.{suffix}"
    rows = [row for row, _, _ in SHAPES] + [{"prompt": "Only a prompt."}]
    if suffix == "json":
        path.write_text(json.dumps(rows, indent=2))
    else:
        write_jsonl(path, rows)
    prompts = read_prompts([path])
    assert prompts.skipped == []
    assert [p.messages for p in prompts.items] == [messages for _, messages, _ in SHAPES] + [
        [{"role": "user", "content": "Only a prompt."}]
    ]
    examples = load_examples([path], tokenizer, max_length=256)
    assert [assistant_text(tokenizer, e) for e in examples.items] == [
        f"{answer}<|im_end|>\n" for _, _, answer in SHAPES
    ]
    # The prompt-only record cannot be trained on: skipped, with its place and the reason.
    assert examples.skipped_count == 1
    assert f"{path}:" in examples.skipped[0] and "prompt-only" in examples.skipped[0]


def test_malformed_lines_are_skipped_with_file_and_line(tmp_path, tokenizer):
    good = {"question": "1+1?", "answer": "2"}
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [good],
        raw_lines=[
            "{not json",  # line 2
            "[1, 2]",  # line 3: not an object
            json.dumps({"conversations": [{"from": "robot", "value": "x"}]}),  # line 4: unknown role
            json.dumps({"instruction": "Do it."}),  # line 5: fine as a prompt, no answer to train on
            json.dumps({"title": "nothing useful"}),  # line 6
            json.dumps({"conversations": [{"from": "human", "value": 3}]}),  # line 7: no text
        ],
    )
    result = load_examples([path], tokenizer, max_length=128)
    assert len(result.items) == 1 and result.skipped_count == 6
    assert [line.split(": ")[0] for line in result.skipped] == [f"{path}:{n}" for n in range(2, 8)]
    assert "not valid JSON" in result.skipped[0]
    assert "robot" in result.skipped[2]
    prompts = read_prompts([path])
    assert len(prompts.items) == 2 and prompts.skipped_count == 5  # the instruction-only line is a fine prompt


def test_json_list_reports_the_line_of_a_bad_item_and_a_broken_file(tmp_path, tokenizer):
    path = tmp_path / "list.json"
    path.write_text('[\n  {"question": "a?", "answer": "b"},\n  {"question": 5},\n  "text"\n]\n')
    result = load_examples([path], tokenizer, max_length=64)
    assert len(result.items) == 1
    assert [line.split(": ")[0] for line in result.skipped] == [f"{path}:3", f"{path}:4"]
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"question": "a?", "answer": "b"},\n {"question": \n')
    with pytest.raises(MedusaError, match=f"{broken}:"):
        load_examples([broken], tokenizer, max_length=64)
    with pytest.raises(MedusaError, match="does not exist"):
        read_prompts([tmp_path / "missing.jsonl"])


def test_only_assistant_turns_are_labelled_in_a_multi_turn_conversation(tokenizer):
    messages = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "AAA"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "BBB"},
    ]
    example = encode_conversation(tokenizer, messages, max_length=512)
    assert assistant_text(tokenizer, example) == "AAA<|im_end|>\nBBB<|im_end|>\n"
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    cut = encode_conversation(tokenizer, messages, max_length=len(example.input_ids) - 5)
    assert len(cut.input_ids) == len(example.input_ids) - 5
    with pytest.raises(ValueError, match="no assistant token"):
        encode_conversation(tokenizer, messages, max_length=8)


def test_prompt_ids_are_stable_and_distinct(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "same"}, {"prompt": "same"}, {"prompt": "other"}])
    first, second = read_prompts([path]), read_prompts([path])
    assert [p.id for p in first.items] == [p.id for p in second.items]
    assert len({p.id for p in first.items}) == 3  # the index is part of the id
    assert first.items[0].id == prompt_id("p.jsonl", 0, [{"role": "user", "content": "same"}])
    assert len(read_prompts([path], limit=2).items) == 2


def test_length_batches_cover_every_example_once_per_epoch_within_their_caps():
    lengths = [5, 50, 7, 48, 6, 51, 20, 22, 21, 3]
    sampler = LengthBatchSampler(lengths, batch_size=3, max_tokens=100, seed=1)
    for epoch in range(3):
        sampler.use_epoch(epoch)
        batches = list(sampler)
        assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
        assert all(len(b) <= 3 and max(lengths[i] for i in b) * len(b) <= 100 for b in batches)
    sampler.use_epoch(0)
    again = LengthBatchSampler(lengths, batch_size=3, max_tokens=100, seed=1)
    again.use_epoch(0)
    assert list(sampler) == list(again)
    orders = []
    for epoch in range(4):
        sampler.use_epoch(epoch)
        orders.append(list(sampler))
    assert len({json.dumps(order) for order in orders}) > 1  # each epoch visits the batches in its own order


def test_collator_pads_right_and_split_holds_out_a_seeded_fraction(tokenizer):
    examples = [
        encode_conversation(
            tokenizer, [{"role": "user", "content": "q" * n}, {"role": "assistant", "content": "a"}], 128
        )
        for n in range(1, 51)
    ]
    batch = Collator(tokenizer.pad_token_id)(examples[:2])
    assert batch["input_ids"].shape == batch["loss_mask"].shape == (2, len(examples[1].input_ids))
    assert batch["attention_mask"][0].sum() == len(examples[0].input_ids)
    assert batch["input_ids"][0, -1] == tokenizer.pad_token_id and not batch["loss_mask"][0, -1]
    train, held = split_held_out(examples, 0.1, seed=3, max_held_out=100)
    assert len(held) == 5 and len(train) == 45
    assert split_held_out(examples, 0.1, seed=3, max_held_out=100)[1] == held
    assert len(split_held_out(examples, 0.1, seed=3, max_held_out=2)[1]) == 2
