"""Tiny assets for the benchmark tests: a character tokenizer with a chat template, Spec-Bench questions, and
hand-made records whose report numbers the tests work out (fixtures: bench/conftest.py)."""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from helpers.models import EOS_ID, TINY_VOCAB
from helpers.text_model import char_tokenizer
from medusa.bench.runner import Record, Sample
from medusa.cli import main

SPECIALS = ["<pad>", "<s>", "<unk>", "</s>"]  # </s> is id 3, the tiny models' EOS
CHAT_TEMPLATE = (
    "{% for message in messages %}<{{ message['role'] }}>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)

QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a haiku about rain.", "Now make it rhyme."]},
    {"question_id": 2, "category": "writing", "turns": ["Describe a cat.", "Shorter, please."]},
    {"question_id": 3, "category": "roleplay", "turns": ["Pretend to be a pirate.", "Say goodbye."]},
    {"question_id": 4, "category": "qa", "turns": ["What is the capital of France?"]},
    {"question_id": 5, "category": "qa", "turns": ["Who wrote Hamlet?"]},
    {"question_id": 6, "category": "translation", "turns": ["Translate to German: good morning."]},
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Characters as tokens, padded with filler tokens to the tiny models' vocabulary."""
    characters = [chr(c) for c in range(32, 127)] + ["\n"]
    fillers = [f"<x{i}>" for i in range(TINY_VOCAB - len(SPECIALS) - len(characters))]
    tokenizer = char_tokenizer(SPECIALS, characters + fillers, "<s>", "</s>", CHAT_TEMPLATE)
    assert tokenizer.eos_token_id == EOS_ID
    return tokenizer


def run_bench(model_dir, questions_file, output, *extra) -> int:
    """``medusa bench`` on one question per category, 12 new tokens, the 8-node tree; ``extra`` flags after those."""
    return main(
        [
            "bench",
            "--model",
            str(model_dir),
            "--questions",
            str(questions_file),
            "--limit",
            "1",
            "--max-new-tokens",
            "12",
            "--tree",
            "8",
            "--warmup",
            "1",
            "--output-dir",
            str(output),
            *extra,
        ]
    )


def sample(tokens, decode, prefill=0.5, steps=None, accepted=None, token_ids=None):
    ids = token_ids if token_ids is not None else list(range(tokens))
    return Sample(
        ids, prefill, decode, steps if steps is not None else tokens, accepted if accepted is not None else tokens
    )


def hand_made_records() -> list[Record]:
    """Three prompts in two categories; the expected numbers are worked out in the tests below."""
    return [
        Record(
            1,
            "writing",
            1,
            20,
            {
                "autoregressive": sample(100, 2.0),
                "medusa": sample(100, 1.0, steps=40, accepted=100),
                "hf-generate": sample(100, 4.0, steps=100),
            },
        ),
        Record(
            2,
            "writing",
            1,
            30,
            {
                "autoregressive": sample(50, 2.0),
                "medusa": sample(50, 0.5, steps=20, accepted=52, token_ids=[0, 1, 2, 9] + list(range(4, 50))),
                "hf-generate": sample(50, 2.0),
            },
        ),
        Record(
            3,
            "qa",
            1,
            10,
            {
                "autoregressive": sample(10, 1.0),
                "medusa": sample(10, 1.0, steps=10, accepted=10, token_ids=list(range(9)) + [99]),
                "hf-generate": sample(10, 0.5),
            },
        ),
    ]


META = {
    "command": "medusa bench --limit 2",
    "device": "test cpu",
    "dtype": "float32",
    "model": "tiny",
    "heads": None,
    "tree_size": 64,
    "max_new_tokens": 100,
    "torch": "x",
    "transformers": "y",
    "timestamp": "now",
}
METHODS = ("autoregressive", "medusa", "hf-generate")
