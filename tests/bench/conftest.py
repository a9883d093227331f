"""Fixtures for the benchmark tests: a saved tiny model with its tokenizer, a Spec-Bench file, one thread."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.bench import QUESTIONS, tiny_tokenizer
from helpers.models import EOS_ID, make_tiny_model


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
