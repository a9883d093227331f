"""``medusa prompts``: prompts for self-distillation: document tasks over a pool's answers, topic tasks from
templates."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from medusa.errors import MedusaError
from medusa.files import write_text
from medusa.training.prompt_tasks import TASKS, TOPIC_TEMPLATES, PromptTaskConfig, make_prompts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        default="",
        help="pool files with answers, comma-separated: JSON or JSONL, any shape "
        "medusa train reads (needed by the document tasks)",
    )
    parser.add_argument("--output", required=True, help='JSONL file of {"prompt", "task"} to write (must not exist)')
    parser.add_argument("--count", type=int, required=True, help="prompts to make; the tasks take turns")
    parser.add_argument(
        "--tasks",
        default=",".join(TASKS),
        help=f"comma-separated tasks, taking turns: the document tasks {', '.join(TASKS)} (over --data), "
        f"and the topic tasks {', '.join(TOPIC_TEMPLATES)} (over --topics, no pool needed). "
        f"Default: all four document tasks ({','.join(TASKS)})",
    )
    parser.add_argument("--topics", help="topic tasks: a file of subjects, one per line (default: the packaged list)")
    parser.add_argument(
        "--documents",
        type=int,
        default=3,
        help="context-qa: documents per question, one of them the answer's (default 3)",
    )
    parser.add_argument(
        "--min-document-chars", type=int, default=200, help="answers shorter than this are no documents (default 200)"
    )
    parser.add_argument(
        "--max-prompt-chars", type=int, default=4000, help="cut documents so a prompt stays under this (default 4000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the same seed makes the same prompts (default 0)")


def run(args: argparse.Namespace) -> int:
    config = PromptTaskConfig(
        data=[path for path in args.data.split(",") if path],
        count=args.count,
        tasks=tuple(task for task in args.tasks.split(",") if task),
        topics=args.topics,
        documents_per_question=args.documents,
        min_document_chars=args.min_document_chars,
        max_prompt_chars=args.max_prompt_chars,
        seed=args.seed,
    )
    output = Path(args.output)
    if output.exists():
        raise MedusaError(
            f"{output} exists; choose another --output or remove it (prompts are the same for the same seed)"
        )
    result = make_prompts(config)
    write_text(output, "".join(json.dumps(prompt, ensure_ascii=False) + "\n" for prompt in result.prompts))
    for line in result.skipped[:20]:
        print(f"skipped {line}", file=sys.stderr)
    if result.short:
        documents = sum(1 for p in result.prompts if p["task"] in ("summarize", "key-points", "rewrite"))
        print(
            f"note: {result.short} of {documents} document prompts are shorter than the length drawn for them "
            f"(up to --max-prompt-chars {args.max_prompt_chars}): the pool holds only {result.sources} documents and "
            "none is repeated within a prompt; give a larger --data pool or a lower --max-prompt-chars",
            file=sys.stderr,
        )
    counts = ", ".join(f"{task} {n}" for task, n in Counter(p["task"] for p in result.prompts).items())
    print(
        f"wrote {len(result.prompts)} prompts to {output} ({counts}) from {result.sources} documents; "
        f"skipped {len(result.skipped)} records",
        file=sys.stderr,
    )
    return 0
