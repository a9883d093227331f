"""Fixtures for the training tests: the character-level ChatML tokenizer, made once, and sums to train on."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from helpers.training import make_tokenizer, write_sums


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_sums(tmp_path_factory.mktemp("data") / "sums.jsonl")
