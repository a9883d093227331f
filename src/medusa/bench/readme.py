"""Keep the README's benchmark tables equal to the runs they were taken from.

A block in a markdown file::

    <!-- bench-table: docs/benchmarks/RUN/bench.json -->
    (generated)
    <!-- /bench-table -->

holds that report's overall table (``report.overall_markdown_table``). ``python -m medusa.bench.readme README.md``
rewrites every block from its JSON, so a number in the README cannot drift from the committed run;
``--check`` writes nothing and fails when a block is stale (a test runs it on our README).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from medusa.bench.report import overall_markdown_table, validate_report
from medusa.errors import MedusaError
from medusa.files import read_json, write_text

OPENING = "<!-- bench-table:"
# A block's body never holds another opening, so an unclosed block cannot swallow the next one.
BLOCK = re.compile(
    r"<!-- bench-table: (?P<path>[^>]*?) -->\n(?P<body>(?:(?!<!-- bench-table:).)*?)<!-- /bench-table -->", re.DOTALL
)


def _table_for(path: str, root: Path, line: int) -> str:
    file = root / path.strip()
    if not file.exists():
        raise MedusaError(f"line {line}: bench-table block names {path.strip()!r}, which does not exist under {root}")
    try:
        report = read_json(file, "benchmark report")
    except MedusaError as error:
        raise MedusaError(f"line {line}: {error}") from None
    try:
        validate_report(report)
    except ValueError as error:
        raise MedusaError(f"line {line}: {file} is not a medusa bench report: {error}") from None
    return overall_markdown_table(report)


def refresh_tables(text: str, root: str | Path) -> str:
    """``text`` with every bench-table block regenerated from its report (paths relative to ``root``)."""
    root = Path(root)
    blocks = list(BLOCK.finditer(text))
    starts = {block.start() for block in blocks}
    for opening in re.finditer(re.escape(OPENING), text):
        if opening.start() not in starts:
            line = text.count("\n", 0, opening.start()) + 1
            raise MedusaError(
                f"line {line}: a bench-table block is not closed by <!-- /bench-table -->, or its "
                "opening comment is not `<!-- bench-table: PATH -->` on a line of its own"
            )
    pieces, end = [], 0
    for block in blocks:
        line = text.count("\n", 0, block.start()) + 1
        table = _table_for(block["path"], root, line)
        pieces += [text[end : block.start("body")], table, "\n"]
        end = block.end("body")
    pieces.append(text[end:])
    return "".join(pieces)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medusa.bench.readme", description=__doc__.splitlines()[0])
    parser.add_argument(
        "files", nargs="+", type=Path, help="markdown files; block paths are relative to each file's folder"
    )
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a block is stale")
    args = parser.parse_args(argv)
    stale = []
    for file in args.files:
        text = file.read_text()
        try:
            refreshed = refresh_tables(text, file.parent)
        except MedusaError as error:
            print(f"{file}: {error}", file=sys.stderr)
            return 2
        if refreshed != text:
            stale.append(file)
            if not args.check:
                write_text(file, refreshed)
    verb = "stale" if args.check else "rewritten"
    for file in stale:
        print(f"{file}: bench tables {verb}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
