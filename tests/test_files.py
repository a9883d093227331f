"""Files: a failed or killed write leaves the previous file whole, and its temporary goes at the next start; every
error reading a JSON file names what the file holds, its path, and what is wrong."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from medusa import files
from medusa.errors import MedusaError
from medusa.files import parse_json, read_json


def fsynced_paths(monkeypatch) -> list[str]:
    """Record the path of every descriptor fsynced from now on."""
    seen: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return seen


def test_a_write_that_fails_before_the_rename_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "config.json"
    files.write_json(target, {"version": 1})

    def failing_replace(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        files.write_json(target, {"version": 2})
    assert target.read_text() == '{\n  "version": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_a_killed_writer_leaves_the_old_file_and_its_temporary_goes_at_the_next_start(tmp_path):
    target = tmp_path / "tree.json"
    files.write_text(target, "old\n")
    script = (
        "import os, sys\n"
        "from medusa.files import atomic_path\n"
        "with atomic_path(sys.argv[1]) as temporary:\n"
        "    temporary.write_text('half of the new')\n"
        "    os._exit(9)  # killed mid-write: no cleanup runs\n"
    )
    source = Path(files.__file__).parents[1]
    subprocess.run(
        [sys.executable, "-c", script, str(target)], check=False, env={**os.environ, "PYTHONPATH": str(source)}
    )
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "tree.json"]
    assert len(leftovers) == 1 and files.is_temporary(leftovers[0])
    assert target.read_text() == "old\n"
    assert [p.name for p in files.remove_stale_temporaries(tmp_path)] == leftovers
    assert [p.name for p in tmp_path.iterdir()] == ["tree.json"]


def test_a_write_is_fsynced_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    seen = fsynced_paths(monkeypatch)
    files.write_text(tmp_path / "a.txt", "x")
    assert len(seen) == 2 and files.is_temporary(Path(seen[0]).name) and seen[1] == str(tmp_path)


def test_a_directory_replaces_the_old_one_only_when_whole(tmp_path):
    target = tmp_path / "adapter"
    with files.atomic_directory(target) as directory:
        (directory / "weights").write_text("1")
    with pytest.raises(RuntimeError), files.atomic_directory(target) as directory:
        (directory / "weights").write_text("2, half")
        raise RuntimeError("killed")
    assert (target / "weights").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["adapter"]
    with files.atomic_directory(target) as directory:
        (directory / "weights").write_text("2")
    assert (target / "weights").read_text() == "2" and [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    (tmp_path / ".step-00000004.tmp").mkdir()
    (tmp_path / ".step-00000004.tmp" / "state.json").write_text("{}")
    for name in ("medusa_heads.safetensors.tmp", "latest.json.tmp", ".config.json.partial-12-abcd1234.json"):
        (tmp_path / name).write_text("")
    kept = ("notes.tmp", "step-00000002", "config.json", ".hidden")
    for name in kept:
        (tmp_path / name).write_text("")
    files.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_appends_are_fsynced(tmp_path, monkeypatch):
    seen = fsynced_paths(monkeypatch)
    files.append_text(tmp_path / "log.jsonl", "{}\n")
    files.append_text(tmp_path / "log.jsonl", "{}\n")
    assert (tmp_path / "log.jsonl").read_text() == "{}\n{}\n"
    assert seen.count(str(tmp_path / "log.jsonl")) == 2


def test_a_json_file_reads(tmp_path):
    path = tmp_path / "curve.json"
    path.write_text('{"points": [1, 2]}')
    assert read_json(path, "cost curve") == {"points": [1, 2]}
    assert read_json(str(path), "cost curve") == {"points": [1, 2]}


def test_a_missing_unreadable_or_invalid_file_is_named(tmp_path):
    with pytest.raises(MedusaError, match=f"^cost curve {tmp_path / 'nope.json'} does not exist$"):
        read_json(tmp_path / "nope.json", "cost curve")
    with pytest.raises(MedusaError, match=f"^cannot read cost curve {tmp_path}: "):
        read_json(tmp_path, "cost curve")
    bad = tmp_path / "bad.json"
    bad.write_text('{"points": [1,')
    with pytest.raises(MedusaError, match=rf"^cost curve {bad} is not valid JSON: .*line 1 column"):
        read_json(bad, "cost curve")
    bad.write_bytes(b"\xff\xfe{}")
    with pytest.raises(MedusaError, match=f"^cannot read cost curve {bad}: "):
        read_json(bad, "cost curve")


def test_json_text_names_its_origin():
    assert parse_json("[[0]]", "tree [[0]]") == [[0]]
    with pytest.raises(MedusaError, match=r"^tree \[\[0\] is not valid JSON: "):
        parse_json("[[0]", "tree [[0]")
