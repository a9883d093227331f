"""Reading and writing the project's files: one clear error for a JSON file that is missing, unreadable or not
JSON, and durable writes for every file medusa writes.

A write that is killed (or loses power) half-way must leave the previous file intact, never a truncated one
under the final name. So a file is written to a temporary name in the same directory, flushed and fsynced,
renamed over the final name (``os.replace`` is atomic within a file system), and the directory is fsynced so
that the rename itself survives a crash. Files that point at other files (a config naming its weights,
``latest.json`` naming a checkpoint) are written after what they point at.

Temporary names start with ``.`` and carry ``TEMPORARY_MARK``; ``remove_stale_temporaries`` deletes the ones a
killed writer left behind. They keep the final name's suffix, so writers that pick a format from the file name
(matplotlib's ``savefig``) work unchanged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medusa.errors import MedusaError

TEMPORARY_MARK = ".partial-"
# Leftovers of the writers this module replaced: ``.step-N.tmp`` checkpoint directories, and ``X.json.tmp``,
# ``X.safetensors.tmp`` or ``X.safetensors.tmpPID`` files.
_LEGACY_TEMPORARY = re.compile(r"^\.step-\d+\.tmp$|^[^/]+\.(json|jsonl|safetensors)\.tmp\d*$")


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMPORARY_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")


def fsync_directory(directory: str | Path) -> None:
    """Make a rename or a new entry in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the rename is then as durable as they allow
    finally:
        os.close(handle)


def _fsync_file(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _fsync_tree(root: Path) -> None:
    for folder, _, names in os.walk(root):
        for name in names:
            _fsync_file(Path(folder) / name)
        fsync_directory(folder)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write a file to; on success it replaces ``path`` durably.

    If the body raises (or the process dies), ``path`` keeps its previous content; the temporary file is
    removed on an exception, and by ``remove_stale_temporaries`` after a kill.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_name(path)
    try:
        yield temporary
        _fsync_file(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``path`` to fill; on success it becomes ``path``, every file fsynced.

    An existing ``path`` is moved aside first and removed only after the new one is in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_name(path)
    temporary.mkdir()
    try:
        yield temporary
        _fsync_tree(temporary)
        previous = None
        if path.exists():
            previous = _temporary_name(path)
            os.replace(path, previous)
        os.replace(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    fsync_directory(path.parent)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, value: object, indent: int | None = 2) -> None:
    """``value`` as JSON with a final newline, written atomically."""
    write_text(path, json.dumps(value, indent=indent) + "\n")


def append_text(path: str | Path, text: str) -> None:
    """Append to a journal-like file and fsync it.

    An append cannot be made atomic by renaming without rewriting the whole file; a kill mid-append can
    leave at most a torn last line, which the readers of our journals (``train_log.jsonl``, bench records,
    distilled answers) skip.
    """
    path = Path(path)
    created = not path.exists()
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    if created:
        fsync_directory(path.parent)


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary left by a writer here (or by the writers this module replaced)."""
    return (name.startswith(".") and TEMPORARY_MARK in name) or bool(_LEGACY_TEMPORARY.search(name))


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporaries a killed writer left in ``directory`` (not below it); returns what was removed.

    Call it only where no other process is writing into ``directory`` at the same time.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = [entry for entry in directory.iterdir() if is_temporary(entry.name)]
    for entry in removed:
        _remove(entry)
    return removed


def parse_json(text: str, what: str) -> Any:
    """``text`` as JSON; ``what`` names it in the error ("tree [[0], [1").

    The error keeps the decoder's line and column, the part a user needs to find the mistake.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise MedusaError(f"{what} is not valid JSON: {error}") from None


def read_json(path: str | Path, what: str) -> Any:
    """The JSON file at ``path``; ``what`` says what it holds ("cost curve"), and every error names it and the path."""
    path = Path(path)
    if not path.exists():
        raise MedusaError(f"{what} {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise MedusaError(f"cannot read {what} {path}: {getattr(error, 'strerror', None) or error}") from None
    return parse_json(text, f"{what} {path}")
