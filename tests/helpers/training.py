"""Shared by the training tests: a character-level tokenizer with a ChatML template, a tiny Llama over it, sums to
train on, the settings of a short run and the heads' loss on the data (fixtures: training/conftest.py)."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from helpers.text_model import char_tokenizer
from medusa.training.config import TrainConfig
from medusa.training.data import Collator, load_examples
from medusa.training.objective import MedusaObjective

SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    characters = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
    return char_tokenizer(SPECIALS, characters, "<|im_start|>", "<|im_end|>", CHAT_TEMPLATE)


def make_base(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def write_sums(path: Path) -> Path:
    """40 one-turn conversations ``a+b?`` -> ``a+b=c. ok``, then a broken line (skipped, reported)."""
    rng = random.Random(0)
    rows = []
    for _ in range(40):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        rows.append({"question": f"{a}+{b}?", "answer": f"{a}+{b}={a + b}. ok"})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "{broken\n")
    return path


def train_config(data_file: Path, output: Path, **overrides) -> TrainConfig:
    """A short run on the CPU (8 steps of 8 conversations, 3 heads) with ``overrides``."""
    settings = dict(
        data=[str(data_file)],
        output_dir=str(output),
        max_steps=8,
        batch_size=8,
        learning_rate=2e-2,
        warmup_steps=0,
        log_every=1,
        eval_fraction=0.1,
        device="cpu",
        num_heads=3,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def head_losses(base, heads, tokenizer, data_file: Path, loss: str) -> torch.Tensor:
    """Each head's loss over every conversation of ``data_file``, without training."""
    examples = load_examples([data_file], tokenizer, 1024).items
    batch = Collator(tokenizer.pad_token_id)(examples)
    objective = MedusaObjective(base, heads, loss=loss)
    with torch.no_grad():
        return objective(**batch)["head_losses"]
