"""``medusa generate "prompt"``: stream an answer, then report tokens/s and accepted tokens per step.

The prompt comes as an argument, from a file (``-f FILE``) or from stdin (``-f -``, or ``-`` as the
prompt), as llama.cpp takes it; ``--json`` prints one JSON object for scripts instead of streaming.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medusa.commands.common import (
    add_lookup_arguments,
    add_model_arguments,
    add_sampling_arguments,
    load_model,
    lookup_options,
    sampling_options,
)
from medusa.commands.output import count_of
from medusa.errors import MedusaError

STDIN = "-"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "prompt",
        nargs="?",
        help="the prompt (the chat template is applied when the tokenizer has one); - reads it from stdin",
    )
    parser.add_argument("-f", "--file", metavar="FILE", help="read the prompt from FILE (- for stdin) instead")
    parser.add_argument("--system", help="system prompt, before the prompt in the chat template")
    add_model_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=256, help="most new tokens to generate (default 256)")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--no-heads", action="store_true", help="decode plainly, one token per step, on the same cache")
    parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object instead of streaming: text, token_ids, finish_reason and stats",
    )
    add_sampling_arguments(parser)
    add_lookup_arguments(parser)


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt from the argument, ``--file`` or stdin; exactly one of them."""
    if args.prompt is not None and args.file is not None:
        raise MedusaError("give the prompt either as an argument or with --file, not both")
    source = args.file if args.file is not None else (STDIN if args.prompt == STDIN else None)
    if source is None:
        if args.prompt is None:
            raise MedusaError("no prompt: give it as an argument, with -f FILE, or on stdin with -f -")
        return args.prompt
    if source == STDIN:
        return sys.stdin.read()
    path = Path(source)
    if not path.is_file():
        raise MedusaError(f"prompt file {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise MedusaError(f"prompt file {path} is not UTF-8 text: {error}") from None


def run(args: argparse.Namespace) -> int:
    from medusa.decoding import DecodingStats
    from medusa.engine import EngineOptions
    from medusa.model import GenerationConfig

    text = read_prompt(args)
    if args.system is not None and args.raw:
        raise MedusaError("--system goes into the chat template, which --raw turns off; drop one of them")
    prompt = [{"role": "system", "content": args.system}, {"role": "user", "content": text}] if args.system else text
    if args.system is not None and not text.strip():
        raise MedusaError("the prompt is empty")
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        stop=tuple(args.stop),
        chat_template=not args.raw,
        **sampling_options(args),
    )
    options = EngineOptions(use_heads=not args.no_heads, **lookup_options(args))
    model = load_model(args)
    stats = DecodingStats()
    tree = model.tree_for(options)
    if args.json:
        result = model.generate(prompt, config, options=options)
        stats = result.stats
        print(
            json.dumps(
                {
                    "text": result.text,
                    "token_ids": result.token_ids,
                    "finish_reason": result.finish_reason,
                    "stats": {
                        "prompt_tokens": stats.prompt_tokens,
                        "new_tokens": stats.new_tokens,
                        "steps": stats.steps,
                        "mean_accepted": round(stats.mean_accepted, 4),
                        "tokens_per_second": round(stats.tokens_per_second, 2),
                        "prefill_seconds": round(stats.prefill_seconds, 4),
                        "decode_seconds": round(stats.decode_seconds, 4),
                        "acceptance": stats.acceptance,
                        "tree_nodes": tree.size,
                        "lookup_nodes": tree.lookup,
                    },
                },
                ensure_ascii=False,
            )
        )
        return 0
    for chunk in model.stream(prompt, config, stats=stats, options=options):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(
        f"[{stats.new_tokens} tokens in {stats.decode_seconds:.2f} s: {stats.tokens_per_second:.1f} tokens/s, "
        f"{stats.mean_accepted:.2f} accepted tokens per step over {stats.steps} steps ({stats.acceptance} acceptance), "
        f"{_tree_words(tree)}, finish: {stats.finish_reason}]",
        file=sys.stderr,
    )
    return 0


def _tree_words(tree) -> str:
    if not tree.lookup:
        return f"tree of {count_of(tree.size, 'node')}"
    return f"tree of {count_of(tree.size, 'node')} ({tree.lookup} of them a lookup chain)"
