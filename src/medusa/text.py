"""Text in and out: prompts as token ids, and incremental detokenisation with stop strings.

Nothing here runs a model; ``MedusaModel`` encodes prompts with ``prompt_token_ids`` and gives each generation a
``TextTracker``, which the engine feeds step by step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from medusa.errors import MedusaError

Prompt = str | Sequence[dict] | Sequence[int] | torch.Tensor


def prompt_token_ids(
    tokenizer: PreTrainedTokenizerBase | None, prompt: Prompt, chat_template: bool, vocab_size: int
) -> list[int]:
    """A prompt's token ids; text and message lists go through the chat template when there is one."""
    if isinstance(prompt, torch.Tensor):
        ids = prompt.flatten().tolist()
    elif isinstance(prompt, str):
        if not prompt.strip():
            raise MedusaError("the prompt is empty")
        tokenizer = _require(tokenizer)
        if chat_template and getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
    elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
        tokenizer = _require(tokenizer)
        if not getattr(tokenizer, "chat_template", None):
            raise MedusaError("messages were given, but the tokenizer has no chat template")
        text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    elif isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
    else:
        raise MedusaError(
            f"a prompt is text, a list of chat messages or a list of token ids, got {type(prompt).__name__}"
        )
    if not ids:
        raise MedusaError("the prompt is empty")
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise MedusaError(f"prompt token ids must lie in [0, {vocab_size}), got {min(ids)}..{max(ids)}")
    return ids


def _require(tokenizer: PreTrainedTokenizerBase | None) -> PreTrainedTokenizerBase:
    if tokenizer is None:
        raise MedusaError("this model has no tokenizer: pass token ids, or a tokenizer to from_pretrained")
    return tokenizer


def is_prompt_batch(prompt: object) -> bool:
    """A list whose items are prompts themselves (texts, lists, tensors), not token ids or chat messages."""
    if isinstance(prompt, (str, torch.Tensor)) or not isinstance(prompt, Sequence) or not prompt:
        return False
    return all(
        isinstance(item, (str, torch.Tensor)) or (isinstance(item, Sequence) and not isinstance(item, dict))
        for item in prompt
    )


class TextTracker:
    """Incremental detokenisation with stop strings: emits only text that can no longer change or stop.

    Each step decodes a small window, not the whole output (which made long answers quadratic): the
    tokens since the last point where the text was whole, plus the step before that as context, as
    streaming detokenisers do. Subtracting the context's own text leaves the new text exactly as
    decoding the whole output would write it (a SentencePiece space, a character split across tokens).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.tokens: list[int] = []
        self.emitted = 0
        self.text = ""  # the text of all the tokens, as one decode of them would give it
        self._context = 0  # tokens[_context:_whole] are decoded again each step, as context
        self._whole = 0  # the text of tokens[:_whole] ends on a whole character and is final
        self._whole_chars = 0  # its length in self.text
        self._context_text = ""  # the text of tokens[_context:_whole] decoded alone

    def add(self, tokens: list[int]) -> tuple[str, int, bool]:
        """Add a step's tokens; return ``(new text, how many of the tokens to keep, stopped)``."""
        if self.tokenizer is None:
            self.tokens.extend(tokens)
            return "", len(tokens), False
        before = len(self.tokens)
        window = (self._context, self._whole_chars, self._context_text)
        self.tokens.extend(tokens)
        self._decode_new()
        found = []
        for stop in self.stop:
            start = self.text.find(stop, max(0, self.emitted - len(stop)))
            if start >= 0:
                found.append((start, stop))
        if found:  # one step may complete several stop strings: the earliest wins
            start, stop = min(found)
            keep = self._tokens_to_reach(window, before, start + len(stop))
            self.text = self.text[:start]
            return self._emit(len(self.text)), keep, True
        safe = len(self.text)
        while safe > self.emitted and self.text[safe - 1] == "\ufffd":  # an unfinished UTF-8 character
            safe -= 1
        for stop in self.stop:  # hold back what may be the start of a stop string
            for size in range(min(len(stop) - 1, safe - self.emitted), 0, -1):
                if self.text[safe - size : safe] == stop[:size]:
                    safe -= size
                    break
        return self._emit(safe), len(tokens), False

    def flush(self) -> str:
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        chunk = self.text[self.emitted : upto]
        self.emitted = max(self.emitted, upto)
        return chunk

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _decode_new(self) -> None:
        """Bring ``self.text`` up to date, decoding only ``tokens[_context:]``."""
        window = self._decode(self.tokens[self._context :])
        if window.startswith(self._context_text):
            self.text = self.text[: self._whole_chars] + window[len(self._context_text) :]
        else:  # the tokenizer rewrote the context's text (a clean-up of spaces): decode it all
            self.text = self._decode(self.tokens)
        if not self.text.endswith("\ufffd"):  # whole characters: the next window starts here
            self._whole_chars = len(self.text)
            self._context, self._whole = self._whole, len(self.tokens)
            self._context_text = self._decode(self.tokens[self._context : self._whole])

    def _tokens_to_reach(self, window: tuple[int, int, str], before: int, length: int) -> int:
        """The fewest of this step's tokens whose text reaches ``length`` characters; drops the rest."""
        context, whole_chars, context_text = window
        for count in range(1, len(self.tokens) - before + 1):
            text = self._decode(self.tokens[context : before + count])
            if whole_chars + len(text) - len(context_text) >= length:
                self.tokens = self.tokens[: before + count]
                return count
        return len(self.tokens) - before
