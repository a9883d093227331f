"""Log-probabilities in OpenAI's two shapes: chat's ``logprobs.content`` list of token objects, and the
completions API's parallel lists (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``).

Token strings come from a table of the whole vocabulary, built once (on the tokenizing thread: a fast
tokenizer must not be used by two threads at once), so that building a response is lookups alone.
A token's ``bytes`` are its exact bytes where the tokenizer is byte-level (GPT-2 style), else the UTF-8
of its decoded text; a token that is only part of a character shows as ``bytes:\\xe2\\x80``, as OpenAI's does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers.convert_slow_tokenizer import bytes_to_unicode

TopLogprobs = list[tuple[int, float]]


@dataclass
class TokenScores:
    """Tokens and the base model's log-probability of each (None for a prompt's first), with the top alternatives."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top: list[TopLogprobs | None] = field(default_factory=list)

    def extend(self, ids: list[int], logprobs: list[float | None] | None, top: list[TopLogprobs | None] | None) -> None:
        self.ids += ids
        self.logprobs += logprobs if logprobs is not None else [None] * len(ids)
        self.top += top if top is not None else [None] * len(ids)


class TokenTable:
    """Each token id's display string and bytes."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        byte_of = _byte_decoder(tokenizer)
        raw = tokenizer.convert_ids_to_tokens(list(range(vocab_size))) if byte_of else None
        texts = tokenizer.batch_decode([[token_id] for token_id in range(vocab_size)], skip_special_tokens=False)
        self.bytes: list[bytes] = []
        self.strings: list[str] = []
        for token_id, text in enumerate(texts):  # ids past the tokenizer's vocabulary (padded embeddings): ""
            exact = None
            if raw is not None and isinstance(raw[token_id], str) and all(c in byte_of for c in raw[token_id]):
                exact = bytes(byte_of[c] for c in raw[token_id])
            data = exact if exact is not None else text.encode("utf-8")
            try:
                data.decode("utf-8")
                string = text
            except UnicodeDecodeError:  # part of a character
                string = "bytes:" + "".join(f"\\x{b:02x}" for b in data)
            self.bytes.append(data)
            self.strings.append(string)

    def chat_content(self, scores: TokenScores) -> list[dict]:
        """Chat's ``logprobs.content``: one object per token, with its top alternatives."""
        return [
            {
                "token": self.strings[token],
                "logprob": logprob,
                "bytes": list(self.bytes[token]),
                "top_logprobs": [
                    {"token": self.strings[t], "logprob": v, "bytes": list(self.bytes[t])} for t, v in top or ()
                ],
            }
            for token, logprob, top in zip(scores.ids, scores.logprobs, scores.top)
        ]

    def completion_logprobs(self, scores: TokenScores, offset: int, asked: int) -> tuple[dict, int]:
        """The completions API's ``logprobs`` for these tokens, their text starting at character ``offset``;
        returns it and the offset after them. Each token's alternatives hold its top ``asked`` and itself
        (so up to ``asked`` + 1, as OpenAI's); a prompt's first token has none (null)."""
        offsets, tops = [], []
        for token, logprob, top in zip(scores.ids, scores.logprobs, scores.top):
            offsets.append(offset)
            # Characters the token completes: its bytes that do not continue a character.
            offset += sum(1 for b in self.bytes[token] if b & 0xC0 != 0x80)
            if logprob is None:
                tops.append(None)
                continue
            alternatives = {self.strings[t]: v for t, v in (top or ())[:asked]}
            alternatives.setdefault(self.strings[token], logprob)
            tops.append(alternatives)
        body = {
            "tokens": [self.strings[t] for t in scores.ids],
            "token_logprobs": list(scores.logprobs),
            "top_logprobs": tops,
            "text_offset": offsets,
        }
        return body, offset


def _byte_decoder(tokenizer: Any) -> dict[str, int] | None:
    """GPT-2's map from a byte-level token's characters to bytes, where the tokenizer decodes byte-level."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None or "ByteLevel" not in repr(decoder):
        return None
    return {char: byte for byte, char in bytes_to_unicode().items()}
