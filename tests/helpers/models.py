"""Tiny random models of several architectures, and where the shared data lies."""

from __future__ import annotations

from pathlib import Path

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

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
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
