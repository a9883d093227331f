"""Printing for commands: rich tables in full whether stdout is a terminal or a pipe."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def print_table(table: Table, stderr: bool = False) -> None:
    """Print ``table``; piped, rich would squeeze it into 80 columns ("autore…"), so it gets the width it needs."""
    console = Console(stderr=stderr)
    if not console.is_terminal:
        needed = Console(stderr=stderr, width=100_000).measure(table).maximum
        console = Console(stderr=stderr, width=max(console.width, needed))
    console.print(table)


def count_of(number: int, noun: str) -> str:
    """ "1 node", "8 nodes": a count with its noun in the right number (nouns that take an s)."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"
