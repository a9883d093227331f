"""medusa's cache on disk: GGUF models dequantised once (and the user's files for shipped heads, see medusa.paths).

A dequantised copy is keyed on the GGUF file's content, not its path, so every virtual environment and
every copy of one file share one entry: the key hashes the file's size and its first and last
``KEY_SPAN`` bytes (the header names every tensor and its type; hashing gigabytes on each load would
cost seconds). It is kept in the dtype the model is loaded in, so a bfloat16 run stores half of what a
float32 copy takes. Each entry holds ``ENTRY_FILE`` saying what it is and when it was last used, for
``medusa cache list`` and ``medusa cache clear``. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from medusa.errors import MedusaError
from medusa.paths import cache_directory

GGUF_FOLDER = "gguf"
HEADS_FOLDER = "heads"
ENTRY_FILE = "medusa_cache.json"
KEY_SPAN = 8 << 20  # bytes hashed at each end of a GGUF file
KINDS = ("gguf", "heads")


def gguf_key(gguf_file: Path) -> str:
    """A key for the file's content: its size and the bytes at both ends."""
    size = gguf_file.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with gguf_file.open("rb") as handle:
        digest.update(handle.read(KEY_SPAN))
        if size > 2 * KEY_SPAN:
            handle.seek(size - KEY_SPAN)
        digest.update(handle.read(KEY_SPAN))
    return digest.hexdigest()[:16]


def gguf_entry(gguf_file: Path, dtype: str) -> Path:
    """The cache directory for ``gguf_file`` dequantised to ``dtype`` ("float32", "bfloat16", ...)."""
    return cache_directory() / GGUF_FOLDER / f"{gguf_file.stem}-{gguf_key(gguf_file)}-{dtype}"


def mark_used(entry: Path, source: Path | None = None, dtype: str | None = None) -> None:
    """Record the entry's last use (and, when it is made, where it came from)."""
    path = entry / ENTRY_FILE
    try:
        info = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        info = {}
    if source is not None:
        info |= {"source": str(source), "dtype": dtype, "created": time.time()}
    info["last_used"] = time.time()
    try:
        path.write_text(json.dumps(info) + "\n")
    except OSError:  # a read-only cache still serves
        pass


@dataclass(frozen=True)
class CacheEntry:
    kind: str  # "gguf": a dequantised model; "heads": the user's files for shipped heads
    name: str
    path: Path
    bytes: int
    last_used: float | None  # seconds since the epoch; None when unknown
    detail: str  # what it came from


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def cache_entries() -> list[CacheEntry]:
    """Every entry in the cache, dequantised models first."""
    root = cache_directory()
    entries = []
    for folder in sorted((root / GGUF_FOLDER).glob("*")) if (root / GGUF_FOLDER).is_dir() else []:
        if not folder.is_dir():
            continue
        info = {}
        if (folder / ENTRY_FILE).is_file():
            try:
                info = json.loads((folder / ENTRY_FILE).read_text())
            except json.JSONDecodeError:
                pass
        unfinished = ".tmp" in folder.name
        detail = (
            "unfinished (a load was interrupted)"
            if unfinished
            else f"{info.get('dtype', 'float32')} from "
            f"{info.get('source', 'a file not recorded (the entry predates the record)')}"
        )
        last = info.get("last_used")
        entries.append(
            CacheEntry(
                "gguf", folder.name, folder, _size(folder), last if isinstance(last, (int, float)) else None, detail
            )
        )
    heads_root = root / HEADS_FOLDER
    for folder in sorted(heads_root.glob("*")) if heads_root.is_dir() else []:
        if folder.is_dir():
            files = sorted(p.name for p in folder.iterdir() if p.is_file())
            last = max((p.stat().st_mtime for p in folder.iterdir() if p.is_file()), default=None)
            entries.append(
                CacheEntry(
                    "heads",
                    folder.name,
                    folder,
                    _size(folder),
                    last,
                    "your files for the shipped heads: " + ", ".join(files),
                )
            )
    return entries


def clear_cache(kinds: tuple[str, ...] = ("gguf",), names: tuple[str, ...] = ()) -> list[CacheEntry]:
    """Remove the entries of these kinds (only those named, if names are given); returns what was removed."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise MedusaError(f"unknown cache kind {min(unknown)!r}; choose from {', '.join(KINDS)}")
    entries = [e for e in cache_entries() if e.kind in kinds]
    if names:
        missing = [n for n in names if n not in {e.name for e in entries}]
        if missing:
            raise MedusaError(f"no cache entry named {missing[0]!r}; `medusa cache list` shows them")
        entries = [e for e in entries if e.name in names]
    for entry in entries:
        shutil.rmtree(entry.path)
    return entries
