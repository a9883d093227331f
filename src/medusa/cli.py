"""The ``medusa`` command. Each command lives beside the code it drives; this file only dispatches.

Only the module of the command being run is imported (and none for ``medusa --help``), so commands that
load no model never pay for importing torch and transformers.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from medusa import __version__
from medusa.commands.threads import apply_threads
from medusa.errors import MedusaError

# command name -> module exposing ``add_arguments(parser)`` and ``run(args) -> int``
COMMANDS = {
    "generate": ("medusa.commands.generate", "generate text with Medusa decoding"),
    "bench": ("medusa.commands.bench", "Spec-Bench against transformers' decoding, or the step cost curve"),
    "tree": ("medusa.commands.tree", "profile the heads, build the greedy tree, tune its size to this device"),
    "prompts": (
        "medusa.commands.prompts",
        "make context-grounded prompts (summarise, answer from documents) from a pool's answers",
    ),
    "distill": (
        "medusa.commands.distill",
        "let the base model answer a prompt pool itself (training data for the heads)",
    ),
    "train": ("medusa.commands.train", "train Medusa heads: stage 1 on a frozen base, stage 2 with LoRA on the base"),
    "chat": ("medusa.commands.chat", "chat in the terminal, answers streamed (one message per line when piped)"),
    "serve": ("medusa.commands.serve", "serve the OpenAI API (chat, completions) over HTTP"),
    "export": ("medusa.commands.export", "write heads in the original Medusa layout or vLLM's, for serving engines"),
    "cache": (
        "medusa.commands.cache",
        "list or clear medusa's cache (dequantised GGUF models, tuned trees for shipped heads)",
    ),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; given ``argv``, only the command it names gets its flags (and its module imported)."""
    parser = argparse.ArgumentParser(prog="medusa", description="Medusa decoding for Hugging Face causal LMs")
    parser.add_argument("--version", action="version", version=f"medusa {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = None if argv is None else next((arg for arg in argv if not arg.startswith("-")), "")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if chosen is None or chosen == name:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        apply_threads(args)
        return args.handler(args)
    except MedusaError as error:
        print(f"medusa {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
