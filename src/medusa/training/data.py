"""Training data: conversations and prompts in the shapes people have, tokenised for the heads.

Records are ShareGPT-style ``{"conversations"|"messages": [{"from"|"role", "value"|"content"}]}``,
Alpaca-style ``{"instruction", "input", "output"|"response"}``, GSM8K-style ``{"question", "answer"}`` or
plain ``{"prompt"}``, in JSON files (a list) or JSONL files. A malformed record is skipped and reported
as ``file:line: why``, never fatal, so one bad line does not cost a long run.

Only assistant tokens are trained on: they are the tokens the heads must guess while decoding.
They are found by rendering each assistant turn's prefix through the chat template and mapping the
turn's characters onto tokens, which works for any template without ``{% generation %}`` markers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

from medusa.errors import MedusaError

if (
    TYPE_CHECKING
):  # torch is imported where tensors are made, so `medusa prompts` (which reads records only) starts fast
    import torch
    from transformers import PreTrainedTokenizerBase

ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "system": "system",
}
ANSWER_KEYS = ("output", "response", "completion", "answer")

T = TypeVar("T")
Message = dict[str, str]


class RecordError(ValueError):
    """A record that cannot be used; the reader reports it with its file and line and goes on."""


@dataclass
class ReadResult(Generic[T]):
    items: list[T] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "file:line: why"

    @property
    def skipped_count(self) -> int:
        return len(self.skipped)


@dataclass
class DataRecord:
    """One JSON value of a data file, with where it starts (``medusa.bench.runner.Record`` is a benchmark's prompt)."""

    where: str  # "file:line", for messages
    source: str  # the file's name, part of a prompt's stable id
    index: int  # position of the record in its file
    value: object


@dataclass
class DataPrompt:
    """A prompt read from a data file, with a stable id (``MedusaModel``'s prompts are text, messages or ids)."""

    id: str  # stable across runs: file name, index and content
    messages: list[Message]
    where: str


@dataclass
class Example:
    """One tokenised conversation; ``loss_mask[j]`` is True where token j belongs to an assistant turn."""

    input_ids: list[int]
    loss_mask: list[bool]
    where: str = ""


# ----- reading records ------------------------------------------------------------------------------


def read_records(paths: Sequence[str | Path], skipped: list[str]) -> Iterator[DataRecord]:
    """Every record of JSON (a list, or one object) and JSONL files, with the line it starts on."""
    for raw_path in paths:
        path = Path(raw_path)
        if not path.is_file():
            raise MedusaError(f"data file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise MedusaError(f"data file {path} is not UTF-8 text: {error}") from None
        start = len(text) - len(text.lstrip())
        if text[start : start + 1] == "[":
            yield from _json_array(path, text, start)
        elif path.suffix == ".json" and text[start : start + 1] == "{" and _is_single_object(text):
            yield DataRecord(f"{path}:{text.count(chr(10), 0, start) + 1}", path.name, 0, json.loads(text))
        else:
            yield from _json_lines(path, text, skipped)


def _is_single_object(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _json_array(path: Path, text: str, start: int) -> Iterator[DataRecord]:
    """Items of a top-level JSON list, each with its line number (``raw_decode`` gives positions)."""
    decoder = json.JSONDecoder()
    position, line, counted = start + 1, 1, 0
    index = 0
    while True:
        while position < len(text) and text[position] in " \t\r\n":
            position += 1
        if position < len(text) and text[position] == "]":
            return
        try:
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise MedusaError(
                f"{path}:{error.lineno}: not valid JSON ({error.msg}); fix the file or use JSONL"
            ) from None
        line += text.count("\n", counted, position)
        counted = position
        yield DataRecord(f"{path}:{line}", path.name, index, value)
        index += 1
        position = end
        while position < len(text) and text[position] in " \t\r\n":
            position += 1
        if position < len(text) and text[position] == ",":
            position += 1
        elif position < len(text) and text[position] == "]":
            return
        else:
            line_end = line + text.count("\n", counted, position)
            raise MedusaError(f"{path}:{line_end}: not valid JSON (expected ',' or ']' after a list item)")


def _json_lines(path: Path, text: str, skipped: list[str]) -> Iterator[DataRecord]:
    index = 0
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            skipped.append(f"{path}:{number}: not valid JSON ({error.msg})")
            continue
        yield DataRecord(f"{path}:{number}", path.name, index, value)
        index += 1


# ----- records to messages --------------------------------------------------------------------------


def record_messages(record: object) -> list[Message]:
    """The record's conversation as ``[{"role", "content"}]``; raises ``RecordError`` saying what is missing."""
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    turns = record.get("conversations", record.get("messages"))
    if turns is not None:
        return _turns(turns)
    system = record.get("system")
    messages = [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []
    if "instruction" in record:
        instruction, extra = record["instruction"], record.get("input")
        _require_text(instruction, "instruction")
        if extra is not None and not isinstance(extra, str):
            raise RecordError(f"'input' must be a string, got {type(extra).__name__}")
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    elif "question" in record:
        user = _require_text(record["question"], "question")
    elif "prompt" in record:
        user = _require_text(record["prompt"], "prompt")
    else:
        raise RecordError("no conversations, messages, instruction, question or prompt field")
    messages.append({"role": "user", "content": user})
    for key in ANSWER_KEYS:
        if key in record:
            answer = record[key]
            if not isinstance(answer, str):
                raise RecordError(f"'{key}' must be a string, got {type(answer).__name__}")
            messages.append({"role": "assistant", "content": answer})
            break
    return messages


def _turns(turns: object) -> list[Message]:
    if not isinstance(turns, list) or not turns:
        raise RecordError("'conversations' must be a non-empty list of turns")
    messages = []
    for number, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"turn {number} is not an object")
        raw_role = turn.get("from", turn.get("role"))
        role = ROLES.get(str(raw_role).lower()) if raw_role is not None else None
        if role is None:
            raise RecordError(f"turn {number} has role {raw_role!r}; expected one of {', '.join(sorted(ROLES))}")
        content = turn.get("value", turn.get("content"))
        if not isinstance(content, str):
            raise RecordError(f"turn {number} has no text ('value' or 'content')")
        messages.append({"role": role, "content": content})
    return messages


def _require_text(value: object, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RecordError(f"'{name}' must be a non-empty string")
    return value


def prompt_messages(messages: list[Message]) -> list[Message]:
    """The messages before the first assistant turn: what the base model answers when distilling."""
    end = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    prompt = messages[:end]
    if not any(m["role"] == "user" and m["content"].strip() for m in prompt):
        raise RecordError("no user message before the first assistant turn")
    return prompt


def prompt_id(source: str, index: int, messages: list[Message]) -> str:
    """Stable id of a prompt: a distillation rerun recognises the rows it already wrote by it."""
    key = json.dumps([source, index, messages], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def read_prompts(paths: Sequence[str | Path], limit: int | None = None) -> ReadResult[DataPrompt]:
    """Up to ``limit`` prompts (in file order), from any record shape; answers in the records are ignored."""
    result: ReadResult[DataPrompt] = ReadResult()
    for record in read_records(paths, result.skipped):
        if limit is not None and len(result.items) >= limit:
            break
        try:
            messages = prompt_messages(record_messages(record.value))
        except RecordError as error:
            result.skipped.append(f"{record.where}: {error}")
            continue
        result.items.append(DataPrompt(prompt_id(record.source, record.index, messages), messages, record.where))
    return result


# ----- tokenising -----------------------------------------------------------------------------------


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    # No template (a base model): turns one per line, as plain text.
    return "".join(m["content"] + "\n" for m in messages)


def encode_messages(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> list[int]:
    """Prompt token ids of chat messages, ending with the assistant's generation prompt, as ``MedusaModel`` encodes
    them (without a chat template: the turns one per line)."""
    return list(tokenizer(_render(tokenizer, messages, True), add_special_tokens=False)["input_ids"])


def _assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    full = _render(tokenizer, messages, False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant" or index == 0:
            continue
        before = _render(tokenizer, messages[:index], True)
        upto = _render(tokenizer, messages[: index + 1], False)
        # Templates that rewrite earlier turns (e.g. dropping reasoning) break the prefix property; such a
        # turn is left out of the loss rather than mislabelled.
        if full.startswith(upto) and upto.startswith(before) and len(upto) > len(before):
            spans.append((len(before), len(upto)))
    if not spans:
        raise RecordError("no assistant turn after a prompt (or the chat template does not render turns as prefixes)")
    return full, spans


def _example(ids: list[int], mask: list[bool], max_length: int) -> Example:
    ids, mask = ids[:max_length], mask[:max_length]
    if not any(mask[1:]):
        raise RecordError(f"no assistant token within the first {max_length} tokens")
    return Example(ids, mask)


def _mask_from_offsets(offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """True for tokens starting inside a span; offsets and spans both run left to right."""
    mask, span = [], 0
    for begin, _ in offsets:
        while span < len(spans) and begin >= spans[span][1]:
            span += 1
        mask.append(span < len(spans) and begin >= spans[span][0])
    return mask


def _encode_slow(
    tokenizer: PreTrainedTokenizerBase, full: str, spans: list[tuple[int, int]]
) -> tuple[list[int], list[bool]]:
    """Without offsets (a slow tokenizer): token counts of the text up to each span's ends."""
    ids = list(tokenizer(full, add_special_tokens=False)["input_ids"])
    mask = [False] * len(ids)
    for start, end in spans:
        first = len(tokenizer(full[:start], add_special_tokens=False)["input_ids"])
        last = len(tokenizer(full[:end], add_special_tokens=False)["input_ids"])
        mask[first:last] = [True] * (last - first)
    return ids, mask


def encode_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[Message], max_length: int) -> Example:
    """Token ids of the whole conversation and a mask of its assistant tokens, cut to ``max_length``."""
    full, spans = _assistant_spans(tokenizer, messages)
    if not tokenizer.is_fast:
        return _example(*_encode_slow(tokenizer, full, spans), max_length)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    return _example(list(encoded["input_ids"]), _mask_from_offsets(encoded["offset_mapping"], spans), max_length)


def load_examples(
    paths: Sequence[str | Path], tokenizer: PreTrainedTokenizerBase, max_length: int, batch: int = 1024
) -> ReadResult[Example]:
    """Tokenised conversations with at least one assistant answer; prompt-only records are skipped.

    Texts are tokenised ``batch`` at a time: the fast tokenizers encode a batch on all cores.
    """
    result: ReadResult[Example] = ReadResult()
    rendered: list[tuple[str, str, list[tuple[int, int]]]] = []  # (where, text, spans)

    def flush() -> None:
        if tokenizer.is_fast:
            encoded = tokenizer(
                [text for _, text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True
            )
            pairs = [
                (list(ids), _mask_from_offsets(offsets, spans))
                for ids, offsets, (_, _, spans) in zip(encoded["input_ids"], encoded["offset_mapping"], rendered)
            ]
        else:
            pairs = [_encode_slow(tokenizer, text, spans) for _, text, spans in rendered]
        for (where, _, _), (ids, mask) in zip(rendered, pairs):
            try:
                example = _example(ids, mask, max_length)
            except RecordError as error:
                result.skipped.append(f"{where}: {error}")
                continue
            example.where = where
            result.items.append(example)
        rendered.clear()

    for record in read_records(paths, result.skipped):
        try:
            messages = record_messages(record.value)
            if not any(m["role"] == "assistant" for m in messages):
                raise RecordError("no assistant answer (prompt-only records are for `medusa distill`)")
            rendered.append((record.where, *_assistant_spans(tokenizer, messages)))
        except RecordError as error:
            result.skipped.append(f"{record.where}: {error}")
        if len(rendered) >= batch:
            flush()
    if rendered:
        flush()
    return result


# ----- splitting and batching -----------------------------------------------------------------------


def split_held_out(
    examples: list[Example], fraction: float, seed: int, max_held_out: int
) -> tuple[list[Example], list[Example]]:
    """``(train, held_out)``: a seeded random ``fraction`` (at least one, at most ``max_held_out``) held out."""
    if fraction <= 0 or len(examples) < 2:
        return list(examples), []
    import torch

    count = min(max(1, round(fraction * len(examples))), max_held_out, len(examples) - 1)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:count])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


class LengthBatchSampler:
    """Batches of similar length (little padding), in a seeded order that depends only on the epoch.

    Batches are cut once from the examples sorted by length, at most ``batch_size`` sequences and
    ``max_tokens`` padded tokens each; every epoch visits them in its own permutation. The epoch is set
    with ``use_epoch`` (not ``set_epoch``, which data-loader wrappers call on their own), so a resumed
    run sees exactly the batches the interrupted one would have.
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, max_tokens: int | None, seed: int, shuffle: bool = True
    ) -> None:
        order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
        self.batches: list[list[int]] = []
        current: list[int] = []
        for index in order:
            longest = max(lengths[index], max((lengths[i] for i in current), default=0))
            if current and (len(current) >= batch_size or (max_tokens and longest * (len(current) + 1) > max_tokens)):
                self.batches.append(current)
                current = []
            current.append(index)
        if current:
            self.batches.append(current)
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        if not self.shuffle:
            yield from self.batches
            return
        import torch

        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        for index in torch.randperm(len(self.batches), generator=generator).tolist():
            yield self.batches[index]


@dataclass
class Collator:
    """Right-padded tensors ``input_ids``, ``attention_mask``, ``loss_mask``, each ``[batch, longest]``."""

    pad_token_id: int

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        import torch

        longest = max(len(e.input_ids) for e in examples)
        input_ids = torch.full((len(examples), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
        loss_mask = torch.zeros((len(examples), longest), dtype=torch.bool)
        for row, example in enumerate(examples):
            length = len(example.input_ids)
            input_ids[row, :length] = torch.tensor(example.input_ids)
            attention_mask[row, :length] = 1
            loss_mask[row, :length] = torch.tensor(example.loss_mask)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
