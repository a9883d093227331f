"""Held-out conversations (for profiling) and prompts (for measuring), through the project's data reader.

Profiling replays conversations written by the base model itself (``medusa distill``), so the
assistant turns are the base model's own greedy tokens; only those turns are measured, because only
there do the heads run during decoding. Use conversations the heads were not trained on. A malformed
record is skipped and reported as ``file:line: why``, never fatal.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from medusa.training.data import (
    Example,
    RecordError,
    encode_conversation,
    prompt_messages,
    read_records,
    record_messages,
)


def read_profile_examples(
    paths: Sequence[str | Path],
    tokenizer: PreTrainedTokenizerBase,
    limit: int | None = None,
    max_length: int = 1024,
    offset: int = 0,
) -> tuple[list[Example], list[str]]:
    """Up to ``limit`` conversations with an assistant answer, from record ``offset`` on, tokenised with
    their assistant-token mask; and what was skipped."""
    skipped: list[str] = []
    examples: list[Example] = []
    for index, record in enumerate(read_records(paths, skipped)):
        if index < offset:
            continue
        if limit is not None and len(examples) >= limit:
            break
        try:
            messages = record_messages(record.value)
            if not any(m["role"] == "assistant" for m in messages):
                raise RecordError("no assistant answer to measure the heads on")
            example = encode_conversation(tokenizer, messages, max_length)
        except RecordError as error:
            skipped.append(f"{record.where}: {error}")
            continue
        example.where = record.where
        examples.append(example)
    return examples, skipped


def read_evaluation_prompts(
    paths: Sequence[str | Path], limit: int | None = None
) -> tuple[list[list[dict[str, str]]], list[str]]:
    """First requests as chat messages: Spec-Bench ``turns`` (first turn) or any record the data reader knows.

    ``limit`` counts per category when records have one (Spec-Bench), so a subset keeps every task.
    """
    skipped: list[str] = []
    prompts: list[list[dict[str, str]]] = []
    taken: dict[object, int] = {}
    for record in read_records(paths, skipped):
        value = record.value
        category = value.get("category") if isinstance(value, dict) else None
        if limit is not None and taken.get(category, 0) >= limit:
            continue
        try:
            turns = value.get("turns") if isinstance(value, dict) else None
            if turns is not None:
                if not isinstance(turns, list) or not turns or not isinstance(turns[0], str) or not turns[0].strip():
                    raise RecordError("'turns' must be a non-empty list of strings")
                messages = [{"role": "user", "content": turns[0]}]
            else:
                messages = prompt_messages(record_messages(value))
        except RecordError as error:
            skipped.append(f"{record.where}: {error}")
            continue
        taken[category] = taken.get(category, 0) + 1
        prompts.append(messages)
    return prompts, skipped
