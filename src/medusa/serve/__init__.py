"""``medusa serve``: an OpenAI-compatible HTTP server in front of a ``MedusaModel``."""

from medusa.serve.app import ServeSettings, create_app
from medusa.serve.engine import Engine, EngineConfig

__all__ = ["Engine", "EngineConfig", "ServeSettings", "create_app"]
