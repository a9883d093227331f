"""Reading held-out conversations (for profiling) and prompts (for measuring) from JSON or JSONL files.

Profiling replays conversations written by the base model itself (``medusa distill``), so the
assistant turns are the base model's own greedy tokens; only those turns are measured, because only
there do the heads run during decoding. A malformed line is skipped and reported, never fatal.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from medusa.errors import MedusaError

ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "chatgpt": "assistant", "system": "system",
}


@dataclass
class ProfileSequence:
    """One assistant turn in context: ``token_ids`` up to the turn's end; the turn starts at ``response_start``."""

    token_ids: list[int]
    response_start: int


@dataclass
class ReadReport:
    used: int = 0
    skipped: list[str] = field(default_factory=list)  # "file:line: why"


def read_records(paths: Sequence[str | Path], report: ReadReport) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` for every object in JSONL files or JSON files holding a list (or one object)."""
    for raw_path in paths:
        path = Path(raw_path)
        if not path.is_file():
            raise MedusaError(f"data file {path} does not exist")
        text = path.read_text(encoding="utf-8")
        stripped = text.lstrip()
        if path.suffix == ".json" or stripped.startswith("["):
            try:
                loaded = json.loads(text)
            except json.JSONDecodeError as error:
                raise MedusaError(f"data file {path} is not valid JSON: {error}") from None
            items = loaded if isinstance(loaded, list) else [loaded]
            for index, item in enumerate(items):
                where = f"{path}[{index}]"
                if isinstance(item, dict):
                    yield where, item
                else:
                    report.skipped.append(f"{where}: not a JSON object")
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                report.skipped.append(f"{where}: not valid JSON ({error.msg})")
                continue
            if isinstance(item, dict):
                yield where, item
            else:
                report.skipped.append(f"{where}: not a JSON object")


def conversation_messages(record: dict) -> list[dict[str, str]] | None:
    """ShareGPT-style ``conversations`` (``from``/``value``) or ``messages`` (``role``/``content``) as messages."""
    turns = record.get("conversations", record.get("messages"))
    if not isinstance(turns, list) or not turns:
        return None
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            return None
        role = ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
        content = turn.get("value", turn.get("content"))
        if role is None or not isinstance(content, str):
            return None
        messages.append({"role": role, "content": content})
    return messages


def prompt_messages(record: dict) -> list[dict[str, str]] | None:
    """The first user request of a record: Spec-Bench ``turns``, a conversation, ``prompt``, ``question``, ``instruction``."""
    turns = record.get("turns")
    if isinstance(turns, list) and turns and isinstance(turns[0], str) and turns[0].strip():
        return [{"role": "user", "content": turns[0]}]
    messages = conversation_messages(record)
    if messages is not None:
        first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        return messages[: first_user + 1] if first_user is not None else None
    for key in ("prompt", "question", "instruction"):
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            extra = record.get("input") if key == "instruction" else None
            text = f"{value}\n\n{extra}" if isinstance(extra, str) and extra.strip() else value
            return [{"role": "user", "content": text}]
    return None


def read_prompts(paths: Sequence[str | Path], limit: int | None = None) -> tuple[list[list[dict[str, str]]], ReadReport]:
    report = ReadReport()
    prompts = []
    for where, record in read_records(paths, report):
        if limit is not None and len(prompts) >= limit:
            break
        messages = prompt_messages(record)
        if messages is None:
            report.skipped.append(f"{where}: no prompt (expected turns, conversations, prompt, question or instruction)")
            continue
        prompts.append(messages)
    report.used = len(prompts)
    return prompts, report


def encode_messages(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    """Token ids of messages through the chat template, or plain text joined by newlines without one."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "\n".join(m["content"] for m in messages) + ("\n" if generation_prompt else "")
    return list(tokenizer(text)["input_ids"])


def read_profile_sequences(
    paths: Sequence[str | Path],
    tokenizer: PreTrainedTokenizerBase,
    limit: int | None = None,
    max_length: int = 1024,
) -> tuple[list[ProfileSequence], ReadReport]:
    """Every assistant turn of up to ``limit`` conversations, in context, cut to ``max_length`` tokens."""
    report = ReadReport()
    sequences: list[ProfileSequence] = []
    for where, record in read_records(paths, report):
        if limit is not None and report.used >= limit:
            break
        messages = conversation_messages(record)
        if messages is None or not any(m["role"] == "assistant" for m in messages):
            report.skipped.append(f"{where}: no conversation with an assistant turn (expected conversations/messages)")
            continue
        found = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant" or not message["content"] or index == 0:
                continue
            prompt = encode_messages(tokenizer, messages[:index], generation_prompt=True)
            full = encode_messages(tokenizer, messages[: index + 1], generation_prompt=False)
            if full[: len(prompt)] != prompt or len(full) <= len(prompt) or len(prompt) >= max_length:
                continue
            found.append(ProfileSequence(full[:max_length], len(prompt)))
        if not found:
            report.skipped.append(f"{where}: no assistant turn fits in {max_length} tokens after its prompt")
            continue
        sequences.extend(found)
        report.used += 1
    return sequences, report
