"""A tiny random model with a real tokenizer, in memory or saved as a hub-style directory the CLI can load.

The tokenizer has one token per character (ids 0-3 are pad, BOS, unknown and EOS, as in the tiny
models' configs), so any generated id decodes to text and stop strings can match anywhere.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from helpers.models import TINY_VOCAB, make_tiny_model

SPECIALS = ["<pad>", "<s>", "<unk>", "</s>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def char_tokenizer(
    specials: list[str], tokens: list[str], bos: str, eos: str, chat_template: str | None = None
) -> PreTrainedTokenizerFast:
    """A tokenizer with one id per entry of ``specials`` then ``tokens`` (characters, or filler names), in that
    order, and no merges: the test helpers' tokenizers differ only in those lists, their BOS/EOS and template."""
    vocab = {token: index for index, token in enumerate(specials + tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=chat_template,
    )


def latin_fill(characters: list[str], first: int, specials: int) -> list[str]:
    """``characters``, then letters from code point ``first`` on, up to the tiny models' vocabulary."""
    return characters + [chr(first + i) for i in range(TINY_VOCAB - specials - len(characters))]


def make_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    characters = latin_fill([chr(c) for c in range(32, 127)] + ["\n"], 0xC0, len(SPECIALS))
    return char_tokenizer(SPECIALS, characters, "<s>", "</s>", CHAT_TEMPLATE if chat_template else None)


def save_text_model(directory: Path, architecture: str = "llama", max_positions: int = 512, seed: int = 0) -> Path:
    """Save a tiny model and its tokenizer as a directory ``--model`` accepts."""
    make_tiny_model(architecture, seed=seed, max_positions=max_positions).save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    return directory
