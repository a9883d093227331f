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


def make_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    characters = [chr(c) for c in range(32, 127)] + ["\n"]
    code = 0xC0  # then accented Latin letters up to the vocabulary size
    while len(SPECIALS) + len(characters) < TINY_VOCAB:
        characters.append(chr(code))
        code += 1
    vocab = {token: index for index, token in enumerate(SPECIALS + characters)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE if chat_template else None,
    )


def save_text_model(directory: Path, architecture: str = "llama", max_positions: int = 512, seed: int = 0) -> Path:
    """Save a tiny model and its tokenizer as a directory ``--model`` accepts."""
    make_tiny_model(architecture, seed=seed, max_positions=max_positions).save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    return directory
