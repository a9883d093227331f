"""``medusa cache list|clear``: what medusa keeps on disk, and a way to free it."""

from __future__ import annotations

import argparse
import time

from rich.table import Table

from medusa.commands.output import print_table
from medusa.diskcache import KINDS, cache_entries, clear_cache
from medusa.paths import cache_directory


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    sub.add_parser(
        "list",
        help="list the cache's entries and their sizes",
        description="list the cache's entries: GGUF models dequantised once, and your files (profile, "
        "tree, tuned trees) for the heads shipped in the package",
    )
    clear = sub.add_parser(
        "clear",
        help="remove dequantised models (and, with --heads, your files for shipped heads)",
        description="remove the dequantised GGUF models (made again on the next load); your tuned "
        "trees for the shipped heads stay unless --heads is given",
    )
    clear.add_argument("names", nargs="*", help="entries to remove, as `medusa cache list` names them (default: all)")
    clear.add_argument(
        "--heads",
        action="store_true",
        help="also remove your profile, tree and tuned trees for the shipped heads (tuning took minutes)",
    )


def run(args: argparse.Namespace) -> int:
    if args.cache_command == "list":
        return _list()
    kinds = KINDS if args.heads else ("gguf",)
    removed = clear_cache(kinds, tuple(args.names))
    for entry in removed:
        print(f"removed {entry.path} ({_megabytes(entry.bytes)})")
    print(f"freed {_megabytes(sum(e.bytes for e in removed))} in {cache_directory()}")
    return 0


def _list() -> int:
    entries = cache_entries()
    if not entries:
        print(f"the cache {cache_directory()} is empty")
        return 0
    table = Table(title=f"medusa cache: {cache_directory()} ($MEDUSA_CACHE_DIR moves it)")
    for column in ("kind", "name", "size", "last used", "what"):
        table.add_column(column, justify="right" if column == "size" else "left")
    for entry in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used)) if entry.last_used else "-"
        table.add_row(entry.kind, entry.name, _megabytes(entry.bytes), used, entry.detail)
    print_table(table)
    print(
        f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}, {_megabytes(sum(e.bytes for e in entries))}; "
        "`medusa cache clear` frees the dequantised models"
    )
    return 0


def _megabytes(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"
