"""Reading the project's JSON files, with one clear error for a file that is missing, unreadable or not JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medusa.errors import MedusaError


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
