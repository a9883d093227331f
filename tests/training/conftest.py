"""Fixtures for the training tests: the character-level ChatML tokenizer, made once."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from helpers.training import make_tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()
