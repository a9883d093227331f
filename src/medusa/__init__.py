"""Medusa: multiple decoding heads and tree attention for any Hugging Face causal LM (Cai et al., 2024).

The public names are imported on first use (PEP 562), so ``import medusa.cli`` does not pull in torch
and transformers: ``medusa --help`` and the commands that load no model start in a fraction of a second.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "DecodingStats": "medusa.decoding",
    "DecodingEngine": "medusa.engine",
    "EngineOptions": "medusa.engine",
    "Generation": "medusa.engine",
    "MedusaError": "medusa.errors",
    "MedusaHeads": "medusa.heads",
    "MedusaHeadsConfig": "medusa.heads",
    "GenerationConfig": "medusa.model",
    "GenerationResult": "medusa.model",
    "MedusaModel": "medusa.model",
    "Tree": "medusa.tree",
    "default_tree": "medusa.tree",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'medusa' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
