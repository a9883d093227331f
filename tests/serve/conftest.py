"""Fixtures for the server tests: one thread for the tiny chat model, and one server per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from helpers.serve import RunningServer, make_model, running_server
from medusa.model import MedusaModel


@pytest.fixture(scope="session")
def one_thread():
    """The tiny model decodes fastest on one thread, and the tests share a 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def serve_model(one_thread) -> MedusaModel:
    return make_model()


@pytest.fixture(scope="module")
def server(serve_model) -> Iterator[RunningServer]:
    with running_server(serve_model, max_tokens_cap=200) as running:
        yield running
