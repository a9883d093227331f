"""The README's benchmark tables are generated from committed bench.json files, and stay equal to them."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.bench import META, METHODS, hand_made_records
from medusa.bench.readme import main, refresh_tables
from medusa.bench.report import build_report, write_report
from medusa.errors import MedusaError

REPOSITORY = Path(__file__).resolve().parents[2]


def page(path: str, body: str = "stale\n") -> str:
    return f"# Performance\n\nbefore\n<!-- bench-table: {path} -->\n{body}<!-- /bench-table -->\nafter\n"


@pytest.fixture
def run(tmp_path):
    write_report(build_report(META, hand_made_records(), METHODS), tmp_path / "runs" / "a" / "bench.json")
    return tmp_path


def test_a_block_gets_the_reports_overall_table_and_the_rest_is_kept(run):
    refreshed = refresh_tables(page("runs/a/bench.json"), run)
    assert refreshed.startswith(
        "# Performance\n\nbefore\n<!-- bench-table: runs/a/bench.json -->\n| method | prompts |"
    )
    assert refreshed.endswith("<!-- /bench-table -->\nafter\n") and "stale" not in refreshed
    rows = [line for line in refreshed.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0] for row in rows] == [f"| {method}" for method in METHODS]
    assert "| medusa | 3 | 64.0 |" in refreshed  # 160 tokens in 2.5 s over the three hand-made prompts
    assert refresh_tables(refreshed, run) == refreshed  # generating again changes nothing


def test_check_mode_reports_a_stale_file_and_writes_nothing(run, capsys):
    readme = run / "README.md"
    readme.write_text(page("runs/a/bench.json"))
    assert main(["--check", str(readme)]) == 1
    assert "stale" in readme.read_text() and "bench tables stale" in capsys.readouterr().out
    assert main([str(readme)]) == 0
    assert main(["--check", str(readme)]) == 0


def test_bad_blocks_are_refused_by_line(run):
    with pytest.raises(MedusaError, match=r"line 4: bench-table block names 'runs/b/bench.json', which does not exist"):
        refresh_tables(page("runs/b/bench.json"), run)
    unclosed = "x\n<!-- bench-table: runs/a/bench.json -->\nold\n" + page("runs/a/bench.json")
    with pytest.raises(MedusaError, match="line 2: a bench-table block is not closed"):
        refresh_tables(unclosed, run)
    with pytest.raises(MedusaError, match="line 4: cannot read .*runs"):
        refresh_tables(page("runs"), run)  # a folder, not a file
    (run / "notes.json").write_text('{"meta": {}}')
    with pytest.raises(MedusaError, match="line 4: .*notes.json is not a medusa bench report: report lacks"):
        refresh_tables(page("notes.json"), run)


def test_the_repository_readme_tables_equal_their_committed_runs():
    readme = (REPOSITORY / "README.md").read_text()
    assert "<!-- bench-table:" in readme
    assert refresh_tables(readme, REPOSITORY) == readme, "run: python -m medusa.bench.readme README.md"
