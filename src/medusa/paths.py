"""Where medusa reads and writes on disk: the heads shipped in the package, and the user's cache.

The shipped heads sit inside the installed package, which may be shared by several users or reinstalled
at any time, so no command writes there: what a command makes for them (a profile, a tree, tuned trees)
goes to a per-user copy under the cache, which loading those heads reads first. Nothing here imports
torch, so commands that load no model start fast.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
SHIPPED_HEADS = Path(__file__).parent / "assets" / "heads"


def cache_directory() -> Path:
    """``$MEDUSA_CACHE_DIR``, else ``$XDG_CACHE_HOME/medusa``, else ``~/.cache/medusa``."""
    root = os.environ.get("MEDUSA_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medusa"


def shipped_heads_directory(model_name: str) -> Path | None:
    directory = SHIPPED_HEADS / model_name.lower()
    return directory if (directory / "config.json").is_file() else None


def is_shipped(directory: str | Path) -> bool:
    """Whether ``directory`` lies inside the package's shipped assets (read-only to every command)."""
    return Path(directory).resolve().is_relative_to(SHIPPED_HEADS.resolve())


def user_heads_directory(directory: str | Path) -> Path:
    """Where commands write files for these heads: beside them, or for shipped heads ``CACHE/heads/<name>``."""
    directory = Path(directory)
    if not is_shipped(directory):
        return directory
    return cache_directory() / "heads" / directory.resolve().relative_to(SHIPPED_HEADS.resolve())


def heads_file(directory: str | Path, name: str) -> Path:
    """The file ``name`` of these heads: the user's copy for shipped heads when there is one, else the heads' own."""
    user = user_heads_directory(directory) / name
    return user if user.is_file() else Path(directory) / name
