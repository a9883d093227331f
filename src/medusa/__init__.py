"""Medusa: multiple decoding heads and tree attention for any Hugging Face causal LM (Cai et al., 2024)."""

from medusa.decoding import DecodingStats
from medusa.engine import DecodingEngine, EngineOptions, Generation
from medusa.errors import MedusaError
from medusa.heads import MedusaHeads, MedusaHeadsConfig
from medusa.model import GenerationConfig, GenerationResult, MedusaModel
from medusa.tree import Tree, default_tree

__all__ = [
    "DecodingStats",
    "GenerationConfig",
    "GenerationResult",
    "DecodingEngine",
    "EngineOptions",
    "Generation",
    "MedusaError",
    "MedusaHeads",
    "MedusaHeadsConfig",
    "MedusaModel",
    "Tree",
    "default_tree",
]
__version__ = "0.1.0"
