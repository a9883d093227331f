"""Tiny assets for the benchmark tests: a saved model with a character tokenizer and chat template, a Spec-Bench file.

Not a conftest.py: the tests import the fixtures they use, and `from conftest import` keeps meaning tests/conftest.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from conftest import EOS_ID, TINY_VOCAB, make_tiny_model

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
    vocab = {token: index for index, token in enumerate(SPECIALS + characters + fillers)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    assert tokenizer.eos_token_id == EOS_ID
    return tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    model = make_tiny_model("llama", max_positions=2048)
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = 0
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture
def questions_file(tmp_path):
    path = tmp_path / "question.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in QUESTIONS))
    return path


@pytest.fixture
def one_thread():
    """Tiny models decode fastest on one thread, and much faster when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
