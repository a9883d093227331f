"""A tiny chat model for fast tests of chat and serving: a random llama with a one-character-per-token
tokenizer that has a chat template, its vocabulary exactly the tiny models' 256 ids."""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from helpers.models import make_tiny_model
from helpers.text_model import char_tokenizer, latin_fill
from medusa.model import MedusaModel

CONTEXT = 256
SPECIALS = ["<pad>", "<s>", "<|im_start|>", "<|im_end|>", "<unk>"]  # ids 0..4; 3 is the tiny model's EOS
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character: printable ASCII, newline, tab, then Latin-1 letters up to 256 ids."""
    characters = latin_fill([chr(c) for c in range(32, 127)] + ["\n", "\t"], 0xA1, len(SPECIALS))
    return char_tokenizer(SPECIALS, characters, "<s>", "<|im_end|>", CHAT_TEMPLATE)


def make_chat_model(seed: int = 3) -> MedusaModel:
    """Seed 3: greedy answers to the tests' prompts run to their length limit, never reaching EOS."""
    base = make_tiny_model("llama", seed=seed, max_positions=CONTEXT)
    return MedusaModel.from_pretrained(base, tokenizer=make_tokenizer(), num_heads=3, tree="8")
