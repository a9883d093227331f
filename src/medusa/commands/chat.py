"""``medusa chat``: a multi-turn conversation in the terminal, answers streamed at Medusa speed.

At a terminal it shows a prompt, streams each answer and a status line (tokens/s, accepted tokens per
step). With stdin not a terminal it reads one message per line and writes only the answers to stdout,
one after another, each ended by a newline, so it can be scripted; the status lines go to stderr.
``/reset`` forgets the conversation (the system prompt stays), ``/exit`` ends it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from medusa.commands.common import (
    add_lookup_arguments,
    add_model_arguments,
    add_sampling_arguments,
    load_model,
    lookup_options,
    sampling_options,
)
from medusa.errors import MedusaError

if TYPE_CHECKING:  # the model's modules (torch) load when the command runs, not for --help
    from medusa.decoding import DecodingStats
    from medusa.engine import EngineOptions
    from medusa.model import GenerationChunk, GenerationConfig, MedusaModel

COMMANDS_HELP = "/reset forgets the conversation, /exit ends it"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--system", help="system prompt (kept across /reset)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="most tokens per answer (default 512)")
    parser.add_argument("--no-heads", action="store_true", help="decode plainly, one token per step (the baseline)")
    add_sampling_arguments(parser)
    add_lookup_arguments(parser)


class ChatSession:
    """The conversation so far, and one turn at a time through the model's chat template."""

    def __init__(
        self,
        model: MedusaModel,
        config: GenerationConfig,
        system: str | None = None,
        options: EngineOptions | None = None,
    ) -> None:
        tokenizer = model.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise MedusaError("medusa chat needs a tokenizer with a chat template; this model has none")
        self.model = model
        self.config = config
        self.options = options
        self.system = system
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def ask(self, text: str, stats: DecodingStats) -> Iterator[GenerationChunk]:
        """Stream the answer to ``text``; the turn joins the history once the answer ends, or is cut short.

        A turn the model refuses (the conversation outgrew the context, say) leaves the history as it was.
        """
        messages = self.messages + [{"role": "user", "content": text}]
        parts: list[str] = []
        stream = self.model.stream(messages, self.config, stats=stats, options=self.options)
        try:
            for chunk in stream:
                parts.append(chunk.text)
                yield chunk
        finally:
            stream.close()
            if stats.steps:  # the model ran: keep the turn, even if the reader stopped early (Ctrl-C)
                self.messages = messages + [{"role": "assistant", "content": "".join(parts)}]


def status_line(stats: DecodingStats, interrupted: bool = False) -> str:
    end = "interrupted" if interrupted else stats.finish_reason
    return (
        f"{stats.new_tokens} tokens · {stats.tokens_per_second:.1f} tokens/s · "
        f"{stats.mean_accepted:.2f} accepted tokens per step · {end}"
    )


def run(args: argparse.Namespace) -> int:
    from medusa.engine import EngineOptions
    from medusa.model import GenerationConfig

    config = GenerationConfig(max_new_tokens=args.max_new_tokens, **sampling_options(args))
    options = EngineOptions(use_heads=not args.no_heads, **lookup_options(args))
    model = load_model(args)
    session = ChatSession(model, config, system=args.system, options=options)
    if sys.stdin.isatty():
        return _interactive(session, Console(highlight=False))
    return _scripted(session)


def _interactive(session: ChatSession, console: Console) -> int:
    from medusa.engine import EngineOptions

    options = session.options or EngineOptions()
    tree = session.model.tree_for(options)
    heads = f"{tree.size - tree.lookup}-node tree" if options.use_heads else "no heads"
    if tree.lookup:
        heads += f", {tree.lookup}-node lookup branch"
    console.print(f"[bold]medusa chat[/] with {escape(session.model.name)} ({heads}); {COMMANDS_HELP}.")
    while True:
        try:
            text = console.input("[bold green]you>[/] ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return 0
        if not text:
            continue
        if text.startswith("/"):
            if _command(text, session, console.print) == "exit":
                return 0
            continue
        stats = _new_stats()
        interrupted = False
        answer = session.ask(text, stats)
        try:
            for chunk in answer:
                console.out(chunk.text, end="", highlight=False)
                console.file.flush()
        except KeyboardInterrupt:
            interrupted = True
            answer.close()
        except MedusaError as error:
            console.print(f"[red]error:[/] {escape(str(error))}")
            continue
        console.print()
        console.print(f"[dim]{status_line(stats, interrupted)}[/]")


def _scripted(session: ChatSession) -> int:
    failed = False
    for line in sys.stdin:
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if _command(text, session, lambda message: print(message, file=sys.stderr)) == "exit":
                break
            continue
        stats = _new_stats()
        try:
            for chunk in session.ask(text, stats):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
        except MedusaError as error:
            print(f"medusa chat: error: {error}", file=sys.stderr)
            failed = True
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        print(f"[{status_line(stats)}]", file=sys.stderr)
    return 2 if failed else 0


def _new_stats() -> DecodingStats:
    from medusa.decoding import DecodingStats

    return DecodingStats()


def _command(text: str, session: ChatSession, say) -> str | None:
    name = text.split()[0].lower()
    if name in ("/exit", "/quit"):
        return "exit"
    if name == "/reset":
        session.reset()
        say("(conversation reset)")
        return "reset"
    say(f"unknown command {name}; {COMMANDS_HELP}")
    return None
