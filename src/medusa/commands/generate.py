"""``medusa generate "prompt"``: stream an answer, then report tokens/s and accepted tokens per step."""

from __future__ import annotations

import argparse
import sys

from medusa.commands.output import count_of
from medusa.commands.common import (
    add_lookup_arguments,
    add_model_arguments,
    add_sampling_arguments,
    load_model,
    lookup_options,
    sampling_options,
)
from medusa.decoding import DecodingStats
from medusa.model import GenerationConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the prompt (the chat template is applied when the tokenizer has one)")
    add_model_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=256, help="most new tokens to generate (default 256)")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--no-heads", action="store_true", help="decode plainly, one token per step, on the same cache")
    parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
    add_sampling_arguments(parser)
    add_lookup_arguments(parser)


def run(args: argparse.Namespace) -> int:
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        stop=tuple(args.stop),
        use_heads=not args.no_heads,
        chat_template=not args.raw,
        **sampling_options(args),
        **lookup_options(args),
    )
    model = load_model(args)
    stats = DecodingStats()
    for chunk in model.stream(args.prompt, config, stats=stats):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(
        f"[{stats.new_tokens} tokens in {stats.decode_seconds:.2f} s: {stats.tokens_per_second:.1f} tokens/s, "
        f"{stats.mean_accepted:.2f} accepted tokens per step over {stats.steps} steps ({stats.acceptance} acceptance), "
        f"{_tree_words(model.tree_for(config))}, finish: {stats.finish_reason}]",
        file=sys.stderr,
    )
    return 0


def _tree_words(tree) -> str:
    if not tree.lookup:
        return f"tree of {count_of(tree.size, 'node')}"
    return f"tree of {count_of(tree.size, 'node')} ({tree.lookup} of them a lookup chain)"
