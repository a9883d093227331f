"""Tiny assets for the tree-optimisation tests: a word-level tokenizer with a chat template, a saved
tiny model, untrained heads and conversations the model wrote itself (greedy).

Not a conftest.py, so that `from conftest import` keeps meaning tests/conftest.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from helpers.models import EOS_ID, TINY_VOCAB, make_tiny_model
from medusa.heads import MedusaHeads, MedusaHeadsConfig

SPECIALS = ["<pad>", "<s>", "<unk>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]  # </s> is id 3, the EOS
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Words ``w0``, ``w1``, ... split on spaces, filling the tiny models' vocabulary."""
    words = [f"w{i}" for i in range(TINY_VOCAB - len(SPECIALS))]
    vocab = {token: index for index, token in enumerate(SPECIALS + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    assert tokenizer.eos_token_id == EOS_ID
    return tokenizer


def fresh_heads(model: torch.nn.Module, num_heads: int = 3) -> MedusaHeads:
    """Untrained heads: each returns exactly the base model's logits."""
    config = MedusaHeadsConfig(hidden_size=model.config.hidden_size, vocab_size=TINY_VOCAB, num_heads=num_heads)
    return MedusaHeads(config, base_lm_head=model.get_output_embeddings()).eval()


def greedy_continuation(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    """The model's own greedy answer, never stopping at EOS (self-distilled data for the profile)."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(new_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def write_conversations(path: Path, model: torch.nn.Module, tokenizer, count: int = 3, new_tokens: int = 24) -> Path:
    """ShareGPT-style conversations whose answers are the model's greedy continuation of the templated prompt."""
    lines = []
    for index in range(count):
        question = " ".join(f"w{(index * 7 + j * 3) % 200}" for j in range(4 + index))
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = [
            t if t >= len(SPECIALS) else len(SPECIALS) for t in greedy_continuation(model, prompt_ids, new_tokens)
        ]
        answer = tokenizer.decode(answer_ids)
        lines.append(
            json.dumps({"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]})
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def save_tiny_setup(directory: Path, num_heads: int = 3) -> tuple[Path, Path, torch.nn.Module]:
    """A saved tiny Llama with its tokenizer, and untrained heads beside it: ``(model_dir, heads_dir, model)``."""
    model = make_tiny_model("llama", max_positions=1024)
    model_dir, heads_dir = directory / "model", directory / "heads"
    model.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    fresh_heads(model, num_heads).save_pretrained(heads_dir)
    return model_dir, heads_dir, model
