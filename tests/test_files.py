"""One way to read a JSON file: every error names what the file holds, its path, and what is wrong."""

from __future__ import annotations

import pytest

from medusa.errors import MedusaError
from medusa.files import parse_json, read_json


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
